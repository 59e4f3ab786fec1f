"""Background processes of the stack: start with a pid file and a log, check, stop.

Each process runs in its own session, its output in `<stack dir>/logs/<name>.log`, its pid
and start time in `<stack dir>/run/<name>.pid` (the start time tells a reused pid apart).
Stopping ends the whole process tree (a server's workers, a worker's flow runs).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil


class ServiceError(RuntimeError):
    """A stack process did not come up; the message names it and its log."""


def _pid_file(directory: Path, name: str) -> Path:
    return directory / "run" / f"{name}.pid"


def log_file(directory: Path, name: str) -> Path:
    return directory / "logs" / f"{name}.log"


def process(directory: Path, name: str) -> psutil.Process | None:
    """The running process recorded for `name`, or None."""
    path = _pid_file(directory, name)
    if not path.is_file():
        return None
    pid, created = path.read_text().split()
    try:
        proc = psutil.Process(int(pid))
        if abs(proc.create_time() - float(created)) < 1 and proc.status() != "zombie":
            return proc
    except psutil.Error:
        pass
    return None


def start(directory: Path, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    """Start `cmd` in the background (unless it runs already); returns its pid."""
    running = process(directory, name)
    if running is not None:
        return running.pid
    log = log_file(directory, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    pid_file = _pid_file(directory, name)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{proc.pid} {psutil.Process(proc.pid).create_time()}\n")
    return proc.pid


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def stop(directory: Path, names: list[str], timeout: float = 15) -> list[str]:
    """Terminate the named processes and their descendants together, kill what outlives
    `timeout`; returns the names that were running."""
    procs: list[psutil.Process] = []
    stopped = []
    for name in names:
        proc = process(directory, name)
        _pid_file(directory, name).unlink(missing_ok=True)
        if proc is not None:
            stopped.append(name)
            procs += tree(proc)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    alive = _wait_ended(procs, timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait_ended(alive, 10)
    return stopped


def _wait_ended(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has exited; those still running after `timeout`. A zombie has
    exited: only its parent can reap it (a part started by another long-lived process, such
    as a test session), so waiting for it to vanish would wait the whole timeout."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def _running(proc: psutil.Process) -> bool:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            if proc.ppid() == os.getpid():
                proc.wait(timeout=0)  # our own child: reap it
            return False
        return proc.is_running()
    except (psutil.Error, psutil.TimeoutExpired):  # gone meanwhile
        return False


def wait_http(url: str, timeout: float, directory: Path, name: str) -> None:
    """Poll `url` until it answers 200; fail early (naming the log) if `name` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process(directory, name) is None:
            raise ServiceError(f"{name} exited while starting; see {log_file(directory, name)}")
        if http_ok(url):
            return
        time.sleep(0.5)
    raise ServiceError(
        f"{name}: no answer at {url} after {timeout:.0f} s; see {log_file(directory, name)}"
    )


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False
