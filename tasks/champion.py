"""The model registry's champion: MLflow aliases, never stages.

Every registered version gets the alias `challenger` (tasks.register); `champion` moves only
through `promote` (a passed gate, or an explicit override with a reason) and `rollback`.

The champion history lives in the registry itself: every move of `champion` appends one
event to the registered model's tags (`champion.history.000001`, ...: action, version,
previous champion, time, reason, override, user), and the version it moved to gets
`promoted_at` / `promoted_from` / `promotion_action` / `promotion_reason` /
`promotion_override` tags. Moves are serialised by a lock held in the registry (a
registered model `<name>.promotion-lock`, whose creation is atomic), so two racing
promotions leave exactly one champion and a history whose last event names it.
`fetch_champion` downloads the current champion's model.
"""

from __future__ import annotations

import getpass
import json
import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasks.config import RegisterConfig
from tasks.evaluate import Champion
from tasks.tracking import mlflow_client, resolve_tracking_uri

CHALLENGER = "challenger"
CHAMPION = "champion"
HISTORY_PREFIX = "champion.history."
LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_SECONDS = 120  # a lock older than this was left by a crashed process
LOCK_TIMEOUT_SECONDS = 120


class PromotionError(RuntimeError):
    """`champion` cannot move as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ChampionEvent:
    """One move of `champion`, as recorded in the registry."""

    seq: int
    action: str  # "promote" or "rollback"
    version: str
    previous: str | None
    at: str  # ISO 8601, UTC
    reason: str
    override: bool
    user: str

    def to_text(self) -> str:
        moved = f"{self.previous or '-'} -> {self.version}"
        forced = " (OVERRIDE)" if self.override else ""
        return f"{self.seq:>4}  {self.at}  {self.action:<8} {moved:<10} {self.user}  {self.reason}{forced}"


def _missing(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def champion_version(tracking_uri: str, model_name: str) -> str | None:
    """The version `champion` points to, or None (no registry, model or alias yet)."""
    from mlflow.exceptions import MlflowException

    db = _sqlite_file(tracking_uri)
    if db is not None and not db.is_file():
        return None
    try:
        return str(
            mlflow_client(tracking_uri).get_model_version_by_alias(model_name, CHAMPION).version
        )
    except MlflowException as err:
        if _missing(err) or "not found" in str(err).lower():
            return None
        raise


def fetch_champion(cfg: RegisterConfig, dest: Path) -> Champion | None:
    """Download the current champion's artefacts into `dest` and find its `.keras` file
    anywhere in the tree (independent of how the model was logged); None without one."""
    import mlflow.artifacts

    uri = resolve_tracking_uri(cfg.tracking_uri)
    version = champion_version(uri, cfg.model_name)
    if version is None:
        return None
    # The version's own artefact location, resolved through this registry (a `models:/` URI
    # would be resolved against MLflow's process-wide registry URI instead).
    source = mlflow_client(uri).get_model_version_download_uri(cfg.model_name, version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(dest), tracking_uri=uri
    )
    found = sorted(Path(local).glob("**/*.keras"))
    if not found:
        raise FileNotFoundError(
            f"champion {cfg.model_name} version {version}: no .keras file in its artefacts "
            f"({local}); promote a version that carries one"
        )
    return Champion(version, found[0])


def _retrying(call, attempts: int = 20):
    """Run a registry call, retrying SQLite's transient "database is locked"."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as err:
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.05 + random.random() * 0.2)


@contextmanager
def registry_lock(tracking_uri: str, model_name: str) -> Iterator[None]:
    """Hold `<model_name>.promotion-lock`, a registered model whose creation is atomic in
    any MLflow registry: one holder at a time; a stale lock (crashed holder) is broken."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    name = model_name + LOCK_SUFFIX
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
    held_by = "?"
    while True:
        try:
            client.create_registered_model(name, tags={"holder": holder})
            break
        except MlflowException as err:
            # Held by another process; or released between its insert failing and the
            # store reading the holder back (RESOURCE_DOES_NOT_EXIST); or SQLite busy.
            contended = getattr(err, "error_code", "") in (
                "RESOURCE_ALREADY_EXISTS",
                "RESOURCE_DOES_NOT_EXIST",
            )
            if not contended and "locked" not in str(err).lower():
                raise
        try:
            lock = client.get_registered_model(name)
            held_by = lock.tags.get("holder", "?")
            age = time.time() - lock.creation_timestamp / 1000
            if age > LOCK_STALE_SECONDS:
                client.delete_registered_model(name)
                continue
        except MlflowException:
            pass  # released (or being created) meanwhile: try again
        if time.monotonic() > deadline:
            raise PromotionError(
                f"registry lock {name!r} is held by {held_by}; "
                f"retry later, or delete that registered model if its holder is gone"
            )
        time.sleep(0.05 + random.random() * 0.2)
    try:
        yield
    finally:
        _retrying(lambda: client.delete_registered_model(name))


def champion_history(tracking_uri: str, model_name: str) -> list[ChampionEvent]:
    """Every move of `champion`, oldest first, read from the registry."""
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow_client(tracking_uri).get_registered_model(model_name)
    except MlflowException as err:
        if _missing(err):
            raise PromotionError(f"no registered model {model_name!r} at {tracking_uri}") from err
        raise
    events = [
        ChampionEvent(**json.loads(value))
        for key, value in model.tags.items()
        if key.startswith(HISTORY_PREFIX)
    ]
    return sorted(events, key=lambda e: e.seq)


def _champion_stack(events: list[ChampionEvent]) -> list[str]:
    """Replay the history: a promotion pushes, a rollback pops; the top is the champion."""
    stack: list[str] = []
    for event in events:
        if event.action == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != event.version:
                stack.append(event.version)
        else:
            if event.previous and (not stack or stack[-1] != event.previous):
                stack.append(event.previous)
            stack.append(event.version)
    return stack


def _record(
    tracking_uri: str,
    model_name: str,
    action: str,
    version: str,
    previous: str | None,
    reason: str,
    override: bool,
) -> ChampionEvent:
    """Move `champion` to `version` and append the event (caller holds the lock)."""
    client = mlflow_client(tracking_uri)
    history = champion_history(tracking_uri, model_name)
    event = ChampionEvent(
        seq=(history[-1].seq if history else 0) + 1,
        action=action,
        version=version,
        previous=previous,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        reason=reason,
        override=override,
        user=getpass.getuser(),
    )
    _retrying(lambda: client.set_registered_model_alias(model_name, CHAMPION, version))
    _retrying(
        lambda: client.set_registered_model_tag(
            model_name, f"{HISTORY_PREFIX}{event.seq:06d}", json.dumps(asdict(event))
        )
    )
    for key, value in {
        "promoted_at": event.at,
        "promoted_from": previous or "none",
        "promotion_action": action,
        "promotion_reason": reason,
        "promotion_override": str(override).lower(),
    }.items():
        _retrying(lambda k=key, v=value: client.set_model_version_tag(model_name, version, k, v))
    return event


def promote(
    tracking_uri: str,
    model_name: str,
    version: str,
    reason: str = "",
    override: bool = False,
) -> ChampionEvent:
    """Move `champion` to `version` if its gate passed, or with `override` and a reason.

    Raises:
        PromotionError: the version does not exist, its gate failed without an override,
            an override has no reason, or it is the champion already.
    """
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    try:
        target = client.get_model_version(model_name, str(version))
    except MlflowException as err:
        raise PromotionError(f"{model_name} version {version} does not exist") from err
    passed = target.tags.get("gate_passed") == "true"
    if not passed and not override:
        raise PromotionError(
            f"{model_name} version {version} did not pass the gate "
            f"({target.tags.get('gate_reasons', 'no gate verdict recorded')}); "
            "promote it anyway only with an explicit override and a reason "
            "(esmm promote VERSION --force --reason TEXT)"
        )
    if override and not reason.strip():
        raise PromotionError("an override needs a reason (it is recorded in the registry)")
    with registry_lock(tracking_uri, model_name):
        previous = champion_version(tracking_uri, model_name)
        if previous == str(version):
            raise PromotionError(f"{model_name} version {version} is the champion already")
        return _record(
            tracking_uri,
            model_name,
            "promote",
            str(version),
            previous,
            reason or "gate passed",
            override and not passed,
        )


def rollback(tracking_uri: str, model_name: str, reason: str = "") -> ChampionEvent:
    """Move `champion` back to the champion before the current one (by the history).

    Raises:
        PromotionError: there is no earlier champion, or `champion` was moved outside
            `promote`/`rollback` so the history does not end with it.
    """
    with registry_lock(tracking_uri, model_name):
        stack = _champion_stack(champion_history(tracking_uri, model_name))
        current = champion_version(tracking_uri, model_name)
        if not stack or stack[-1] != current:
            raise PromotionError(
                f"champion is version {current}, but the recorded history ends with "
                f"{stack[-1] if stack else 'nothing'}; use `esmm promote` to set it"
            )
        if len(stack) < 2:
            raise PromotionError(f"no previous champion of {model_name} to roll back to")
        return _record(
            tracking_uri,
            model_name,
            "rollback",
            stack[-2],
            current,
            reason or f"rollback from version {current}",
            False,
        )
