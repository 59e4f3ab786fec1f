"""`synthesize_ali_ccp`: checks the arguments, draws the world and calibrates the biases,
then writes each split chunk by chunk, the defects manifest and `oracle.json`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aliccp.format import RAW_SPLITS
from aliccp.synth.defects import DEFECTS_FILE, Defects, resolve_defects, write_manifest
from aliccp.synth.profiles import SynthProfile, resolve_profile
from aliccp.synth.simulate import calibrate, draw_contexts, simulate
from aliccp.synth.streams import (
    CHUNK_STREAM,
    CONTEXT_STREAM,
    PILOT_STREAM,
    WORLD_STREAM,
    stream_rng,
)
from aliccp.synth.world import World, WorldSizes, build_world, layout
from aliccp.synth.writer import ORACLE_FILE, SplitCounts, SplitWriter

CHUNK_CONTEXTS = 2048  # contexts generated and written at a time

_Oracle = dict[str, float | int | None]  # one split's entry of oracle.json
_ManifestRow = tuple[str, int, str, str]  # (file, line, sample id or key, kind)


@dataclass(frozen=True)
class SynthSummary:
    """Result of `synthesize_ali_ccp`.

    Attributes:
        out_dir: directory the files were written to.
        files: every file written, in writing order.
        counts: split name -> its counts.
        oracle: the content of `oracle.json`: split name -> AUCs and counts.
        defects: kind -> lines listed in `defects.csv` (empty without defects).
    """

    out_dir: Path
    files: tuple[Path, ...]
    counts: Mapping[str, SplitCounts]
    oracle: Mapping[str, Mapping[str, float | int | None]]
    defects: Mapping[str, int] = dataclasses.field(default_factory=dict)


def synthesize_ali_ccp(
    out_dir: Path,
    n_train: int,
    n_test: int,
    seed: int,
    *,
    profile: str | SynthProfile = "default",
    defect_rate: float = 0.0,
    defects: Sequence[str] | str | None = None,
) -> SynthSummary:
    """Write a synthetic Ali-CCP data set with its ground truth and oracle AUCs.

    Args:
        out_dir: directory to write into; created if missing, existing files replaced.
        n_train: impressions in the train split; also sets the size of the world.
        n_test: impressions in the test split (new contexts of the same world).
        seed: non-negative seed; the same arguments give byte-identical files.
        profile: a name from `PROFILES` or a `SynthProfile`.
        defect_rate: share of lines written with a defect (see `aliccp.synth.defects`);
            0 writes none and no `defects.csv`.
        defects: kinds to inject, from `LINE_KINDS` (a sequence, or one comma-separated
            string); default every kind of `DEFECT_KINDS` (not `crlf`, which must be
            named).

    Returns:
        The files written, per-split counts, the oracle AUCs and the defects per kind.

    Raises:
        ValueError: a size is not a positive integer, the seed is negative, the profile
            name is unknown, the defect rate is outside [0, 1] or a defect kind is
            unknown; the message names the argument.
    """
    _check_positive("n_train", n_train)
    _check_positive("n_test", n_test)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    prof = resolve_profile(profile)
    kinds = resolve_defects(defect_rate, defects)
    sizes = WorldSizes.for_train_size(n_train, prof)
    world = build_world(sizes, prof, stream_rng(seed, WORLD_STREAM, 0))
    biases = calibrate(world, stream_rng(seed, PILOT_STREAM, 0))
    return write_data_set(
        Path(out_dir),
        world,
        biases,
        layout(sizes, seed),
        (n_train, n_test),
        seed,
        defect_rate,
        kinds,
    )


def write_data_set(
    out_dir: Path,
    world: World,
    biases: tuple[float, float],
    ids: Mapping[str, range],
    sizes: tuple[int, int],
    seed: int,
    defect_rate: float = 0.0,
    kinds: tuple[str, ...] = (),
) -> SynthSummary:
    """Write both splits of a drawn world, the defects manifest and `oracle.json`.

    Args:
        out_dir: directory to write into; created if missing, existing files replaced.
        world: the world the contexts are drawn from.
        biases: the calibrated (click, conversion) logit biases.
        ids: the feature-id layout (`layout`).
        sizes: impressions of the train and test splits.
        seed: the seed of the contexts, chunks, defects and context keys.
        defect_rate: share of lines written with a defect (0: none, no `defects.csv`).
        kinds: the defect kinds (resolved by `resolve_defects`).

    Returns:
        What `synthesize_ali_ccp` returns.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEFECTS_FILE).unlink(missing_ok=True)  # never leave a stale manifest
    files: list[Path] = []
    counts: dict[str, SplitCounts] = {}
    oracle: dict[str, _Oracle] = {}
    manifest: list[_ManifestRow] = []
    for split_index, (split, n_impressions) in enumerate(zip(RAW_SPLITS, sizes, strict=True)):
        injector = Defects(defect_rate, kinds, seed, split, split_index) if kinds else None
        writer = SplitWriter(out_dir, split, seed, ids, injector)
        _write_split(writer, world, biases, n_impressions, seed, split_index)
        files.extend(writer.paths)
        counts[split] = writer.counts()
        oracle[split] = writer.oracle()
        if injector is not None:
            manifest.extend(injector.manifest())

    by_kind: dict[str, int] = {}
    if kinds:
        files.append(write_manifest(out_dir / DEFECTS_FILE, manifest))
        for *_, kind in manifest:
            by_kind[kind] = by_kind.get(kind, 0) + 1
    oracle_path = out_dir / ORACLE_FILE
    oracle_path.write_text(json.dumps(oracle, sort_keys=True, indent=2) + "\n")
    files.append(oracle_path)
    return SynthSummary(
        out_dir=out_dir, files=tuple(files), counts=counts, oracle=oracle, defects=by_kind
    )


def _write_split(
    writer: SplitWriter,
    world: World,
    biases: tuple[float, float],
    n_impressions: int,
    seed: int,
    split_index: int,
) -> None:
    """Draw a split's contexts and write them, `CHUNK_CONTEXTS` at a time."""
    users, context_sizes = draw_contexts(
        world, n_impressions, stream_rng(seed, CONTEXT_STREAM, split_index)
    )
    with writer:
        for chunk_index, start in enumerate(range(0, len(users), CHUNK_CONTEXTS)):
            stop = start + CHUNK_CONTEXTS
            rng = stream_rng(seed, CHUNK_STREAM + split_index, chunk_index)
            block = simulate(world, users[start:stop], context_sizes[start:stop], rng)
            writer.write(block, *biases, rng)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
