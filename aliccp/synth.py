"""Seeded generator of synthetic Ali-CCP data: the exact raw format, plus ground truth.

The generator draws a world (users with profile fields and 14-day behaviour histories;
items with a category, shop, brand and intention nodes), then user contexts (one
`common_feature_index` each: a user plus one snapshot of that user's behaviour counts)
and, per context, a run of consecutive impressions. Every impression gets a true click
probability and a true conversion-given-click probability from a latent model over what a
model can see (user, item, category, shop, brand, position, profile fields and the
history matches written as the cross fields) plus a little hidden per-context noise.
Labels are Bernoulli draws from those probabilities; a conversion is only ever drawn
after a click.

Files written to `out_dir`:

- `sample_skeleton_{split}.csv`, `common_features_{split}.csv`: the raw Ali-CCP format
  (see `docs/ali_ccp_format.md`), for `split` in `train` and `test`.
- `ground_truth_{split}.csv`: `sample_id,p_ctr,p_cvr`, one row per impression.
- `oracle.json`: per split, the AUCs of the true probabilities against the drawn labels
  (the best any model can do on these labels) and the counts.
- `defects.csv` (only with `defect_rate > 0`): `file,line,sample_id,kind`, one row per
  line written with a deliberate defect (or CRLF ending), see below.

Profiles (`PROFILES`): `default` is small and dense (short histories, CTR 7%, CVR 12%);
`realistic` is shaped like the real Ali-CCP (CTR 4%, conversion given click 0.5%, about 25
impressions per context, behaviour lists of hundreds of entries, thousands of categories,
long-tailed item popularity).

Defects: with `defect_rate > 0` that share of skeleton lines, drawn independently from the
seed, is written with one defect each, of a kind drawn uniformly from the requested ones
that can occur in skeleton lines; `DEFECT_REASONS` maps every kind to the quarantine reason
of `tasks.ingest` that ingestion must give it. A defective skeleton line replaces its
impression (the impression is lost; the sample ids of all other lines are unchanged, so
the ids of lost impressions are missing). The same share of common lines is selected for
the kinds that can occur there; to keep every impression joinable, a common-file defect
is an added line right after the selected one: a copy of it under a new key (never used
by any impression) that carries the defect, or for `duplicate_key` an exact copy under the
same key (ingestion keeps the first). `crlf` is not a defect: the selected line is written
with a `\r\n` ending and stays valid. The ground truth, the counts and the oracle cover
the valid impressions only: exactly the skeleton lines not listed in `defects.csv` plus
the `crlf` ones, i.e. what ingestion keeps. Random draws for defects come from their own
streams, so every valid line is byte-identical to the output without defects.

Output is byte-identical for identical arguments. Work is vectorised with numpy and
pyarrow and done in chunks of contexts, so memory stays bounded for millions of
impressions.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.metrics import roc_auc_score

from aliccp.format import (
    R_COLUMNS,
    R_CONV_NO_CLICK,
    R_DUP_KEY,
    R_DUP_SAMPLE,
    R_EMPTY,
    R_ENTRY,
    R_FEATURE_NUM,
    R_LABEL,
    R_UNKNOWN_KEY,
    R_UTF8,
    RAW_SPLITS,
    common_file,
    skeleton_file,
)
from models.features import (
    ALL_FIELDS,
    COMMON_FIELDS,
    CROSSES,
    HISTORY_FIELDS,
    POSITION_FIELD,
    SKELETON_FIELDS,
    USER_ID_FIELD,
)

ORACLE_FILE = "oracle.json"
GROUND_TRUTH_HEADER = "sample_id,p_ctr,p_cvr"
PROBABILITY_DIGITS = 8  # decimals of p_ctr and p_cvr in the ground-truth files
DEFECTS_FILE = "defects.csv"
DEFECTS_HEADER = ("file", "line", "sample_id", "kind")

# Defect kind -> the reason `tasks.ingest` quarantines such a line with.
DEFECT_REASONS: Mapping[str, str] = {
    "truncated": R_COLUMNS,  # cut before its feature list: too few columns
    "separator": R_COLUMNS,  # ';' or a tab instead of every ','
    "label_text": R_LABEL,  # click or conversion not a number ('', 'x', 'true', ...)
    "label_range": R_LABEL,  # click or conversion a number other than 0 and 1
    "conversion_without_click": R_CONV_NO_CLICK,  # click 0, conversion 1
    "unknown_key": R_UNKNOWN_KEY,  # a common_feature_index not in the common file
    "feature_num": R_FEATURE_NUM,  # feature_num differs from the number of entries
    "empty": R_EMPTY,  # an empty line
    "utf8": R_UTF8,  # bytes that are not UTF-8 inside the line
    "duplicate_sample_id": R_DUP_SAMPLE,  # repeats the id of an earlier valid line
    "malformed_entry": R_ENTRY,  # one entry without its 0x02 or 0x03 or with a bad value
    "duplicate_key": R_DUP_KEY,  # common file: a key defined a second time
}
DEFECT_KINDS: tuple[str, ...] = tuple(DEFECT_REASONS)
CRLF = "crlf"  # not a defect: a valid line ending in \r\n (ingestion counts it)
LINE_KINDS: tuple[str, ...] = (*DEFECT_KINDS, CRLF)  # everything `defects` may name
# Kinds each file can carry (label, key and sample-id kinds are skeleton-only).
SKELETON_KINDS: frozenset[str] = frozenset(LINE_KINDS) - {"duplicate_key"}
COMMON_KINDS: frozenset[str] = frozenset(
    {"truncated", "separator", "feature_num", "empty", "utf8", "malformed_entry"}
    | {"duplicate_key", CRLF}
)

# Cross field -> (user history field, item field). A cross entry is written only when the
# context's history holds the item's category / shop / brand / intention node; its id
# encodes that matched entity (see `feature_id_ranges`) and its value is the history weight.
CROSS_FIELDS: Mapping[str, tuple[str, str]] = CROSSES

# Number of distinct values of the single-valued user profile fields (as in the real data).
PROFILE_CARDINALITY: Mapping[str, int] = {
    "121": 98,
    "122": 13,
    "124": 2,
    "125": 7,
    "126": 3,
    "127": 3,
    "128": 2,
    "129": 4,
}
PROFILE_FIELDS: tuple[str, ...] = tuple(PROFILE_CARDINALITY)

_ENTRY_SEP, _ID_SEP, _VALUE_SEP = "\x01", "\x02", "\x03"
_PLAIN_VALUE = "1.0"
_WEIGHT_DECIMALS = 5
_LATENT_DIM = 8  # shared user x item taste
_CVR_LATENT_DIM = 4  # conversion-only user x item fit
_NODES_PER_CATEGORY = 4  # intention nodes a category's items draw from
_MAX_ITEM_NODES = 3
_CHUNK_CONTEXTS = 2048  # contexts generated and written at a time
_USER_BLOCK = 2048  # users per block when drawing histories ...
_BLOCK_CELLS = _USER_BLOCK * 400  # ... at most this many (user, category) scores at once
_FULL_SORT_CATEGORIES = 400  # up to this many categories, histories sort every score
_HISTORY_USERS = 4096  # users per block of a large world's histories
_DRAW_PIECE = 1 << 20  # group draws done at a time (uniforms split without changing)
_PILOT_IMPRESSIONS = 20_000  # impressions simulated to calibrate the two biases

# Random streams: every draw comes from SeedSequence(seed, spawn_key=(stream, index)).
_WORLD_STREAM, _LAYOUT_STREAM, _PILOT_STREAM, _CONTEXT_STREAM, _CHUNK_STREAM = 1, 2, 3, 4, 5
_DEFECT_STREAM = 8  # SeedSequence(seed, spawn_key=(8, split index, chunk index))


@dataclass(frozen=True)
class SynthProfile:
    """Target rates, world sizes and signal strengths of one synthetic data profile.

    Attributes:
        name: profile name, as used in `params.yaml`.
        ctr: target share of impressions that are clicked.
        cvr: target share of clicks that convert.
        impressions_per_context: mean impressions of one user context.
        impressions_per_user: train impressions per user (sets the number of users).
        impressions_per_item: train impressions per item (sets the number of items).
        impressions_per_category: train impressions per category (sets the number of
            categories, between `min_categories` and `max_categories`).
        min_categories: fewest categories, whatever the size.
        max_categories: most categories, whatever the size.
        items_per_shop: items per shop (sets the number of shops).
        items_per_brand: items per brand (sets the number of brands).
        max_position: largest position id; later impressions of a context share it.
        history_categories: mean categories in a user's 14-day history (109_14).
        history_dispersion: spread of the history lengths between users: 0 gives
            Poisson lengths; a positive `a` draws each user's mean from a gamma with
            shape `a` first (coefficient of variation about 1 / sqrt(a)).
        shops_per_category: mean history shops per history category (110_14).
        brands_per_category: mean history brands per history category (127_14).
        nodes_per_category: mean history intention nodes per history category (150_14).
        history_count: typical behaviour count of a history entry in one snapshot.
        personal_share: share of impressions recommended from the user's history
            categories; the rest follow global popularity.
        no_brand_share: share of items without a brand (216 absent).
        item_popularity_spread: sigma of the log-normal item popularity within a
            category; larger is a longer tail.
        affinity: weight of the user x item taste in the click logit.
        cvr_affinity: weight of the same taste in the conversion logit (shared part).
        cvr_fit: weight of the conversion-only user x item fit.
        id_effect: spread of the per-category, per-brand and per-item click effects and
            of the per-item conversion effects.
        cvr_id_effect: spread of the per-category and per-brand conversion effects.
        profile_effect: spread of the gender and age x category effects.
        position_effect: click logit lost per unit of log(1 + position).
        category_match: click weight of log(1 + history count of the item's category).
        shop_match: click and conversion weight of the shop history count.
        brand_match: conversion weight of the brand history count.
        node_match: click weight of the largest matched intention-node count.
        price_fit: conversion weight of consumption level x brand price tier fit.
        clickbait_share: share of items that attract clicks but convert badly, and
            equally of items that are rarely clicked but convert well.
        context_noise: spread of the hidden per-context effect (both logits).
    """

    name: str
    ctr: float = 0.07
    cvr: float = 0.12
    impressions_per_context: float = 15.0
    impressions_per_user: int = 100
    impressions_per_item: int = 20
    impressions_per_category: int = 250
    min_categories: int = 40
    max_categories: int = 400
    items_per_shop: int = 5
    items_per_brand: int = 8
    max_position: int = 49
    history_categories: float = 12.0
    history_dispersion: float = 0.0
    shops_per_category: float = 1.5
    brands_per_category: float = 1.3
    nodes_per_category: float = 1.5
    history_count: float = 3.0
    personal_share: float = 0.6
    no_brand_share: float = 0.05
    item_popularity_spread: float = 1.0
    affinity: float = 0.4
    cvr_affinity: float = 0.3
    cvr_fit: float = 0.3
    id_effect: float = 0.3
    cvr_id_effect: float = 0.5
    profile_effect: float = 0.25
    position_effect: float = 0.2
    category_match: float = 0.3
    shop_match: float = 0.2
    brand_match: float = 0.3
    node_match: float = 0.15
    price_fit: float = 0.3
    clickbait_share: float = 0.08
    context_noise: float = 0.2


PROFILES: Mapping[str, SynthProfile] = {
    # Small, dense and quick to learn: short histories, high rates (the default data set).
    "default": SynthProfile(name="default"),
    # Shaped like the real Ali-CCP (ESMM paper, Table 1: 0.4M users, 4.3M items, 84M
    # impressions, 3.4M clicks, 18k conversions): CTR about 4%, conversion given click about
    # 0.5%, about 25 impressions per context, about 210 impressions per user and 20 per
    # item, thousands of categories, long-tailed item popularity, and behaviour lists of
    # hundreds of entries per context (medians at 1M-10M impressions: 109_14 about 120,
    # 110_14 about 320, 127_14 about 160, 150_14 about 140; a bit shorter in small worlds).
    "realistic": SynthProfile(
        name="realistic",
        ctr=0.04,
        cvr=0.005,
        impressions_per_context=25.0,
        impressions_per_user=210,
        impressions_per_item=20,
        impressions_per_category=1250,
        min_categories=600,
        max_categories=8000,
        items_per_shop=2,
        items_per_brand=4,
        history_categories=150.0,
        history_dispersion=3.0,
        shops_per_category=3.8,
        brands_per_category=1.8,
        nodes_per_category=1.6,
        item_popularity_spread=2.0,
    ),
}


@dataclass(frozen=True)
class SplitCounts:
    """What one split holds.

    Attributes:
        impressions: valid skeleton lines (all of them without defects); the rows of the
            ground truth.
        contexts: valid common-feature lines (distinct `common_feature_index` keys).
        clicks: valid impressions with click 1.
        conversions: valid impressions with conversion 1 (always clicked).
        defective_lines: lines of the split's two files written with a defect (not
            counting `crlf` lines).
    """

    impressions: int
    contexts: int
    clicks: int
    conversions: int
    defective_lines: int = 0


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


def ground_truth_file(split: str) -> str:
    """File name of a split's ground-truth probabilities."""
    return f"ground_truth_{split}.csv"


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
        defect_rate: share of lines written with a defect (see the module docstring);
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
    prof = _resolve_profile(profile)
    kinds = _resolve_defects(defect_rate, defects)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEFECTS_FILE).unlink(missing_ok=True)  # never leave a stale manifest
    sizes = _WorldSizes.for_train_size(n_train, prof)
    layout = _layout(sizes, seed)
    world = _build_world(sizes, prof, _rng(seed, _WORLD_STREAM, 0))
    bias_ctr, bias_cvr = _calibrate(world, _rng(seed, _PILOT_STREAM, 0))

    files: list[Path] = []
    counts: dict[str, SplitCounts] = {}
    oracle: dict[str, dict[str, float | int | None]] = {}
    sizes_by_split = (n_train, n_test)
    manifest: list[tuple[str, int, str, str]] = []
    for split_index, (split, n_impressions) in enumerate(
        zip(RAW_SPLITS, sizes_by_split, strict=True)
    ):
        injector = _Defects(defect_rate, kinds, seed, split, split_index) if kinds else None
        writer = _SplitWriter(out_dir, split, seed, layout, injector)
        context_rng = _rng(seed, _CONTEXT_STREAM, split_index)
        users, context_sizes = _draw_contexts(world, n_impressions, context_rng)
        with writer:
            for chunk_index, start in enumerate(range(0, len(users), _CHUNK_CONTEXTS)):
                stop = start + _CHUNK_CONTEXTS
                rng = _rng(seed, _CHUNK_STREAM + split_index, chunk_index)
                block = _simulate(world, users[start:stop], context_sizes[start:stop], rng)
                writer.write(block, bias_ctr, bias_cvr, rng)
        files.extend(writer.paths)
        counts[split] = writer.counts()
        oracle[split] = writer.oracle()
        if injector is not None:
            manifest.extend(injector.manifest())

    by_kind: dict[str, int] = {}
    if kinds:
        files.append(_write_manifest(out_dir / DEFECTS_FILE, manifest))
        for *_, kind in manifest:
            by_kind[kind] = by_kind.get(kind, 0) + 1
    oracle_path = out_dir / ORACLE_FILE
    oracle_path.write_text(json.dumps(oracle, sort_keys=True, indent=2) + "\n")
    files.append(oracle_path)
    return SynthSummary(
        out_dir=out_dir, files=tuple(files), counts=counts, oracle=oracle, defects=by_kind
    )


def feature_id_ranges(
    n_train: int, seed: int, profile: str | SynthProfile = "default"
) -> dict[str, range]:
    """The feature-id range of every field for a given `n_train`, `seed` and profile.

    Entity `k` of a field (user, category, shop, ...) has id `ranges[field].start + k`.
    Fields that name the same kind of entity share its index: a 508 entry with id `x`
    says the item's category `k = x - ranges["508"].start` is in the user's history, i.e.
    the 206 id is `ranges["206"].start + k` and 109_14 holds `ranges["109_14"].start + k`
    (likewise 509/207/110_14 shops, 702/216/127_14 brands, 853/210/150_14 nodes).

    Args:
        n_train: train impressions, as passed to `synthesize_ali_ccp`.
        seed: seed, as passed to `synthesize_ali_ccp`.
        profile: profile, as passed to `synthesize_ali_ccp`.

    Returns:
        Field id -> range of its feature ids; ranges are disjoint.
    """
    return _layout(_WorldSizes.for_train_size(n_train, _resolve_profile(profile)), seed)


# --- world ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WorldSizes:
    users: int
    items: int
    categories: int
    shops: int
    brands: int
    nodes: int
    positions: int

    @classmethod
    def for_train_size(cls, n_train: int, profile: SynthProfile) -> _WorldSizes:
        categories = min(
            profile.max_categories,
            max(profile.min_categories, n_train // profile.impressions_per_category),
        )
        items = max(200, categories, n_train // profile.impressions_per_item)
        return cls(
            users=max(50, n_train // profile.impressions_per_user),
            items=items,
            categories=categories,
            shops=max(categories, items // profile.items_per_shop),
            brands=max(categories, items // profile.items_per_brand),
            nodes=max(2 * _NODES_PER_CATEGORY, 3 * categories),
            positions=profile.max_position + 1,
        )

    def cardinalities(self) -> dict[str, int]:
        entity_count = {
            USER_ID_FIELD: self.users,
            "205": self.items,
            POSITION_FIELD: self.positions,
            **dict.fromkeys(("109_14", "206", "508"), self.categories),
            **dict.fromkeys(("110_14", "207", "509"), self.shops),
            **dict.fromkeys(("127_14", "216", "702"), self.brands),
            **dict.fromkeys(("150_14", "210", "853"), self.nodes),
            **PROFILE_CARDINALITY,
        }
        return {f: entity_count[f] for f in ALL_FIELDS}


def _layout(sizes: _WorldSizes, seed: int) -> dict[str, range]:
    """Disjoint id ranges, laid out in a seeded field order with seeded gaps."""
    rng = _rng(seed, _LAYOUT_STREAM, 0)
    cardinality = sizes.cardinalities()
    start = 1 + int(rng.integers(0, 1000))
    ranges: dict[str, range] = {}
    for i in rng.permutation(len(ALL_FIELDS)):
        field = ALL_FIELDS[i]
        ranges[field] = range(start, start + cardinality[field])
        start += cardinality[field] + int(rng.integers(1, 1000))
    return {f: ranges[f] for f in ALL_FIELDS}


@dataclass(frozen=True)
class _GroupSampler:
    """Draws one member of a given group, with probability proportional to its weight."""

    members: np.ndarray  # member indices, sorted by group
    cumulative: np.ndarray  # cumulative weights in that order
    start: np.ndarray  # group g holds positions start[g] .. start[g + 1] - 1 (never empty)

    @classmethod
    def build(cls, group: np.ndarray, weight: np.ndarray, n_groups: int) -> _GroupSampler:
        members = np.argsort(group, kind="stable")
        start = np.searchsorted(group[members], np.arange(n_groups + 1))
        if np.any(np.diff(start) == 0):
            raise ValueError("every group needs at least one member")
        return cls(members, np.cumsum(weight[members]), start)

    def draw(self, group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if len(group) > _DRAW_PIECE:  # in pieces, to bound the temporaries; same draws
            out = np.empty(len(group), dtype=self.members.dtype)
            for lo in range(0, len(group), _DRAW_PIECE):
                out[lo : lo + _DRAW_PIECE] = self._draw(group[lo : lo + _DRAW_PIECE], rng)
            return out
        return self._draw(group, rng)

    def _draw(self, group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.start[group], self.start[group + 1]
        below = np.where(lo > 0, self.cumulative[lo - 1], 0.0)
        target = below + rng.random(len(group)) * (self.cumulative[hi - 1] - below)
        position = np.clip(np.searchsorted(self.cumulative, target, side="right"), lo, hi - 1)
        return self.members[position]


@dataclass(frozen=True)
class _Lists:
    """Per-user variable-length lists (CSR): user u owns entries offsets[u]:offsets[u+1]."""

    offsets: np.ndarray
    entity: np.ndarray
    rate: np.ndarray  # expected behaviour count per snapshot


@dataclass(frozen=True)
class _World:
    """Everything fixed before contexts are drawn; indices are entity indices, not ids."""

    sizes: _WorldSizes
    profile: SynthProfile
    # users
    user_profile: np.ndarray  # (users, len(PROFILE_FIELDS)) value index per profile field
    user_taste: np.ndarray  # (users, _LATENT_DIM)
    user_fit: np.ndarray  # (users, _CVR_LATENT_DIM)
    user_activity: np.ndarray  # probability of each user per context
    history: Mapping[str, _Lists]  # history field -> per-user lists
    # items
    item_category: np.ndarray
    item_shop: np.ndarray
    item_brand: np.ndarray  # -1: no brand
    item_nodes: np.ndarray  # (items, _MAX_ITEM_NODES), -1 padded
    item_taste: np.ndarray
    item_fit: np.ndarray
    item_ctr: np.ndarray
    item_cvr: np.ndarray
    item_price_tier: np.ndarray  # 0..2, from the brand (1 without brand)
    category_gender: np.ndarray
    category_age: np.ndarray  # (categories, 7)
    category_ctr: np.ndarray
    category_cvr: np.ndarray
    brand_ctr: np.ndarray  # one extra trailing 0 for "no brand" (index -1)
    brand_cvr: np.ndarray
    category_sampler: _GroupSampler  # global category popularity
    item_sampler: _GroupSampler  # items of a category, by item popularity


def _build_world(sizes: _WorldSizes, profile: SynthProfile, rng: np.random.Generator) -> _World:
    n_cat, spread = sizes.categories, profile.id_effect
    # Categories.
    category_taste = rng.normal(0.0, 1.0 / math.sqrt(_LATENT_DIM), (n_cat, _LATENT_DIM))
    category_fit = rng.normal(0.0, 0.8 / math.sqrt(_CVR_LATENT_DIM), (n_cat, _CVR_LATENT_DIM))
    category_popularity = rng.normal(0.0, 1.0, n_cat)
    category_gender = rng.normal(0.0, profile.profile_effect, n_cat)
    category_age = rng.normal(0.0, profile.profile_effect, (n_cat, PROFILE_CARDINALITY["125"]))
    if n_cat > _FULL_SORT_CATEGORIES:  # large worlds: no (categories, nodes) matrix
        category_nodes = _distinct_draws(n_cat, sizes.nodes, _NODES_PER_CATEGORY, rng)
    else:
        category_nodes = np.argsort(rng.random((n_cat, sizes.nodes)), axis=1)
        category_nodes = category_nodes[:, :_NODES_PER_CATEGORY]

    # Shops and brands belong to one category each; every category has at least one.
    shop_category = _grouped(sizes.shops, category_popularity, rng)
    shop_sampler = _GroupSampler.build(shop_category, rng.lognormal(0.0, 1.0, sizes.shops), n_cat)
    brand_category = _grouped(sizes.brands, category_popularity, rng)
    brand_sampler = _GroupSampler.build(
        brand_category, rng.lognormal(0.0, 1.0, sizes.brands), n_cat
    )
    brand_tier = rng.integers(0, 3, sizes.brands)

    # Items.
    item_category = _grouped(sizes.items, category_popularity, rng)
    item_shop = shop_sampler.draw(item_category, rng)
    item_brand = np.where(
        rng.random(sizes.items) < profile.no_brand_share, -1, brand_sampler.draw(item_category, rng)
    )
    n_nodes = rng.choice(_MAX_ITEM_NODES + 1, size=sizes.items, p=[0.03, 0.5, 0.3, 0.17])
    node_order = np.argsort(rng.random((sizes.items, _NODES_PER_CATEGORY)), axis=1)
    picked = np.take_along_axis(category_nodes[item_category], node_order, axis=1)
    item_nodes = np.where(
        np.arange(_MAX_ITEM_NODES) < n_nodes[:, None], picked[:, :_MAX_ITEM_NODES], -1
    )
    item_taste = category_taste[item_category] + rng.normal(
        0.0, 0.5 / math.sqrt(_LATENT_DIM), (sizes.items, _LATENT_DIM)
    )
    item_fit = category_fit[item_category] + rng.normal(
        0.0, 0.6 / math.sqrt(_CVR_LATENT_DIM), (sizes.items, _CVR_LATENT_DIM)
    )
    item_ctr = rng.normal(0.0, spread, sizes.items)
    item_cvr = 0.2 * item_ctr + rng.normal(0.0, spread, sizes.items)
    # Attractive items that convert badly, and unattractive ones that convert well.
    kind = rng.random(sizes.items)
    clickbait = kind < profile.clickbait_share
    hidden_gem = (kind >= profile.clickbait_share) & (kind < 2 * profile.clickbait_share)
    item_ctr = item_ctr + 0.8 * clickbait - 0.5 * hidden_gem
    item_cvr = item_cvr - 1.2 * clickbait + 0.8 * hidden_gem
    item_price_tier = np.where(item_brand >= 0, brand_tier[item_brand], 1)
    item_popularity = rng.lognormal(0.0, profile.item_popularity_spread, sizes.items)

    # Users.
    gender = rng.integers(0, 2, sizes.users)
    age = rng.choice(7, size=sizes.users, p=[0.05, 0.2, 0.3, 0.2, 0.12, 0.08, 0.05])
    user_taste = rng.normal(0.0, 1.0, (sizes.users, _LATENT_DIM))
    user_fit = rng.normal(0.0, 1.0, (sizes.users, _CVR_LATENT_DIM))
    consumption = rng.choice(3, size=sizes.users, p=[0.3, 0.45, 0.25])
    consumption_ii = np.where(
        rng.random(sizes.users) < 0.7, consumption, rng.integers(0, 3, sizes.users)
    )
    # 121: the user's nearest "profile category" centre in taste space.
    centres = rng.normal(0.0, 1.0, (PROFILE_CARDINALITY["121"], _LATENT_DIM))
    profile_category = np.argmax(user_taste @ centres.T, axis=1)
    columns = {
        "121": profile_category,
        "122": gender * 6 + np.minimum(age, 5),
        "124": gender,
        "125": age,
        "126": consumption,
        "127": consumption_ii,
        "128": rng.integers(0, 2, sizes.users),
        "129": rng.choice(4, size=sizes.users, p=[0.4, 0.3, 0.2, 0.1]),
    }
    user_profile = np.stack([columns[f] for f in PROFILE_FIELDS], axis=1)
    activity = rng.lognormal(0.0, 0.8, sizes.users)

    # Behaviour histories: categories by preference, then shops, brands and nodes in them.
    gender_sign = np.where(gender == 1, 1.0, -1.0)

    def preference(users: np.ndarray) -> np.ndarray:
        """Score of each user (row) for each category (column)."""
        return (
            user_taste[users] @ category_taste.T
            + gender_sign[users, None] * category_gender
            + 0.5 * category_popularity
        )

    history = _draw_histories(
        preference, category_nodes, shop_sampler, brand_sampler, sizes, profile, rng
    )
    no_brand = np.zeros(1)
    return _World(
        sizes=sizes,
        profile=profile,
        user_profile=user_profile,
        user_taste=user_taste,
        user_fit=user_fit,
        user_activity=activity / activity.sum(),
        history=history,
        item_category=item_category,
        item_shop=item_shop,
        item_brand=item_brand,
        item_nodes=item_nodes,
        item_taste=item_taste,
        item_fit=item_fit,
        item_ctr=item_ctr,
        item_cvr=item_cvr,
        item_price_tier=item_price_tier,
        category_gender=category_gender,
        category_age=category_age,
        category_ctr=rng.normal(0.0, spread, n_cat),
        category_cvr=rng.normal(0.0, profile.cvr_id_effect, n_cat),
        brand_ctr=np.concatenate([rng.normal(0.0, spread, sizes.brands), no_brand]),
        brand_cvr=np.concatenate([rng.normal(0.0, profile.cvr_id_effect, sizes.brands), no_brand]),
        category_sampler=_GroupSampler.build(
            np.zeros(n_cat, dtype=np.int64), np.exp(category_popularity), 1
        ),
        item_sampler=_GroupSampler.build(item_category, item_popularity, n_cat),
    )


def _distinct_draws(n_rows: int, n_values: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, k) values from range(n_values), distinct within a row (needs n_values >= k)."""
    out = rng.integers(0, n_values, (n_rows, k))
    while True:
        ordered = np.sort(out, axis=1)
        repeat = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not repeat.any():
            return out
        out[repeat] = rng.integers(0, n_values, (int(repeat.sum()), k))


def _grouped(n: int, log_weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Assign n members to groups: one to each group first, the rest by popularity."""
    n_groups = len(log_weight)
    p = np.exp(log_weight - log_weight.max())
    rest = rng.choice(n_groups, size=n - n_groups, p=p / p.sum())
    return np.concatenate([np.arange(n_groups), rest])


def _draw_histories(
    preference: Callable[[np.ndarray], np.ndarray],
    category_nodes: np.ndarray,
    shop_sampler: _GroupSampler,
    brand_sampler: _GroupSampler,
    sizes: _WorldSizes,
    profile: SynthProfile,
    rng: np.random.Generator,
) -> dict[str, _Lists]:
    """Each user's 14-day behaviour lists; categories are a top-k of a noisy preference.

    Large worlds (more than `_FULL_SORT_CATEGORIES` categories) are drawn a block of
    `_HISTORY_USERS` users at a time and stored compactly (int32 ids, float32 rates), so
    the temporaries stay bounded; small worlds in one go.
    """
    args = (preference, category_nodes, shop_sampler, brand_sampler, sizes, profile, rng)
    if sizes.categories <= _FULL_SORT_CATEGORIES:
        return _draw_history_block(0, sizes.users, *args)
    parts = [
        _draw_history_block(lo, min(_HISTORY_USERS, sizes.users - lo), *args, compact=True)
        for lo in range(0, sizes.users, _HISTORY_USERS)
    ]
    lists = {}
    for field in HISTORY_FIELDS:
        pieces = [part.pop(field) for part in parts]
        shift = np.cumsum([0] + [len(piece.entity) for piece in pieces[:-1]])
        lists[field] = _Lists(
            offsets=np.concatenate(
                [pieces[0].offsets[:1]]
                + [piece.offsets[1:] + at for piece, at in zip(pieces, shift, strict=True)]
            ),
            entity=np.concatenate([piece.entity for piece in pieces]),
            rate=np.concatenate([piece.rate for piece in pieces]),
        )
    return lists


def _draw_history_block(
    first_user: int,
    n_users: int,
    preference: Callable[[np.ndarray], np.ndarray],
    category_nodes: np.ndarray,
    shop_sampler: _GroupSampler,
    brand_sampler: _GroupSampler,
    sizes: _WorldSizes,
    profile: SynthProfile,
    rng: np.random.Generator,
    *,
    compact: bool = False,
) -> dict[str, _Lists]:
    """The behaviour lists of users first_user .. first_user + n_users - 1."""
    n_cat = sizes.categories
    users, cats, likings = [], [], []
    block_users = max(1, min(_USER_BLOCK, _BLOCK_CELLS // n_cat))
    end = first_user + n_users
    for lo in range(first_user, end, block_users):  # blocks bound the (users, categories) matrix
        block = np.arange(lo, min(lo + block_users, end))
        score = preference(block)
        mean_extra = profile.history_categories - 1
        if profile.history_dispersion > 0:
            shape = profile.history_dispersion
            mean_extra = rng.gamma(shape, mean_extra / shape, len(block))
        k = np.clip(1 + rng.poisson(mean_extra, len(block)), 1, n_cat)
        k_max = int(k.max())
        noisy = score + rng.gumbel(size=score.shape)
        if n_cat > _FULL_SORT_CATEGORIES:  # select the top k_max, then order only those
            part = np.argpartition(-noisy, k_max - 1, axis=1)[:, :k_max]
            order = np.argsort(-np.take_along_axis(noisy, part, axis=1), axis=1, kind="stable")
            top = np.take_along_axis(part, order, axis=1)
        else:
            top = np.argsort(-noisy, axis=1, kind="stable")[:, :k_max]
        rows, ranks = np.nonzero(np.arange(k_max) < k[:, None])
        users.append(block[rows] - first_user)
        cats.append(top[rows, ranks])
        likings.append(score[rows, top[rows, ranks]])
    user, category, liking = np.concatenate(users), np.concatenate(cats), np.concatenate(likings)
    rate = profile.history_count * np.exp(
        0.4 * (liking - liking.mean()) + rng.normal(0.0, 0.5, len(user))
    )

    lists = {"109_14": _to_lists(user, category, rate, n_users, n_cat, compact)}
    # Shops, brands and nodes: a few per history category, each with part of its rate.
    kinds = (
        ("110_14", profile.shops_per_category, sizes.shops),
        ("127_14", profile.brands_per_category, sizes.brands),
        ("150_14", profile.nodes_per_category, sizes.nodes),
    )
    for field, mean_per_category, n_entities in kinds:
        parent = np.repeat(np.arange(len(user)), 1 + rng.poisson(mean_per_category - 1, len(user)))
        parent_category = category[parent]
        if field == "110_14":
            entity = shop_sampler.draw(parent_category, rng)
        elif field == "127_14":
            entity = brand_sampler.draw(parent_category, rng)
        else:
            entity = category_nodes[
                parent_category, rng.integers(0, _NODES_PER_CATEGORY, len(parent))
            ]
        share = rng.uniform(0.2, 1.0, len(parent))
        lists[field] = _to_lists(
            user[parent], entity, rate[parent] * share, n_users, n_entities, compact
        )
    return lists


def _to_lists(
    user: np.ndarray,
    entity: np.ndarray,
    rate: np.ndarray,
    n_users: int,
    n_entities: int,
    compact: bool = False,
) -> _Lists:
    """Per-user lists sorted by entity; a repeated (user, entity) keeps its first rate."""
    key, first = np.unique(user * n_entities + entity, return_index=True)
    offsets = np.searchsorted(key // n_entities, np.arange(n_users + 1))
    if compact:
        return _Lists(
            offsets=offsets,
            entity=(key % n_entities).astype(np.int32),
            rate=rate[first].astype(np.float32),
        )
    return _Lists(offsets=offsets, entity=key % n_entities, rate=rate[first])


# --- contexts and impressions -----------------------------------------------------------


def _draw_contexts(
    world: _World, n_impressions: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Users and impression counts of a split's contexts, summing to n_impressions."""
    mean_extra = world.profile.impressions_per_context - 1.0
    dispersion = 2.0
    sizes: list[np.ndarray] = []
    total = 0
    while total < n_impressions:
        batch = int((n_impressions - total) / world.profile.impressions_per_context) + 16
        drawn = 1 + rng.negative_binomial(dispersion, dispersion / (dispersion + mean_extra), batch)
        sizes.append(drawn)
        total += int(drawn.sum())
    size = np.concatenate(sizes)
    cumulative = np.cumsum(size)
    n_contexts = int(np.searchsorted(cumulative, n_impressions)) + 1
    size = size[:n_contexts]
    size[-1] -= int(cumulative[n_contexts - 1]) - n_impressions
    users = rng.choice(world.sizes.users, size=n_contexts, p=world.user_activity)
    return users, size


@dataclass(frozen=True)
class _Entries:
    """Weighted entries of one field, sorted by line: (line, entity, behaviour count)."""

    line: np.ndarray
    entity: np.ndarray
    count: np.ndarray

    def lookup(self, line: np.ndarray, entity: np.ndarray, n_entities: int) -> np.ndarray:
        """Count of `entity` on `line`, 0 when absent; entities must be sorted per line."""
        if len(self.line) == 0:
            return np.zeros(len(line), dtype=np.int64)
        keys = self.line * n_entities + self.entity
        query = line * n_entities + entity
        position = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        return np.where(keys[position] == query, self.count[position], 0)

    def where(self, keep: np.ndarray) -> _Entries:
        return _Entries(self.line[keep], self.entity[keep], self.count[keep])


@dataclass(frozen=True)
class _Block:
    """A chunk of contexts with their impressions and label-free truth."""

    context_user: np.ndarray
    context_profile: np.ndarray  # (contexts, len(PROFILE_FIELDS))
    snapshots: Mapping[str, _Entries]  # history field -> entries, line = context
    impression_context: np.ndarray
    item: np.ndarray
    category: np.ndarray
    shop: np.ndarray
    brand: np.ndarray  # -1: none
    position: np.ndarray
    node_row: np.ndarray  # (impression, node) pairs of field 210, in impression order
    node: np.ndarray
    crosses: Mapping[str, _Entries]  # cross field -> entries, line = impression
    logit_ctr: np.ndarray  # without the calibrated bias
    logit_cvr: np.ndarray
    hidden_ctr: np.ndarray  # the per-context noise inside logit_ctr (seen by no model)
    hidden_cvr: np.ndarray


def _simulate(
    world: _World, context_user: np.ndarray, context_size: np.ndarray, rng: np.random.Generator
) -> _Block:
    """Draw the snapshots and impressions of a chunk of contexts and their true logits."""
    prof, sizes = world.profile, world.sizes
    n_contexts, n = len(context_user), int(context_size.sum())

    # Snapshots: each history entry's count this time, 0 dropping the entry.
    activity = rng.lognormal(0.0, 0.4, n_contexts)
    snapshots = {}
    for field in HISTORY_FIELDS:
        lists = world.history[field]
        context, index = _ranges(lists.offsets[context_user], np.diff(lists.offsets)[context_user])
        count = rng.poisson(lists.rate[index] * activity[context])
        keep = count > 0
        snapshots[field] = _Entries(context[keep], lists.entity[index][keep], count[keep])

    # Impressions: from the user's history categories or by global popularity.
    impression_context = np.repeat(np.arange(n_contexts), context_size)
    first = np.cumsum(context_size) - context_size
    position = np.minimum(np.arange(n) - first[impression_context], sizes.positions - 1)
    user = context_user[impression_context]
    categories = world.history["109_14"]
    pick = categories.offsets[user] + (rng.random(n) * np.diff(categories.offsets)[user]).astype(
        np.int64
    )
    personal = rng.random(n) < prof.personal_share
    popular = world.category_sampler.draw(np.zeros(n, dtype=np.int64), rng)
    item = world.item_sampler.draw(np.where(personal, categories.entity[pick], popular), rng)
    category, shop, brand = world.item_category[item], world.item_shop[item], world.item_brand[item]
    node_row, node_slot = np.nonzero(world.item_nodes[item] >= 0)
    node = world.item_nodes[item[node_row], node_slot]

    # Crosses: the history count of the item's category / shop / brand / nodes (0: none).
    ctx = impression_context
    every = np.arange(n)
    has_brand = brand >= 0
    brand_count = np.zeros(n, dtype=np.int64)
    brand_count[has_brand] = snapshots["127_14"].lookup(
        ctx[has_brand], brand[has_brand], sizes.brands
    )
    category_count = snapshots["109_14"].lookup(ctx, category, sizes.categories)
    shop_count = snapshots["110_14"].lookup(ctx, shop, sizes.shops)
    node_count = snapshots["150_14"].lookup(ctx[node_row], node, sizes.nodes)
    candidates = {
        "508": _Entries(every, category, category_count),
        "509": _Entries(every, shop, shop_count),
        "702": _Entries(every, brand, brand_count),
        "853": _Entries(node_row, node, node_count),
    }
    crosses = {field: entries.where(entries.count > 0) for field, entries in candidates.items()}
    node_best = np.zeros(n)
    np.maximum.at(node_best, node_row, np.log1p(node_count))

    # True logits (before the calibrated biases).
    age = world.user_profile[user, PROFILE_FIELDS.index("125")]
    gender_sign = np.where(world.user_profile[user, PROFILE_FIELDS.index("124")] == 1, 1.0, -1.0)
    consumption = world.user_profile[user, PROFILE_FIELDS.index("126")]
    taste = np.einsum("ij,ij->i", world.user_taste[user], world.item_taste[item])
    fit = np.einsum("ij,ij->i", world.user_fit[user], world.item_fit[item])
    price_fit = 1.0 - np.abs(consumption - world.item_price_tier[item])
    context_ctr = rng.normal(0.0, prof.context_noise, n_contexts)[impression_context]
    context_cvr = (
        0.3 * context_ctr + rng.normal(0.0, prof.context_noise, n_contexts)[impression_context]
    )
    logit_ctr = (
        prof.affinity * (taste + gender_sign * world.category_gender[category])
        + world.category_age[category, age]
        + world.category_ctr[category]
        + world.brand_ctr[brand]
        + world.item_ctr[item]
        - prof.position_effect * np.log1p(position)
        + prof.category_match * np.log1p(category_count)
        + prof.shop_match * np.log1p(shop_count)
        + prof.node_match * node_best
        + context_ctr
    )
    logit_cvr = (
        prof.cvr_affinity * taste
        + prof.cvr_fit * fit
        + world.category_cvr[category]
        + world.brand_cvr[brand]
        + world.item_cvr[item]
        + prof.price_fit * price_fit
        + prof.brand_match * np.log1p(brand_count)
        + prof.shop_match * np.log1p(shop_count)
        + context_cvr
    )
    return _Block(
        context_user=context_user,
        context_profile=world.user_profile[context_user],
        snapshots=snapshots,
        impression_context=impression_context,
        item=item,
        category=category,
        shop=shop,
        brand=brand,
        position=position,
        node_row=node_row,
        node=node,
        crosses=crosses,
        logit_ctr=logit_ctr,
        logit_cvr=logit_cvr,
        hidden_ctr=context_ctr,
        hidden_cvr=context_cvr,
    )


def _ranges(start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate index ranges start[i]:start[i]+length[i]; return (i, index) per element."""
    owner = np.repeat(np.arange(len(start)), length)
    offset = np.repeat(start - (np.cumsum(length) - length), length)
    return owner, np.arange(int(length.sum())) + offset


def _calibrate(world: _World, rng: np.random.Generator) -> tuple[float, float]:
    """Logit biases giving the profile's CTR and CVR on a pilot sample of impressions."""
    users, sizes = _draw_contexts(world, _PILOT_IMPRESSIONS, rng)
    block = _simulate(world, users, sizes, rng)
    bias_ctr = _solve_bias(block.logit_ctr, np.ones(len(block.logit_ctr)), world.profile.ctr)
    weight = _sigmoid(block.logit_ctr + bias_ctr)
    return bias_ctr, _solve_bias(block.logit_cvr, weight, world.profile.cvr)


def _solve_bias(logit: np.ndarray, weight: np.ndarray, target: float) -> float:
    """The b with weighted mean sigmoid(logit + b) == target, by bisection."""
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if np.average(_sigmoid(logit + mid), weights=weight) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --- defects ----------------------------------------------------------------------------

_BAD_LABELS = ("", "x", "true", "NaN", "-")
_OUT_OF_RANGE_LABELS = ("2", "-1", "10")
_BAD_BYTES = (b"\xff", b"\xc3\x28", b"\x80", b"\xfe\xfe")
_SEPARATORS = (";", "\t")
_FEATURE_NUM_ERRORS = (-1, 1, 7)


class _Defects:
    """Chooses, applies and records the defects of one split's files, a chunk at a time.

    Per chunk, `skeleton` must be called before `common`: both draw from the chunk's own
    stream, so the choice depends only on the seed, split, chunk, rate and kinds.
    """

    def __init__(
        self, rate: float, kinds: tuple[str, ...], seed: int, split: str, split_index: int
    ):
        self._rate, self._seed, self._split, self._split_index = rate, seed, split, split_index
        self._skeleton_kinds = tuple(k for k in kinds if k in SKELETON_KINDS)
        self._common_kinds = tuple(k for k in kinds if k in COMMON_KINDS)
        self._files = (skeleton_file(split), common_file(split))
        self._rows: tuple[list[tuple[str, int, str, str]], ...] = ([], [])
        self._lines = [0, 0]  # lines written so far to the skeleton and the common file
        self._chunk = -1
        self._rng = np.random.default_rng(0)  # replaced at every chunk
        self._last_valid_id: str | None = None  # of the skeleton file, across chunks
        self._new_keys = 0
        self.defective_lines = 0

    def manifest(self) -> list[tuple[str, int, str, str]]:
        """(file, line, sample id or key, kind) of every line written with a defect or CRLF."""
        return [*self._rows[0], *self._rows[1]]

    def skeleton(self, lines: pa.Array) -> tuple[dict[int, bytes], np.ndarray]:
        """Edits of a chunk's skeleton lines (index -> bytes) and which stay valid."""
        self._chunk += 1
        self._rng = _rng3(self._seed, _DEFECT_STREAM, self._split_index, self._chunk)
        n, first_line = len(lines), self._lines[0] + 1
        self._lines[0] += n
        valid = np.ones(n, dtype=bool)
        edits: dict[int, bytes] = {}
        if not self._skeleton_kinds:
            return edits, valid
        chosen, kinds, variant = self._choose(n, self._skeleton_kinds)
        valid[chosen[kinds != CRLF]] = False
        earlier_valid = np.maximum.accumulate(np.where(valid, np.arange(n), -1))
        texts = pc.take(lines, pa.array(chosen, type=pa.int64())).to_pylist()
        for i, kind, text, (u, v) in zip(chosen.tolist(), kinds, texts, variant, strict=True):
            line_no = first_line + i
            sample_id, rest = text.split(",", 1)
            if kind == "duplicate_sample_id":
                j = int(earlier_valid[i - 1]) if i > 0 else -1
                source = _first_column(lines[j].as_py()) if j >= 0 else self._last_valid_id
                if source is None:  # no earlier valid line in the file: left as it is
                    valid[i] = True
                    continue
                sample_id, data = source, f"{source},{rest}\n".encode()
            else:
                data = self._corrupt(kind, text, 6, u, v, line_no)
                sample_id = "" if kind == "empty" else sample_id
            edits[i] = data
            self._rows[0].append((self._files[0], line_no, sample_id, kind))
            self.defective_lines += kind != CRLF
        if valid.any():
            self._last_valid_id = _first_column(lines[int(np.flatnonzero(valid)[-1])].as_py())
        return edits, valid

    def common(self, lines: pa.Array) -> dict[int, bytes]:
        """Edits of a chunk's common lines (index -> bytes): CRLF rewrites and added lines."""
        n = len(lines)
        edits: dict[int, bytes] = {}
        added = 0
        if self._common_kinds:
            chosen, kinds, variant = self._choose(n, self._common_kinds)
            texts = pc.take(lines, pa.array(chosen, type=pa.int64())).to_pylist()
            for i, kind, text, (u, v) in zip(chosen.tolist(), kinds, texts, variant, strict=True):
                line_no = self._lines[1] + i + 1 + added
                key = _first_column(text)
                if kind == CRLF:
                    edits[i] = f"{text}\r\n".encode()
                    self._rows[1].append((self._files[1], line_no, key, kind))
                    continue
                if kind == "duplicate_key":
                    extra = f"{text}\n".encode()
                else:  # a copy under a key no impression uses, so no impression is lost
                    key = _digest(
                        f"ali-ccp-synth-defect:{self._seed}:{self._split}:{self._new_keys}"
                    )
                    self._new_keys += 1
                    copy = key + text[len(_first_column(text)) :]
                    extra = self._corrupt(kind, copy, 3, u, v, line_no + 1)
                    key = "" if kind == "empty" else key
                edits[i] = f"{text}\n".encode() + extra
                added += 1
                self._rows[1].append((self._files[1], line_no + 1, key, kind))
                self.defective_lines += 1
        self._lines[1] += n + added
        return edits

    def _choose(self, n: int, kinds: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lines to edit, the kind of each, and two uniforms per line for its variant."""
        rng = self._rng
        chosen = np.flatnonzero(rng.random(n) < self._rate)
        kind = np.asarray(kinds, dtype=object)[rng.integers(0, len(kinds), len(chosen))]
        return chosen, kind, rng.random((len(chosen), 2))

    def _corrupt(
        self, kind: str, text: str, n_cols: int, u: float, v: float, line_no: int
    ) -> bytes:
        """The line `text` (n_cols columns, valid) with one defect of `kind`, newline ended."""
        if kind == CRLF:
            return f"{text}\r\n".encode()
        if kind == "empty":
            return b"\n"
        if kind == "truncated":  # cut after the first column, before the feature list
            first = text.index(",")
            last = first
            for _ in range(n_cols - 2):
                last = text.index(",", last + 1)
            return f"{text[: first + 1 + int(u * (last - first))]}\n".encode()
        if kind == "separator":
            return f"{text.replace(',', _SEPARATORS[int(u * len(_SEPARATORS))])}\n".encode()
        if kind == "utf8":  # invalid bytes somewhere after the first column
            raw, first = text.encode(), text.index(",") + 1
            at = first + int(u * (len(raw) - first + 1))
            return raw[:at] + _BAD_BYTES[int(v * len(_BAD_BYTES))] + raw[at:] + b"\n"
        cols = text.split(",")
        if kind == "feature_num":
            declared = int(cols[-2])
            error = _FEATURE_NUM_ERRORS[int(u * len(_FEATURE_NUM_ERRORS))]
            cols[-2] = str(declared + error if declared + error >= 0 else declared + 1)
        elif kind == "malformed_entry":
            entries = cols[-1].split(_ENTRY_SEP)
            k = int(u * len(entries))
            name, rest = entries[k].split(_ID_SEP)
            feature_id, value = rest.split(_VALUE_SEP)
            entries[k] = (
                f"{name}{_ID_SEP}{feature_id}{value}",  # no value separator
                f"{name}:{feature_id}{_VALUE_SEP}{value}",  # no id separator
                f"{name}{_ID_SEP}{feature_id}{_VALUE_SEP}n/a",  # value not a number
            )[int(v * 3)]
            cols[-1] = _ENTRY_SEP.join(entries)
        elif kind == "label_text":
            cols[1 + int(u * 2)] = _BAD_LABELS[int(v * len(_BAD_LABELS))]
        elif kind == "label_range":
            cols[1 + int(u * 2)] = _OUT_OF_RANGE_LABELS[int(v * len(_OUT_OF_RANGE_LABELS))]
        elif kind == "conversion_without_click":
            cols[1], cols[2] = "0", "1"
        elif kind == "unknown_key":
            cols[3] = _digest(f"ali-ccp-synth-unknown:{self._seed}:{self._split}:{line_no}")
        else:
            raise ValueError(f"no such defect kind: {kind!r}")
        return f"{','.join(cols)}\n".encode()


def _first_column(line: str) -> str:
    return line.split(",", 1)[0]


def _digest(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _write_manifest(path: Path, rows: list[tuple[str, int, str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(DEFECTS_HEADER)
        writer.writerows(rows)
    return path


def _resolve_defects(rate: object, defects: Sequence[str] | str | None) -> tuple[str, ...]:
    """The kinds to inject, in `LINE_KINDS` order; none when the rate is 0."""
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float | np.integer | np.floating)
        or not 0.0 <= float(rate) <= 1.0
    ):
        raise ValueError(f"defect_rate must be a number in [0, 1], got {rate!r}")
    if defects is None:
        return DEFECT_KINDS if rate > 0 else ()
    names = defects.split(",") if isinstance(defects, str) else list(defects)
    names = [str(name).strip() for name in names if str(name).strip()]
    unknown = sorted(set(names) - set(LINE_KINDS))
    if unknown or not names:
        raise ValueError(
            f"defects must name kinds from {', '.join(LINE_KINDS)}; got {defects!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return tuple(kind for kind in LINE_KINDS if kind in names) if rate > 0 else ()


# --- writing ----------------------------------------------------------------------------


class _SplitWriter:
    """Writes one split chunk by chunk and keeps what the oracle needs."""

    def __init__(
        self,
        out_dir: Path,
        split: str,
        seed: int,
        layout: Mapping[str, range],
        defects: _Defects | None = None,
    ):
        self.split, self.seed, self.layout = split, seed, layout
        self._defects = defects
        self.paths = (
            out_dir / skeleton_file(split),
            out_dir / common_file(split),
            out_dir / ground_truth_file(split),
        )
        self._handles: list[BinaryIO] = []
        self._n_impressions = 0
        self._n_contexts = 0
        self._p_ctr: list[np.ndarray] = []  # fixed-point, 10**-PROBABILITY_DIGITS units
        self._p_cvr: list[np.ndarray] = []
        self._click: list[np.ndarray] = []
        self._conversion: list[np.ndarray] = []

    def __enter__(self) -> _SplitWriter:
        self._handles = [path.open("wb") for path in self.paths]
        self._handles[2].write(f"{GROUND_TRUTH_HEADER}\n".encode())
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.close()

    def write(
        self, block: _Block, bias_ctr: float, bias_cvr: float, rng: np.random.Generator
    ) -> None:
        skeleton, common, truth = self._handles
        n = len(block.item)
        scale = 10**PROBABILITY_DIGITS
        top = scale - 1  # keep "0." + digits: never round up to 1
        q_ctr = np.minimum(np.rint(_sigmoid(block.logit_ctr + bias_ctr) * scale), top)
        q_cvr = np.minimum(np.rint(_sigmoid(block.logit_cvr + bias_cvr) * scale), top)
        q_ctr, q_cvr = q_ctr.astype(np.uint32), q_cvr.astype(np.uint32)
        click = rng.random(n) < q_ctr / scale
        conversion = click & (rng.random(n) < q_cvr / scale)

        keys = pa.array(
            [self._context_key(self._n_contexts + i) for i in range(len(block.context_user))]
        )
        sample_id = _text(np.arange(self._n_impressions + 1, self._n_impressions + n + 1))
        skeleton_lines = _join(
            ",",
            sample_id,
            _text(click.astype(np.int64)),
            _text(conversion.astype(np.int64)),
            pc.take(keys, pa.array(block.impression_context)),
            *self._skeleton_features(block),
        )
        common_num, common_list = self._common_features(block)
        by_key = pc.sort_indices(keys)  # the common file's own order: by key within a chunk
        common_lines = pc.take(_join(",", keys, common_num, common_list), by_key)
        self._n_impressions += n
        self._n_contexts += len(keys)
        if self._defects is not None:
            skeleton_edits, valid = self._defects.skeleton(skeleton_lines)
            _write_lines(skeleton, skeleton_lines, skeleton_edits)
            _write_lines(common, common_lines, self._defects.common(common_lines))
            if not valid.all():  # the ground truth and the oracle: valid impressions only
                keep = pa.array(valid)
                sample_id = sample_id.filter(keep)
                q_ctr, q_cvr = q_ctr[valid], q_cvr[valid]
                click, conversion = click[valid], conversion[valid]
        else:
            _write_lines(skeleton, skeleton_lines)
            _write_lines(common, common_lines)
        _write_lines(
            truth, _join(",", sample_id, _probability_text(q_ctr), _probability_text(q_cvr))
        )

        self._p_ctr.append(q_ctr)
        self._p_cvr.append(q_cvr)
        self._click.append(click)
        self._conversion.append(conversion)

    def _context_key(self, index: int) -> str:
        return hashlib.md5(f"ali-ccp-synth:{self.seed}:{self.split}:{index}".encode()).hexdigest()

    def _skeleton_features(self, block: _Block) -> tuple[pa.Array, pa.Array]:
        n = len(block.item)
        every = np.arange(n)
        single = {
            "205": block.item,
            "206": block.category,
            "207": block.shop,
            POSITION_FIELD: block.position,
        }
        weights = _WeightText(max(int(e.count.max(initial=0)) for e in block.crosses.values()))
        lines = _FeatureLines(n, self.layout)
        for field in SKELETON_FIELDS:
            if field in block.crosses:
                cross = block.crosses[field]
                lines.add(field, cross.line, cross.entity, weights.of(cross.count))
            elif field == "210":
                lines.add(field, block.node_row, block.node)
            elif field == "216":
                has = block.brand >= 0
                lines.add(field, every[has], block.brand[has])
            else:
                lines.add(field, every, single[field])
        return lines.build()

    def _common_features(self, block: _Block) -> tuple[pa.Array, pa.Array]:
        n = len(block.context_user)
        every = np.arange(n)
        snapshots = block.snapshots
        weights = _WeightText(max(int(s.count.max(initial=0)) for s in snapshots.values()))
        lines = _FeatureLines(n, self.layout)
        for field in COMMON_FIELDS:
            if field == USER_ID_FIELD:
                lines.add(field, every, block.context_user)
            elif field in PROFILE_CARDINALITY:
                lines.add(field, every, block.context_profile[:, PROFILE_FIELDS.index(field)])
            else:
                snapshot = snapshots[field]
                lines.add(field, snapshot.line, snapshot.entity, weights.of(snapshot.count))
        return lines.build()

    def counts(self) -> SplitCounts:
        click, conversion = np.concatenate(self._click), np.concatenate(self._conversion)
        return SplitCounts(
            impressions=len(click),
            contexts=self._n_contexts,
            clicks=int(click.sum()),
            conversions=int(conversion.sum()),
            defective_lines=0 if self._defects is None else self._defects.defective_lines,
        )

    def oracle(self) -> dict[str, float | int | None]:
        scale = 10**PROBABILITY_DIGITS
        p_ctr = np.concatenate(self._p_ctr) / scale
        p_cvr = np.concatenate(self._p_cvr) / scale
        click = np.concatenate(self._click).astype(np.int64)
        conversion = np.concatenate(self._conversion).astype(np.int64)
        clicked = click == 1
        counts = self.counts()
        return {
            "ctr_auc": _auc(click, p_ctr),
            "ctcvr_auc": _auc(click * conversion, p_ctr * p_cvr),
            "cvr_auc_clicked": _auc(conversion[clicked], p_cvr[clicked]),
            "impressions": counts.impressions,
            "contexts": counts.contexts,
            "clicks": counts.clicks,
            "conversions": counts.conversions,
        }


class _WeightText:
    """Text of the weight ln(1 + count), at most `_WEIGHT_DECIMALS` decimals."""

    def __init__(self, max_count: int):
        self._table = pa.array(
            [f"{math.log1p(c):.{_WEIGHT_DECIMALS}f}" for c in range(max_count + 1)]
        )

    def of(self, count: np.ndarray) -> pa.Array:
        return pc.take(self._table, pa.array(count))


class _FeatureLines:
    """Collects `field\\x02id\\x03value` entries per line and joins them with \\x01."""

    def __init__(self, n_lines: int, layout: Mapping[str, range]):
        self._n_lines, self._layout = n_lines, layout
        self._lines: list[np.ndarray] = []
        self._entries: list[pa.Array] = []

    def add(
        self, field: str, line: np.ndarray, entity: np.ndarray, value: pa.Array | None = None
    ) -> None:
        """Add one entry per (line, entity); value text defaults to 1.0."""
        ids = _text(self._layout[field].start + entity.astype(np.int64))
        prefix = f"{field}{_ID_SEP}"
        if value is None:
            entry = pc.binary_join_element_wise(prefix, ids, f"{_VALUE_SEP}{_PLAIN_VALUE}", "")
        else:
            entry = pc.binary_join_element_wise(prefix, ids, _VALUE_SEP, value, "")
        self._lines.append(np.asarray(line, dtype=np.int64))
        self._entries.append(entry)

    def build(self) -> tuple[pa.Array, pa.Array]:
        """Per line: (feature_num text, feature_list text), entries in the order added."""
        line = np.concatenate(self._lines)
        order = np.argsort(line, kind="stable")
        entries = pc.take(pa.concat_arrays(self._entries), pa.array(order))
        count = np.bincount(line, minlength=self._n_lines)
        offsets = pa.array(np.concatenate([[0], np.cumsum(count)]).astype(np.int32))
        joined = pc.binary_join(pa.ListArray.from_arrays(offsets, entries), _ENTRY_SEP)
        return _text(count), joined


def _text(values: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(values), pa.string())


def _join(sep: str, *columns: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(*columns, sep)


def _probability_text(fixed_point: np.ndarray) -> pa.Array:
    digits = pc.utf8_lpad(_text(fixed_point), width=PROBABILITY_DIGITS, padding="0")
    return pc.binary_join_element_wise("0.", digits, "")


def _write_lines(
    handle: BinaryIO, lines: pa.Array, replace: Mapping[int, bytes] | None = None
) -> None:
    """Write each string followed by a newline; `replace[i]` is written instead of line i
    (the bytes given, line ending(s) included)."""
    if replace:
        start = 0
        for i in sorted(replace):
            _write_lines(handle, lines.slice(start, i - start))
            handle.write(replace[i])
            start = i + 1
        _write_lines(handle, lines.slice(start))
        return
    if len(lines) == 0:
        return
    offsets = pa.array([0, len(lines)], type=pa.int32())
    text = pc.binary_join(pa.ListArray.from_arrays(offsets, lines), "\n")[0]
    handle.write(text.as_buffer())
    handle.write(b"\n")


def _auc(label: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC, or None when the labels hold a single class."""
    if len(np.unique(label)) < 2:
        return None
    return float(roc_auc_score(label, score))


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _resolve_profile(profile: str | SynthProfile) -> SynthProfile:
    if isinstance(profile, SynthProfile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    return PROFILES[profile]


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index)))


def _rng3(seed: int, stream: int, index: int, sub: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index, sub)))
