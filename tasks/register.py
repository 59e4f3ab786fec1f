"""Registration step and the model registry's champion: MLflow aliases, never stages.

Every trained model becomes a new version of one registered model, tagged with the data
version, git commit, parameters and schema digests, its metrics and the gate verdict, and
gets the alias `challenger`. `champion` moves only through `promote` (a passed gate, or an
explicit override with a reason) and `rollback`.

The champion history lives in the registry itself: every move of `champion` appends one
event to the registered model's tags (`champion.history.000001`, ...: action, version,
previous champion, time, reason, override, user), and the version it moved to gets
`promoted_at` / `promoted_from` / `promotion_action` / `promotion_reason` /
`promotion_override` tags. Moves are
serialised by a lock held in the registry (a registered model `<name>.promotion-lock`,
whose creation is atomic), so two racing promotions leave exactly one champion and a
history whose last event names it.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasks.config import Params, RegisterConfig
from tasks.evaluate import HEADLINE, Champion, GateVerdict

CHALLENGER = "challenger"
CHAMPION = "champion"
HISTORY_PREFIX = "champion.history."
LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_SECONDS = 120  # a lock older than this was left by a crashed process
LOCK_TIMEOUT_SECONDS = 120
# A team's tracking server (`esmm stack up` writes it to the settings file) overrides
# `register.tracking_uri`; MLflow's own MLFLOW_TRACKING_URI cannot serve, as every
# `mlflow.set_tracking_uri` call in a process rewrites it.
TRACKING_URI_ENV = "ESMM_TRACKING_URI"
SERVER_WAIT_SECONDS = 180  # how long registry calls wait for a restarting tracking server


class PromotionError(RuntimeError):
    """`champion` cannot move as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: str
    aliases: list[str]
    run_id: str
    data_version: str
    tracking_uri: str
    gate_passed: bool = True
    gate_reasons: tuple[str, ...] = ()
    previous_champion: str | None = None  # the champion before this run (if it moved)

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"


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


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"epochs": 2}} -> {"train.epochs": 2}."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def resolve_tracking_uri(uri: str, root: Path | None = None) -> str:
    """The tracking URI to use: ESMM_TRACKING_URI when set, else `uri`, a relative
    `sqlite:///file.db` made absolute (against `root`, default the cwd).

    MLflow caches one store per URI string, so a relative path would keep pointing at the
    first directory it was resolved in.
    """
    uri = os.environ.get(TRACKING_URI_ENV) or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((root or Path.cwd()) / uri[len(prefix) :])
    return uri


@contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URIs (what its fluent API, `mlflow.start_run`
    and `models:/` URIs use) set to `uri` for the block, then restored exactly.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI to every later child process,
    so a step run in a long-lived process (the flow, a test session, a notebook) would leave
    its store behind for whatever comes next. MLflow has no public way to unset the URIs;
    the module attributes below are the ones `set_*_uri` write (mlflow 3, pinned).
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    saved_env = {name: os.environ.get(name) for name in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def git_commit(cwd: Path | None = None) -> str:
    """The checked-out commit, or "unknown" outside a git repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def params_digest(params: Params) -> str:
    """sha256 of the canonical JSON of the full configuration."""
    canonical = json.dumps(
        params.model_dump(by_alias=True, mode="json"), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def schema_digest(schema_dir: Path) -> str:
    """sha256 over the names and contents of `schema_dir/*.pbtxt` ("none" without any)."""
    files = sorted(Path(schema_dir).glob("*.pbtxt"))
    if not files:
        return "none"
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def wait_for_server(tracking_uri: str, timeout: float = SERVER_WAIT_SECONDS) -> None:
    """For an http(s) tracking URI, wait until the server's `/health` answers (a server
    restarting between training and registration); a no-op for local stores.

    Raises:
        ConnectionError: no answer within `timeout` seconds, naming the server.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ConnectionError(
                f"MLflow tracking server {tracking_uri}: no answer in {timeout:.0f} s"
            )
        time.sleep(1)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    wait_for_server(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


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
        return str(_client(tracking_uri).get_model_version_by_alias(model_name, CHAMPION).version)
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
    source = _client(uri).get_model_version_download_uri(cfg.model_name, version)
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


def _log_model(model_path: Path, cfg: RegisterConfig):
    """Log the trained model to the active run as the serving model; returns its `ModelInfo`.

    The serving model (serving/pyfunc.py) is a models-from-code pyfunc taking raw records; it
    carries the `.keras` file, which the evaluate step re-scores for the champion.
    """
    from serving.pyfunc import log_serving_model

    return log_serving_model(model_path, name="model")


def _metric_tags(metrics: dict, champion: dict | None) -> dict[str, str]:
    tags = {f"metric.{k}": f"{metrics[k]:.6g}" for k in HEADLINE if k in metrics}
    if champion:
        tags["compared_with_champion"] = str(champion["version"])
        tags |= {f"champion.{k}": f"{champion[k]:.6g}" for k in HEADLINE if k in champion}
    return tags


def register_esmm(
    model_path: Path,
    metrics: dict[str, float],
    verdict: GateVerdict,
    data_version: str,
    params: Params,
    out_dir: Path,
    champion_metrics: dict | None = None,
    artifacts: list[tuple[str, Path]] | None = None,
    history: dict | None = None,
    raw_dir: Path | None = None,
) -> Registration:
    """Log params, metrics, artefacts and the model to MLflow; register it as a new version
    with `challenger`, and promote it to `champion` (through `promote`) when the gate passed
    and `register.promote` is `gate`.

    Args:
        model_path: the trained `.keras` model.
        metrics: evaluation metrics of that model (nested dicts are flattened).
        verdict: the gate verdict; `champion` moves only when it passed.
        data_version: the DVC md5 of the raw data the model was trained on.
        params: the full configuration, logged as run parameters.
        out_dir: where `registration.json` is written.
        champion_metrics: the champion's metrics on the same test split, if there was one.
        artifacts: (artefact folder, file or folder) pairs to log; missing ones are skipped.
        history: training's `history.json` (per-epoch metrics, logged as steps 0, 1, ...).
        raw_dir: the raw data folder, recorded as the run's input data set (`log_input`).

    Returns:
        The registered version, its aliases and the verdict.
    """
    import mlflow

    cfg: RegisterConfig = params.register_
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    wait_for_server(tracking_uri)
    with mlflow_uris(tracking_uri):
        mlflow.set_experiment(cfg.experiment)
        tags = {
            "data_version": data_version,
            "git_commit": git_commit(),
            "params_digest": params_digest(params),
            "schema_digest": schema_digest(Path(params.validate_.schema_dir)),
            "gate_passed": str(verdict.passed).lower(),
            "gate_reasons": "; ".join(verdict.reasons) or "all checks passed",
        }
        numeric = flatten(metrics) | flatten({"champion": champion_metrics or {}})
        with mlflow.start_run(tags=tags) as run:
            mlflow.log_params(flatten(params.model_dump(by_alias=True, mode="json")))
            mlflow.log_metrics(
                {
                    k: float(v)
                    for k, v in numeric.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
            )
            _log_history(history or {})
            for folder, path in artifacts or []:
                if Path(path).is_dir():
                    mlflow.log_artifacts(str(path), folder)
                elif Path(path).is_file():
                    mlflow.log_artifact(str(path), folder)
            with _without_mlflow_notices():
                if raw_dir is not None:
                    _log_dataset(Path(raw_dir), data_version)
                info = _log_model(model_path, cfg)
        registered = mlflow.register_model(
            info.model_uri, cfg.model_name, tags=tags | _metric_tags(metrics, champion_metrics)
        )
        version = str(registered.version)
        client = _client(tracking_uri)
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
        aliases, previous = [CHALLENGER], None
        if verdict.passed and cfg.promote == "gate":
            event = promote(
                tracking_uri,
                cfg.model_name,
                version,
                reason=f"gate passed in run {run.info.run_id}",
            )
            aliases.append(CHAMPION)
            previous = event.previous
        registration = Registration(
            cfg.model_name,
            version,
            aliases,
            run.info.run_id,
            data_version,
            tracking_uri,
            verdict.passed,
            tuple(verdict.reasons),
            previous,
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "registration.json").write_text(json.dumps(asdict(registration), indent=2))
    return registration


# MLflow's advice to add type hints to a pyfunc's predict (ours takes raw records of any
# shape), and its note that a local folder matches two of its data set source types.
_MLFLOW_NOTICES = re.compile(r"Add type hints to the `predict`|can be interpreted in multiple ways")


@contextmanager
def _without_mlflow_notices() -> Iterator[None]:
    """Drop `_MLFLOW_NOTICES` warnings. Filters cannot: MLflow wraps the type-hint check in
    its own `catch_warnings` with a "once" filter ahead of any of ours, so the notices are
    dropped where warnings are shown."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not _MLFLOW_NOTICES.search(str(message)):
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _log_history(history: dict) -> None:
    """Per-epoch training metrics as MLflow steps (`history.json` holds one list per name),
    so the MLflow UI draws learning curves as autologging would."""
    import mlflow

    for name, values in history.items():
        if not isinstance(values, list):
            continue  # best_epoch, recalibration, replicas: not per-epoch
        for step, value in enumerate(values):
            if isinstance(value, int | float) and not isinstance(value, bool):
                mlflow.log_metric(name, float(value), step=step)


def _log_dataset(raw_dir: Path, data_version: str) -> None:
    """The raw data folder as the run's training input, with the DVC md5 as its digest."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source = resolve_dataset_source(str(raw_dir.resolve()))
    digest = data_version.removesuffix(".dir")
    dataset = MetaDataset(source, name=f"{raw_dir.name}@{digest[:8]}", digest=digest)
    mlflow.log_input(dataset, context="training", tags={"data_version": data_version})


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

    client = _client(tracking_uri)
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
        model = _client(tracking_uri).get_registered_model(model_name)
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
    client = _client(tracking_uri)
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

    client = _client(tracking_uri)
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
