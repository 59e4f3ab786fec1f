"""The raw Ali-CCP format contract: file names, raw and ingested splits, quarantine reasons.

The format itself is described in `docs/ali_ccp_format.md`; its fields are in
`models.features`. The generator (`aliccp.synth`), ingestion (`tasks.ingest`), validation
and batch scoring all take these names from here.
"""

from __future__ import annotations

RAW_SPLITS: tuple[str, ...] = ("train", "test")  # the published files' splits
SPLITS: tuple[str, ...] = ("train", "valid", "test")  # ingested splits (valid is held out of train)


def skeleton_file(split: str) -> str:
    """File name of a split's skeleton (impression) file."""
    return f"sample_skeleton_{split}.csv"


def common_file(split: str) -> str:
    """File name of a split's common-features (user context) file."""
    return f"common_features_{split}.csv"


RAW_FILES: dict[str, tuple[str, str]] = {
    split: (skeleton_file(split), common_file(split)) for split in RAW_SPLITS
}

# Quarantine reasons (stable strings: they are report keys).
R_EMPTY = "empty line"
R_UTF8 = "invalid UTF-8"
R_COLUMNS = "wrong number of columns (truncated line or wrong separator)"
R_LABEL = "label not 0 or 1"
R_CONV_NO_CLICK = "conversion without click"
R_FEATURE_NUM = "feature_num does not match the feature list"
R_ENTRY = "malformed feature entry"
R_UNKNOWN_KEY = "unknown common_feature_index"
R_DUP_KEY = "duplicate common_feature_index"
R_DUP_SAMPLE = "duplicate sample id"
