"""Feature metadata of the Ali-CCP format: the single source of truth for field names.

Every raw field keeps all of its entries and their weights. A field `F` becomes two
columns/inputs: `ids_F` (int64 feature ids, one list per row) and `wts_F` (float32
weights, same length). Single-valued fields are lists of length 0 or 1; absent fields
are empty lists. Padding (in batches) uses id 0 with weight 0, so it never contributes.
"""

from __future__ import annotations

# User-side fields, stored once per common_feature_index (common_features_*.csv).
COMMON_FIELDS: tuple[str, ...] = (
    "101",
    "121",
    "122",
    "124",
    "125",
    "126",
    "127",
    "128",
    "129",
    "109_14",
    "110_14",
    "127_14",
    "150_14",
)
# Impression-side fields (sample_skeleton_*.csv).
SKELETON_FIELDS: tuple[str, ...] = (
    "205",
    "206",
    "207",
    "210",
    "216",
    "508",
    "509",
    "702",
    "853",
    "301",
)
ALL_FIELDS: tuple[str, ...] = COMMON_FIELDS + SKELETON_FIELDS

# Fields whose entries carry a count or weight rather than 1.0.
# User x item crosses: present only where the user's history matches the item.
# Each cross is the user's history field x the item's field (ALI_CCP_FORMAT.md).
CROSSES: dict[str, tuple[str, str]] = {
    "508": ("109_14", "206"),  # history categories x item category
    "509": ("110_14", "207"),  # history shops x shop
    "702": ("127_14", "216"),  # history brands x brand
    "853": ("150_14", "210"),  # history intention nodes x intention nodes
}
CROSS_FIELDS: frozenset[str] = frozenset(CROSSES)
# The user's 14-day behaviour lists (often hundreds of weighted entries).
HISTORY_FIELDS: tuple[str, ...] = tuple(history for history, _ in CROSSES.values())
WEIGHTED_FIELDS: frozenset[str] = frozenset(HISTORY_FIELDS) | CROSS_FIELDS
# Fields with more than one entry per line.
MULTI_VALUED_FIELDS: frozenset[str] = WEIGHTED_FIELDS | {"210"}

# The user's interest against the item's category (`model.interest_match`): the history
# categories and the profile category (user side), then the item category.
INTEREST_FIELDS: tuple[str, str, str] = ("109_14", "121", "206")

POSITION_FIELD = "301"
USER_ID_FIELD = "101"

SAMPLE_ID_KEY = "sample_id"
COMMON_INDEX_KEY = "common_feature_index"
CLICK_LABEL_KEY = "click"
CONVERSION_LABEL_KEY = "conversion"
LABEL_KEYS: tuple[str, ...] = (CLICK_LABEL_KEY, CONVERSION_LABEL_KEY)
# Model input beside the fields: each impression's row among its batch's user-side rows
# (a batch carries each context's user-side lists once).
CONTEXT_ROW_KEY = "context_row"

OUTPUT_KEYS: tuple[str, ...] = ("p_ctr", "p_cvr", "p_ctcvr")


def ids_key(field: str) -> str:
    """Column/input name holding a field's feature ids."""
    return f"ids_{field}"


def wts_key(field: str) -> str:
    """Column/input name holding a field's weights."""
    return f"wts_{field}"
