"""Run one `dvc.yaml` stage for the retraining flow: `dvc repro --single-item <stage>`.

The flow and `dvc repro` thus share one pipeline state: `dvc.lock`, DVC's run cache and
`dvc metrics/plots diff` record every flow run, a stage whose inputs did not change is skipped
by either entry point, and each sees what the other ran. The stage's output (DVC's lines and
the `esmm <stage>` command's) is forwarded line by line to a callback (the Prefect task's
logger), without colour codes, with progress-bar lines thinned to one every few seconds and
DVC's git hints left out.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flows.quiet import ANSI, quiet_environment

STAGES = ("ingest", "validate", "train", "evaluate", "register")
# Set for the stage commands the flow runs (`esmm register` then leaves promotion to it).
FLOW_ENV = "ESMM_RETRAIN_FLOW"

# A Keras progress line (`12/345 ...`), ours (`validate: ... ETA 3s`) or tqdm's (`x:  40%|`):
# thinned.
_PROGRESS = re.compile(r"^\s*(\d+)/(\d+)\s|^\w+: .*\bETA\b|^[^|]*:\s+\d+%\|")
# DVC's advice after each stage, repeated five times per flow run; the flow says it once.
_HINTS = (
    "To track the changes with git",
    "git add dvc.lock",
    "To enable auto staging",
    "dvc config core.autostage",
    "Use `dvc push` to send",
)
# Lines that say nothing the user can act on (third-party notices in child processes).
_NOISE = (
    "Unable to import IPython",
    "TFDV visualization APIs will not function",
    "install TFDV using",
    "Missing pipeline option",
)


@dataclass
class StageRun:
    stage: str
    ran: bool = False  # False: DVC found it up to date (or restored it from the run cache)
    returncode: int = 0
    errors: list[str] = field(default_factory=list)  # `error: ...` lines and DVC's ERROR


def _keep(line: str) -> bool:
    text = line.strip()
    return bool(text) and not text.startswith(_HINTS + _NOISE)


def run_stage(
    stage: str,
    cwd: Path | None = None,
    log: Callable[[str], None] = print,
    progress_every: float = 10.0,
) -> StageRun:
    """`dvc repro --single-item stage` in `cwd`; every kept output line goes to `log`.

    Returns:
        Whether the stage ran, its exit code and its error lines (the caller decides
        what a failure means; `register` fails on a refused gate after registering).
    """
    result = StageRun(stage)
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=quiet_environment() | {FLOW_ENV: "1"},
    )
    last_progress = 0.0
    pending = ""  # the latest progress line not yet shown
    in_error = False
    assert process.stdout is not None
    for raw in process.stdout:  # universal newlines: Keras's `\r` updates split too
        line = ANSI.sub("", raw).rstrip()
        if not _keep(line):
            continue
        if line.startswith(f"Running stage '{stage}'"):
            result.ran = True
        if line.startswith(("error: ", "ERROR: ")):
            result.errors.append(line.removeprefix("error: ").removeprefix("ERROR: "))
            in_error = True
        elif in_error and line.startswith(" "):  # the error's own indented lines
            result.errors[-1] += "\n" + line
        else:
            in_error = False
        match = _PROGRESS.match(line)
        if match:
            now = time.monotonic()
            done = match.group(1) is not None and match.group(1) == match.group(2)
            if now - last_progress < progress_every and not done:
                pending = line
                continue
            last_progress, pending = now, ""
        elif pending:
            log(pending)
            pending = ""
        log(line)
    result.returncode = process.wait()
    return result


def failure_reason(run: StageRun) -> str:
    """One line for a failed stage: the command's own error, else DVC's."""
    ours = [e for e in run.errors if not e.startswith("failed to reproduce")]
    return (ours or run.errors or [f"dvc repro exited {run.returncode}"])[0]
