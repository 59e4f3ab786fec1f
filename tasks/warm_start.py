"""Warm start: training that continues from the champion's weights, with grown vocabularies.

With `train.warm_start: champion` the train step starts from the registry's champion
instead of a random start (`prepare_warm_start`, then `WarmStart.grow` and `WarmStart.apply`
inside `tasks.train.train_esmm`):

- **vocabularies grow**: each field's vocabulary is the union of the champion's (read from
  its own `IntegerLookup` layers, so any champion carries it) and today's `vocab.parquet`.
  An id the champion knew keeps its learnt row; an id new today gets a row of its own,
  started from the champion's out-of-vocabulary row (what the champion made of it so far),
  so that before the first step the model predicts exactly what the champion predicts, for
  every input. With `train.warm_start_retire_after: K > 0`, an id absent from the last K
  nights' vocabularies is dropped (it falls back to the OOV row); the nights each id has
  gone unseen are kept in `id_ages.parquet`, logged with every registered version;
- **every other weight** (towers, logit biases, interaction layers) is the champion's;
- **the optimiser starts fresh**: Adam's moments are not carried over. They describe the
  champion's last steps on yesterday's data, its step count would mute the bias correction
  that makes Adam's first steps on new data well-sized, and the saved `.keras` stays a
  plain model whose tables may change shape from night to night;
- the saved model is an ordinary model (`model.keras`, served and evaluated as any other);
  `warm_start.json` records where it started (`from_version`, the id counts), and the
  register step tags the version with `warm_started_from`.

The model code (`models/`) knows nothing of this: the warm start only sets weights of a
model built by `tasks.train.compiled_model`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.features import ALL_FIELDS
from tasks.config import Params, RegisterConfig

WARM_START_FILE = "warm_start.json"
ID_AGES_FILE = "id_ages.parquet"
ARTIFACT_FOLDER = "warm_start"  # the MLflow run's folder holding the two files
LINEAGE_TAG = "warm_started_from"
_OOV_ROWS = 1  # row 0 of every table: ids outside the vocabulary (models/graph.py)


@dataclass(frozen=True)
class _Source:
    """The champion's weights, read into memory (no file stays open)."""

    version: str
    vocab: dict[str, np.ndarray]  # field -> sorted ids of its lookup
    tables: dict[str, np.ndarray]  # embedding layer name -> (rows, dim) table
    weights: dict[str, list[np.ndarray]]  # any other layer with weights -> its weights
    ages: dict[str, np.ndarray] | None  # field -> nights unseen per vocab id (None: unknown)


@dataclass
class WarmStart:
    """A warm start from one champion: grows the vocabularies, then sets a built model's
    weights from the champion's; records what it did in `out_dir`."""

    source: _Source | None  # None: no champion yet, a cold start that still records ages
    retire_after: int = 0
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # field -> counts
    ages: dict[str, np.ndarray] = field(default_factory=dict)  # field -> unseen, per vocab id
    vocab: dict[str, np.ndarray] = field(default_factory=dict)  # the grown vocabularies

    @property
    def fingerprint(self) -> str:
        """What a resumed checkpoint must share: the champion started from."""
        return f"-warm{self.source.version}" if self.source is not None else ""

    def grow(self, today: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The vocabularies of the model to train: the champion's ids (minus the retired)
        and today's, sorted; today's alone on a cold start."""
        self.vocab, self.ages, self.stats = {}, {}, {}
        for name in ALL_FIELDS:
            seen = np.asarray(today[name], dtype=np.int64)
            if self.source is None:
                self.vocab[name], self.ages[name] = seen, np.zeros(len(seen), dtype=np.int64)
                self.stats[name] = {"known": 0, "new": len(seen), "retired": 0}
                continue
            old = self.source.vocab[name]
            old_age = (
                self.source.ages[name]
                if self.source.ages is not None and name in self.source.ages
                else np.zeros(len(old), dtype=np.int64)
            )
            unseen = ~np.isin(old, seen)
            age = np.where(unseen, old_age + 1, 0)
            keep = ~unseen | (self.retire_after == 0) | (age < self.retire_after)
            merged = np.union1d(old[keep], seen)
            ages = np.zeros(len(merged), dtype=np.int64)
            ages[np.searchsorted(merged, old[keep])] = age[keep]
            self.vocab[name], self.ages[name] = merged, ages
            self.stats[name] = {
                "known": int(np.isin(seen, old).sum()) + int((unseen & keep).sum()),
                "new": int((~np.isin(seen, old)).sum()),
                "retired": int((~keep).sum()),
            }
        return self.vocab

    def apply(self, model: Any) -> str:
        """Set `model`'s weights from the champion (model built from `grow`'s vocabularies);
        returns a one-line summary. Nothing happens on a cold start.

        Raises:
            ValueError: the champion's architecture differs from the model's (the `model:`
                section changed since it was trained); the message names the layer.
        """
        from models.layers import EmbeddingBag

        src = self.source
        if src is None:
            return "warm start: no champion yet, random start"
        for layer in model.layers:
            if not layer.weights or layer.name.startswith("lookup_"):
                continue
            if isinstance(layer, EmbeddingBag):
                name = layer.name.split("embedding_", 1)[1]
                old = src.tables.get(layer.name)
                layer.set_weights([_grown_table(old, src.vocab[name], self.vocab[name], layer)])
            else:
                _copy(layer, src.weights.get(layer.name), src.version)
        counts = {k: sum(s[k] for s in self.stats.values()) for k in ("known", "new", "retired")}
        return (
            f"warm start from champion version {src.version}: {counts['known']:,} known ids "
            f"keep their rows, {counts['new']:,} new ids get rows (from the OOV row), "
            f"{counts['retired']:,} retired; optimiser state fresh"
        )

    def record(self, out_dir: Path) -> None:
        """Write `warm_start.json` (lineage and counts) and `id_ages.parquet`."""
        out_dir = Path(out_dir)
        lineage = {
            "from_version": self.source.version if self.source is not None else None,
            "retire_after": self.retire_after,
            "optimizer_state": "fresh",
            "ids": {k: sum(s[k] for s in self.stats.values()) for k in ("known", "new", "retired")},
            "fields": self.stats,
        }
        (out_dir / WARM_START_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
        write_ages(out_dir / ID_AGES_FILE, self.vocab, self.ages)


def _grown_table(
    old_table: np.ndarray | None, old_vocab: np.ndarray, new_vocab: np.ndarray, layer: Any
) -> np.ndarray:
    """The table of `new_vocab`: known ids' rows and the OOV row from `old_table`, new ids
    from the OOV row."""
    if old_table is None:
        raise ValueError(f"the champion has no layer {layer.name!r}: set train.warm_start: none")
    width = layer.embeddings.shape[1]
    if old_table.shape[1] != width:
        raise ValueError(
            f"layer {layer.name!r}: the champion's rows are {old_table.shape[1]} wide, this "
            f"model's {width} (the model: section changed): set train.warm_start: none once"
        )
    table = np.repeat(old_table[:_OOV_ROWS], len(new_vocab) + _OOV_ROWS, axis=0)
    at = np.searchsorted(old_vocab, new_vocab)
    known = (at < len(old_vocab)) & (old_vocab[np.minimum(at, len(old_vocab) - 1)] == new_vocab)
    table[np.flatnonzero(known) + _OOV_ROWS] = old_table[at[known] + _OOV_ROWS]
    return table


def _copy(layer: Any, weights: list[np.ndarray] | None, version: str) -> None:
    """Set a non-embedding layer's weights to the champion's, shapes checked."""
    mine = [tuple(w.shape) for w in layer.get_weights()]
    theirs = [tuple(w.shape) for w in weights] if weights is not None else None
    if mine != theirs:
        raise ValueError(
            f"champion version {version}: layer {layer.name!r} has weights {theirs}, this "
            f"model {mine} (the model: section changed): set train.warm_start: none once"
        )
    layer.set_weights(weights)


def read_source(model_path: Path, version: str, ages_path: Path | None = None) -> _Source:
    """Read a saved ESMM's vocabularies and weights (and its ids' ages, if given)."""
    import keras

    import models.esmm  # noqa: F401  (registers the custom layers for loading)
    from models.layers import EmbeddingBag

    model = keras.models.load_model(model_path, compile=False)
    vocab, tables, weights = {}, {}, {}
    for layer in model.layers:
        if layer.name.startswith("lookup_"):
            ids = layer.get_vocabulary(include_special_tokens=False)
            vocab[layer.name.removeprefix("lookup_")] = np.asarray(ids, dtype=np.int64)
        elif isinstance(layer, EmbeddingBag):
            tables[layer.name] = np.asarray(layer.get_weights()[0])
        elif layer.weights and not layer.name.startswith("lookup_"):
            weights[layer.name] = [np.asarray(w) for w in layer.get_weights()]
    ages = read_ages(ages_path, vocab) if ages_path is not None and ages_path.is_file() else None
    return _Source(version, vocab, tables, weights, ages)


def write_ages(path: Path, vocab: Mapping[str, np.ndarray], ages: Mapping[str, np.ndarray]) -> None:
    """`id_ages.parquet`: field, feature_id, unseen (nights), for every vocabulary id."""
    tables = [
        pa.table(
            {
                "field": pa.array([name] * len(ids), pa.string()),
                "feature_id": pa.array(ids, pa.int64()),
                "unseen": pa.array(ages[name], pa.int64()),
            }
        )
        for name, ids in vocab.items()
    ]
    pq.write_table(pa.concat_tables(tables), path)


def read_ages(path: Path, vocab: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Nights unseen per id of `vocab`, from `id_ages.parquet` (ids it lacks: 0)."""
    table = pq.read_table(path)
    out = {}
    for name, ids in vocab.items():
        rows = table.filter(pc.equal(table["field"], name))
        known, unseen = rows["feature_id"].to_numpy(), rows["unseen"].to_numpy()
        order = np.argsort(known)
        known, unseen = known[order], unseen[order]
        at = np.minimum(np.searchsorted(known, ids), max(len(known) - 1, 0))
        hit = (known[at] == ids) if len(known) else np.zeros(len(ids), dtype=bool)
        out[name] = np.where(hit, unseen[at] if len(known) else 0, 0).astype(np.int64)
    return out


def prepare_warm_start(params: Params, verbose: int = 1) -> WarmStart | None:
    """The warm start `params` ask for: None with `train.warm_start: none`; else one from
    the registry's champion (with its ids' ages), or a cold start that records ages when
    there is no champion yet."""
    if params.train.warm_start == "none":
        return None
    retire = params.train.warm_start_retire_after
    with tempfile.TemporaryDirectory(prefix="esmm-warm-start-") as tmp:
        source = _fetch_source(params.register_, Path(tmp))
    if source is None and verbose:
        print("warm start: no champion in the registry yet; this night starts cold", flush=True)
    return WarmStart(source, retire)


def _fetch_source(cfg: RegisterConfig, dest: Path) -> _Source | None:
    """The champion's weights and its ids' ages (from its run's `warm_start/` artefacts)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from tasks.champion import fetch_champion
    from tasks.tracking import mlflow_client, resolve_tracking_uri

    champion = fetch_champion(cfg, dest / "model")
    if champion is None:
        return None
    uri = resolve_tracking_uri(cfg.tracking_uri)
    run_id = mlflow_client(uri).get_model_version(cfg.model_name, champion.version).run_id
    ages_path = None
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=f"{ARTIFACT_FOLDER}/{ID_AGES_FILE}",
            dst_path=str(dest / "ages"),
            tracking_uri=uri,
        )
        ages_path = Path(local)
    except (MlflowException, OSError):
        ages_path = None  # a version registered before warm starts existed: ages unknown (0)
    return read_source(champion.model_path, champion.version, ages_path)


def lineage_tags(train_dir: Path) -> dict[str, str]:
    """The registered version's lineage tag from the train step's `warm_start.json`:
    `warm_started_from` (a version, or `none` for a cold start); empty without the file."""
    path = Path(train_dir) / WARM_START_FILE
    if not path.is_file():
        return {}
    version = json.loads(path.read_text()).get("from_version")
    return {LINEAGE_TAG: str(version) if version is not None else "none"}
