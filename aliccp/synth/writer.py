"""Writing one split: the label draws from the true probabilities, the skeleton and common
files (with their defects, if any), the ground-truth file of the valid impressions, and
the split's counts and oracle AUCs."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aliccp.format import common_file, skeleton_file
from aliccp.synth.defects import Defects
from aliccp.synth.profiles import PROFILE_CARDINALITY, PROFILE_FIELDS
from aliccp.synth.simulate import Block
from aliccp.synth.text import FeatureLines, WeightText, join, text, write_lines
from models.features import COMMON_FIELDS, POSITION_FIELD, SKELETON_FIELDS, USER_ID_FIELD
from models.numeric import auc, sigmoid

ORACLE_FILE = "oracle.json"
GROUND_TRUTH_HEADER = "sample_id,p_ctr,p_cvr"
PROBABILITY_DIGITS = 8  # decimals of p_ctr and p_cvr in the ground-truth files


def ground_truth_file(split: str) -> str:
    """File name of a split's ground-truth probabilities."""
    return f"ground_truth_{split}.csv"


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


class SplitWriter:
    """Writes one split chunk by chunk and keeps what the oracle needs."""

    def __init__(
        self,
        out_dir: Path,
        split: str,
        seed: int,
        layout: Mapping[str, range],
        defects: Defects | None = None,
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

    def __enter__(self) -> SplitWriter:
        self._handles = [path.open("wb") for path in self.paths]
        self._handles[2].write(f"{GROUND_TRUTH_HEADER}\n".encode())
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.close()

    def write(
        self, block: Block, bias_ctr: float, bias_cvr: float, rng: np.random.Generator
    ) -> None:
        """Draw the labels of a chunk's impressions and append the chunk to the three files."""
        skeleton, common, truth = self._handles
        n = len(block.item)
        q_ctr, q_cvr, click, conversion = _draw_labels(block, bias_ctr, bias_cvr, rng)
        keys = pa.array(
            [self._context_key(self._n_contexts + i) for i in range(len(block.context_user))]
        )
        sample_id = text(np.arange(self._n_impressions + 1, self._n_impressions + n + 1))
        skeleton_lines = join(
            ",",
            sample_id,
            text(click.astype(np.int64)),
            text(conversion.astype(np.int64)),
            pc.take(keys, pa.array(block.impression_context)),
            *self._skeleton_features(block),
        )
        common_num, common_list = self._common_features(block)
        by_key = pc.sort_indices(keys)  # the common file's own order: by key within a chunk
        common_lines = pc.take(join(",", keys, common_num, common_list), by_key)
        self._n_impressions += n
        self._n_contexts += len(keys)
        if self._defects is not None:
            skeleton_edits, valid = self._defects.skeleton(skeleton_lines)
            write_lines(skeleton, skeleton_lines, skeleton_edits)
            write_lines(common, common_lines, self._defects.common(common_lines))
            if not valid.all():  # the ground truth and the oracle: valid impressions only
                keep = pa.array(valid)
                sample_id = sample_id.filter(keep)
                q_ctr, q_cvr = q_ctr[valid], q_cvr[valid]
                click, conversion = click[valid], conversion[valid]
        else:
            write_lines(skeleton, skeleton_lines)
            write_lines(common, common_lines)
        write_lines(truth, join(",", sample_id, _probability_text(q_ctr), _probability_text(q_cvr)))

        self._p_ctr.append(q_ctr)
        self._p_cvr.append(q_cvr)
        self._click.append(click)
        self._conversion.append(conversion)

    def _context_key(self, index: int) -> str:
        return hashlib.md5(f"ali-ccp-synth:{self.seed}:{self.split}:{index}".encode()).hexdigest()

    def _skeleton_features(self, block: Block) -> tuple[pa.Array, pa.Array]:
        n = len(block.item)
        every = np.arange(n)
        single = {
            "205": block.item,
            "206": block.category,
            "207": block.shop,
            POSITION_FIELD: block.position,
        }
        weights = WeightText(max(int(e.count.max(initial=0)) for e in block.crosses.values()))
        lines = FeatureLines(n, self.layout)
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

    def _common_features(self, block: Block) -> tuple[pa.Array, pa.Array]:
        n = len(block.context_user)
        every = np.arange(n)
        snapshots = block.snapshots
        weights = WeightText(max(int(s.count.max(initial=0)) for s in snapshots.values()))
        lines = FeatureLines(n, self.layout)
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
        """What the split holds so far (valid impressions only)."""
        click, conversion = np.concatenate(self._click), np.concatenate(self._conversion)
        return SplitCounts(
            impressions=len(click),
            contexts=self._n_contexts,
            clicks=int(click.sum()),
            conversions=int(conversion.sum()),
            defective_lines=0 if self._defects is None else self._defects.defective_lines,
        )

    def oracle(self) -> dict[str, float | int | None]:
        """The split's entry of oracle.json: the true probabilities' AUCs and the counts."""
        scale = 10**PROBABILITY_DIGITS
        p_ctr = np.concatenate(self._p_ctr) / scale
        p_cvr = np.concatenate(self._p_cvr) / scale
        click = np.concatenate(self._click).astype(np.int64)
        conversion = np.concatenate(self._conversion).astype(np.int64)
        clicked = click == 1
        counts = self.counts()
        return {
            "ctr_auc": _auc_or_none(click, p_ctr),
            "ctcvr_auc": _auc_or_none(click * conversion, p_ctr * p_cvr),
            "cvr_auc_clicked": _auc_or_none(conversion[clicked], p_cvr[clicked]),
            "impressions": counts.impressions,
            "contexts": counts.contexts,
            "clicks": counts.clicks,
            "conversions": counts.conversions,
        }


def _draw_labels(
    block: Block, bias_ctr: float, bias_cvr: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(p_ctr, p_cvr, click, conversion): the true probabilities in fixed point (units of
    10**-PROBABILITY_DIGITS, as written) and the labels drawn from them."""
    scale = 10**PROBABILITY_DIGITS
    top = scale - 1  # keep "0." + digits: never round up to 1
    q_ctr = np.minimum(np.rint(sigmoid(block.logit_ctr + bias_ctr) * scale), top)
    q_cvr = np.minimum(np.rint(sigmoid(block.logit_cvr + bias_cvr) * scale), top)
    q_ctr, q_cvr = q_ctr.astype(np.uint32), q_cvr.astype(np.uint32)
    click = rng.random(len(q_ctr)) < q_ctr / scale
    conversion = click & (rng.random(len(q_ctr)) < q_cvr / scale)
    return q_ctr, q_cvr, click, conversion


def _probability_text(fixed_point: np.ndarray) -> pa.Array:
    digits = pc.utf8_lpad(text(fixed_point), width=PROBABILITY_DIGITS, padding="0")
    return pc.binary_join_element_wise("0.", digits, "")


def _auc_or_none(label: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC, or None (`null` in oracle.json) when the labels hold a single class."""
    value = auc(label, score)
    return None if math.isnan(value) else value
