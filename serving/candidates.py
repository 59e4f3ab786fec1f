"""Candidate requests: one user context and many candidate impressions, the ranking form.

A ranking service scores one user's candidates at a time. The request carries the user side
once and each candidate's impression side:

    {"context":    {"101": [[17, 1.0]], "109_14": [[88, 3.0], [90, 1.0]], ...},
     "candidates": [{"205": [[4031, 1.0]], "206": [[12, 1.0]], "301": [[1, 1.0]]},
                    {"205": [[77, 1.0]], ...}]}

`context` holds the user-side fields (`models.features.COMMON_FIELDS`: 101, 121 ... 150_14,
the `common_features` side of the raw format) and each candidate the impression-side fields
(`SKELETON_FIELDS`: 205 ... 301), with the same `[id, weight]` pairs and rules as a record of
`serving.records`. The model gets the context as one user-side row and every candidate
pointing at it (`context_row` 0), so the user side is embedded, pooled and multiplied by its
part of each tower's first layer once per request, as in training. Scoring a candidate this
way gives the same probabilities as a record holding the context and that candidate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.features import COMMON_FIELDS, CONTEXT_ROW_KEY, SKELETON_FIELDS
from serving.records import records_to_arrays

CONTEXT_KEY = "context"
CANDIDATES_KEY = "candidates"


def candidates_to_inputs(context: Any, candidates: Any) -> dict[str, np.ndarray]:
    """Model inputs for one context and its candidates (see the module docstring).

    Args:
        context: the user-side fields, field name -> `[id, weight]` pairs.
        candidates: a list of impression-side field sets, one per candidate.

    Returns:
        `ids_F`/`wts_F` of every field, user-side ones with one row, impression-side ones
        with a row per candidate, and `context_row` (all 0).

    Raises:
        InvalidRecordError: a malformed context or candidate, named precisely.
    """
    inputs = records_to_arrays([context], COMMON_FIELDS, CONTEXT_KEY, indexed=False)
    inputs.update(records_to_arrays(candidates, SKELETON_FIELDS, "candidate"))
    inputs[CONTEXT_ROW_KEY] = np.zeros(len(candidates), dtype=np.int32)
    return inputs
