"""The nightly loop: a day series (`esmm synth --days N`) through the real pipeline, day by day.

Each night does what production does with a new day of logs: `esmm data add` of the day's
folder (a new DVC data version, committed to git), then the retraining flow
(`flows.retrain.retrain`: ingest, validation with drift checks against the last version
that passed, training, which with `train.warm_start: champion` continues from the champion,
evaluation and the gate against the champion, registration, promotion on a passed gate).
A night the validation or the gate refuses leaves `champion` where it was; the loop goes
on with the next day. `esmm nightly` runs it; every night's outcome is printed and written
to `<artifacts>/nightly/nights.json`.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from aliccp.synth.days import read_days
from tasks.champion import champion_version
from tasks.config import load_params
from tasks.data import add_raw_data
from tasks.tracking import resolve_tracking_uri

NIGHTS_FILE = "nights.json"


@dataclass(frozen=True)
class Night:
    """One night of the loop."""

    day: int
    data_version: str
    outcome: str  # "promoted", "kept" (gate passed, not promoted) or "refused"
    reason: str  # why refused ("" otherwise)
    champion_before: str | None
    champion_after: str | None
    registered: str | None  # the version the flow registered, if it got that far
    metrics: dict | None  # the new model's test metrics, if evaluated
    oracle: dict | None  # the day's oracle AUCs on its test split
    seconds: float

    def to_text(self) -> str:
        auc = ""
        if self.metrics:
            auc = (
                f"  ctr_auc {self.metrics['ctr_auc']:.4f} ctcvr_auc {self.metrics['ctcvr_auc']:.4f}"
            )
        moved = f"champion {self.champion_before or '-'} -> {self.champion_after or '-'}"
        why = f": {self.reason}" if self.reason else ""
        return f"day {self.day:>2}  {self.outcome:<8} {moved}{auc}  ({self.seconds:.0f} s){why}"


def parse_days(text: str) -> list[int]:
    """Days from `esmm nightly --days`: ranges and single days, e.g. `1-4` or `2,3,7`.

    Raises:
        ValueError: the text is not of that form.
    """
    try:
        out = []
        for part in text.split(","):
            first, _, last = part.partition("-")
            out += list(range(int(first), int(last or first) + 1))
        return out
    except ValueError:
        raise ValueError(f"--days {text!r}: expected days such as 1-4 or 2,3") from None


def run_nightly(
    series_dir: Path,
    days: list[int] | None = None,
    params_path: str = "params.yaml",
    log: Callable[[str], None] = print,
) -> list[Night]:
    """Run the days of a series, one night each, in this repository (the working directory).

    Args:
        series_dir: a folder written by `esmm synth --days N` (with `days.json`).
        days: the days to run, in order (default: all of them).
        params_path: the repository's params.yaml (the flow reads it).
        log: called with each night's one-line outcome.

    Returns:
        One record per night, also written to `<artifacts>/nightly/nights.json`.

    Raises:
        FileNotFoundError: `series_dir` is not a day series.
        ValueError: a requested day is not in the series.
    """
    series_dir = Path(series_dir)
    records = {r.day: r for r in read_days(series_dir)}
    wanted = days or sorted(records)
    missing = [d for d in wanted if d not in records]
    if missing:
        raise ValueError(f"{series_dir}: no day {missing[0]} (the series has {len(records)})")
    params = load_params(params_path)
    out = Path(params.paths.artifacts_dir) / "nightly"
    out.mkdir(parents=True, exist_ok=True)
    nights = []
    for day in wanted:
        nights.append(_night(day, series_dir / records[day].folder, params_path))
        log(nights[-1].to_text())
        (out / NIGHTS_FILE).write_text(json.dumps([asdict(n) for n in nights], indent=2) + "\n")
    return nights


def _night(day: int, day_dir: Path, params_path: str) -> Night:
    """`esmm data add` of one day, then the retraining flow; the outcome either way."""
    from flows.retrain import retrain
    from tasks.evaluate import GateRefusedError
    from tasks.steps import StepFailed

    params = load_params(params_path)
    uri = resolve_tracking_uri(params.register_.tracking_uri)
    name = params.register_.model_name
    started = time.perf_counter()
    before = champion_version(uri, name)
    raw_dir = Path(params.paths.raw_dir)
    version = add_raw_data(Path.cwd(), raw_dir, day_dir).version
    _commit(raw_dir, f"data: {day_dir.name}")
    outcome, reason, summary = "promoted", "", None
    try:
        summary = retrain(params_path=params_path)
    except GateRefusedError as err:
        outcome, reason = "refused", "gate: " + "; ".join(err.reasons)
    except StepFailed as err:
        outcome, reason = "refused", " ".join(line.strip() for line in str(err).splitlines())
    after = champion_version(uri, name)
    if outcome == "promoted" and after == before:
        outcome = "kept"
    metrics = _read_json(Path(params.paths.artifacts_dir) / "evaluate" / "metrics.json")
    evaluated = summary is not None or reason.startswith("gate")
    return Night(
        day=day,
        data_version=version,
        outcome=outcome,
        reason=reason,
        champion_before=before,
        champion_after=after,
        registered=summary.model_version if summary is not None else None,
        metrics=_headline(metrics) if evaluated and metrics else None,
        oracle=_read_json(day_dir / "oracle.json", {}).get("test"),
        seconds=time.perf_counter() - started,
    )


def _commit(raw_dir: Path, message: str) -> None:
    """Record the new data version in git (the training window and drift read its history)."""
    dvc_file = raw_dir.with_name(raw_dir.name + ".dvc")
    subprocess.run(["git", "add", str(dvc_file)], check=True, capture_output=True)
    subprocess.run(
        ["git", "commit", "-q", "--allow-empty", "-m", message], check=True, capture_output=True
    )


def _read_json(path: Path, default: dict | None = None) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else default


def _headline(metrics: dict) -> dict:
    """The three headline AUCs of a metrics.json (whatever else it holds)."""
    inner = metrics.get("metrics", metrics)
    return {k: inner[k] for k in ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked") if k in inner}
