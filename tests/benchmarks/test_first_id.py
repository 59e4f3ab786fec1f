"""The first-id baseline's reader feeds each field's first entry: the arrays the product's
padding gives with `first_only` (real ingested files)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from benchmarks.first_id import FirstIdReader, first_entries
from tasks.config import IngestConfig
from tasks.ingest import ingest_ali_ccp
from tasks.inputs import SIDES, SplitReader, pad_fields


def test_lists_are_cut_to_their_first_entry_and_other_columns_kept():
    lists = lambda rows, t: pa.array(rows, pa.list_(t))  # noqa: E731
    table = pa.table(
        {
            "ids_101": lists([[5, 6, 7], [], None, [8]], pa.int64()),
            "wts_101": lists([[0.5, 0.6, 0.7], [], None, [0.8]], pa.float32()),
            "other": lists([[1, 2], [3], [], None], pa.int64()),
        }
    )
    cut = first_entries(table)
    assert cut["ids_101"].to_pylist() == [[5], [], None, [8]]
    assert cut["wts_101"].to_pylist() == [[0.5], [], None, [np.float32(0.8)]]
    assert cut["other"].equals(table["other"])
    assert cut.schema == table.schema


def test_batches_hold_the_first_entry_of_every_field(small_raw, tmp_path):
    ingest_ali_ccp(small_raw, tmp_path, IngestConfig(valid_fraction=0.15, min_count=1))
    full, first = SplitReader(tmp_path / "train"), FirstIdReader(tmp_path / "train")
    batches = list(
        zip(full.tables(128, seed=3, epoch=1), first.tables(128, seed=3, epoch=1), strict=True)
    )
    assert len(batches) == full.num_batches(128)
    for whole, cut in batches:
        common, context_row = full.contexts(whole)
        packed = first.packed(cut)
        np.testing.assert_array_equal(packed["context_row"], context_row)
        for fields, side in SIDES:
            ids, wts, widths = pad_fields(common if side == "user" else whole, fields, True)
            np.testing.assert_array_equal(packed[f"{side}_ids"], ids)
            np.testing.assert_array_equal(packed[f"{side}_wts"], wts)
            np.testing.assert_array_equal(packed[f"{side}_widths"], widths)
