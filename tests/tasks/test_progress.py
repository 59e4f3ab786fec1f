"""Progress lines: counts, rate and ETA; work counted by other processes through a file."""

from __future__ import annotations

import subprocess
import sys

from tasks.progress import FileProgress, Progress


def test_a_progress_line_has_the_share_the_rate_and_an_eta(monkeypatch):
    clock = iter([100.0, 110.0])
    monkeypatch.setattr("tasks.progress.time.monotonic", lambda: next(clock))
    progress = Progress("validate: statistics", 1000, "rows")
    assert progress.line(250) == ("validate: statistics: 250/1,000 rows (25%), 25 rows/s, ETA 30s")


def test_nothing_done_yet_says_so_and_done_says_how_long():
    progress = Progress("evaluate: scored", 10, "impressions")
    assert progress.line(0).startswith("evaluate: scored: 0/10 impressions (0%), started ")
    assert "done in" in progress.line(10) and "ETA" not in progress.line(10)


def test_work_counted_in_other_processes_is_summed(tmp_path, capsys):
    with FileProgress("step", 30, "rows", tmp_path / ".progress", interval=60) as progress:
        for n in (10, 20):
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"from tasks.progress import record; record({str(progress.path)!r}, {n})",
                ],
                check=True,
            )
        assert progress.done() == 30
    assert "step: 30/30 rows (100%)" in capsys.readouterr().out
    assert not (tmp_path / ".progress").exists()
