"""Schemas of the validation step: proposing one from training statistics, and its diff.

A schema (`schema/<table>.pbtxt`) is proposed from the training split for a person to review
and commit (`esmm schema propose`, or the validate step's first run). It has two
environments: TRAINING (the default) and SERVING, where the labels are absent. The bounds it
proposes (presence, values per field, distinct ids) leave room for another sample of the same
source and stop an emptied field or an explosion of ids.
"""

from __future__ import annotations

import math
from pathlib import Path

from models.features import CROSS_FIELDS, MULTI_VALUED_FIELDS
from tasks.config import ValidateConfig
from tasks.validate_stats import (
    LABEL_COLUMNS,
    TABLES,
    feature_stats,
    generate_statistics,
    import_tfdv,
    num_examples,
)

TRAINING, SERVING = "TRAINING", "SERVING"  # schema environments
# Schema proposal: how far below its training presence a field may fall before it is an
# anomaly. Multi-valued lists get no upper length: the format's behaviour lists often hold
# hundreds of entries.
_PRESENCE_SLACK = 0.8
# Fields a record may lack in any share of rows ("a field may be absent from a line"), as
# long as the field appears at all: the crosses (present only where the user's history
# matches the item), the user's profile attributes (the real Ali-CCP lacks some for some
# users: the user of PaddleRec's sample of it has no 126), the intention nodes and the brand.
_PROFILE_FIELDS = frozenset({"121", "122", "124", "125", "126", "127", "128", "129"})
_OPTIONAL_FIELDS = CROSS_FIELDS | _PROFILE_FIELDS | {"210", "216"}
_UNIQUE_HEADROOM = 1.25  # distinct ids of a low-cardinality field, times its training count
# ... and at least this many: a source with more categories than the training data (121 has
# 97 values in the real Ali-CCP; a geography by city, a few hundred) passes, an explosion of
# ids (user or item ids leaking into a profile field: thousands) does not.
_UNIQUE_FLOOR = 1000


def infer_schema(statistics, max_domain_size: int = 100, value_domains: bool = False):
    """A schema proposal from training statistics, for a person to review and commit.

    Environments TRAINING (the default) and SERVING, where the labels are absent. Labels: one
    value in {0, 1}, always present. Id fields with at most `max_domain_size` distinct values
    get a bound on their number of distinct values and, with `value_domains`, their training
    values as a domain. Every field must be present in at least `_PRESENCE_SLACK`
    of its training share of rows (`_OPTIONAL_FIELDS`: in some row); single-valued fields hold one
    value, multi-valued ones at least one. The bound on distinct ids is the larger of
    `_UNIQUE_HEADROOM` times the training count and `_UNIQUE_FLOOR`.
    """
    tfdv = import_tfdv()
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = tfdv.infer_schema(
        statistics, infer_feature_shape=False, max_string_domain_size=max_domain_size
    )
    schema.default_environment.extend([TRAINING, SERVING])
    stats = feature_stats(statistics)
    rows = max(num_examples(statistics), 1)
    for feature in schema.feature:
        if feature.name in LABEL_COLUMNS:
            feature.not_in_environment.append(SERVING)
            feature.presence.min_fraction = 1.0
            feature.value_count.min = feature.value_count.max = 1
            feature.int_domain.min, feature.int_domain.max = 0, 1
            continue
        common = stats[feature.name].string_stats.common_stats
        if not common.num_non_missing:
            common = stats[feature.name].num_stats.common_stats
        field_name = feature.name.split("_", 1)[1]
        share = 0.0 if field_name in _OPTIONAL_FIELDS else common.num_non_missing / rows
        feature.presence.min_fraction = round(_PRESENCE_SLACK * share, 3)
        feature.presence.min_count = 1
        feature.value_count.min = 1
        if field_name in MULTI_VALUED_FIELDS:
            feature.value_count.ClearField("max")
        else:
            feature.value_count.max = 1
        if feature.type == schema_pb2.BYTES:
            # Ids are categories. A low-cardinality field may not grow much beyond its
            # training count of distinct ids (an explosion of new ids is an anomaly) and,
            # with `value_domains`, may only hold its training ids.
            feature.ClearField("domain_info")
            string_stats = stats[feature.name].string_stats
            if 0 < string_stats.unique <= max_domain_size:
                feature.unique_constraints.min = 1
                feature.unique_constraints.max = max(
                    math.ceil(string_stats.unique * _UNIQUE_HEADROOM), _UNIQUE_FLOOR
                )
                if value_domains:
                    values = {b.label for b in string_stats.rank_histogram.buckets}
                    feature.string_domain.value.extend(sorted(values, key=int))
    schema.ClearField("string_domain")
    return schema


def load_or_infer_schema(schema_dir: Path, table: str, train_statistics, cfg: ValidateConfig):
    """The committed schema of `table`, or (first run) one inferred from the training
    statistics and written as `schema_dir/<table>.pbtxt`.

    Returns:
        (schema, note): the note says the schema was inferred; None when it was committed.
    """
    tfdv = import_tfdv()
    schema_path = Path(schema_dir) / f"{table}.pbtxt"
    if schema_path.is_file():
        return tfdv.load_schema_text(str(schema_path)), None
    schema = infer_schema(train_statistics, cfg.max_domain_size, cfg.value_domains)
    Path(schema_dir).mkdir(parents=True, exist_ok=True)
    tfdv.write_schema_text(schema, str(schema_path))
    return schema, f"{schema_path} was absent: inferred from this training split"


def propose_schemas(ingest_dir: Path, out_dir: Path, cfg: ValidateConfig) -> dict[str, str]:
    """Infer a schema per table from the training split; returns {table: pbtxt text}."""
    from google.protobuf import text_format

    inputs = {
        f"train_{table}": Path(ingest_dir) / "train" / filename
        for table, filename in TABLES.items()
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    statistics = generate_statistics(inputs, Path(out_dir), cfg)
    return {
        table: text_format.MessageToString(
            infer_schema(statistics[f"train_{table}"], cfg.max_domain_size, cfg.value_domains)
        )
        for table in TABLES
    }


def write_schemas(folder: Path, schemas: dict[str, str]) -> None:
    """Write {table: pbtxt text} as folder/<table>.pbtxt."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for table, text in schemas.items():
        (Path(folder) / f"{table}.pbtxt").write_text(text)


def schema_diff(schema_dir: Path, proposed: dict[str, str]) -> str:
    """Unified diff from the committed schemas to the proposed ones ("" when identical)."""
    import difflib

    chunks = []
    for table, text in proposed.items():
        path = Path(schema_dir) / f"{table}.pbtxt"
        old = path.read_text() if path.is_file() else ""
        chunks.extend(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                text.splitlines(keepends=True),
                str(path),
                f"{path} (proposed)",
            )
        )
    return "".join(chunks)
