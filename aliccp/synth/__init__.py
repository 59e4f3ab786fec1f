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

Defects (`aliccp.synth.defects`): with `defect_rate > 0` that share of lines is written with
one deliberate defect each (or, for `crlf`, a valid `\\r\\n` ending); `DEFECT_REASONS` maps
every kind to the quarantine reason of `tasks.ingest` that ingestion must give it. The
ground truth, the counts and the oracle cover the valid impressions only: exactly the
skeleton lines not listed in `defects.csv` plus the `crlf` ones, i.e. what ingestion keeps.

Output is byte-identical for identical arguments. Work is vectorised with numpy and
pyarrow and done in chunks of contexts, so memory stays bounded for millions of
impressions.

Modules, in the order a data set is made: `profiles` (the profiles), `streams` (the seeded
random streams), `world` (sizes, id layout, items, users, histories), `simulate` (contexts,
impressions, true logits, calibration), `text` (raw line text), `defects` (defect
injection and manifest), `writer` (one split's files, ground truth, oracle) and `generate`
(`synthesize_ali_ccp`, tying them together).
"""

from __future__ import annotations

from aliccp.synth.defects import (
    COMMON_KINDS,
    CRLF,
    DEFECT_KINDS,
    DEFECT_REASONS,
    DEFECTS_FILE,
    DEFECTS_HEADER,
    LINE_KINDS,
    SKELETON_KINDS,
)
from aliccp.synth.generate import SynthSummary, synthesize_ali_ccp
from aliccp.synth.profiles import PROFILE_CARDINALITY, PROFILE_FIELDS, PROFILES, SynthProfile
from aliccp.synth.world import CROSS_FIELDS, feature_id_ranges
from aliccp.synth.writer import (
    GROUND_TRUTH_HEADER,
    ORACLE_FILE,
    PROBABILITY_DIGITS,
    SplitCounts,
    ground_truth_file,
)

__all__ = [
    "COMMON_KINDS",
    "CRLF",
    "CROSS_FIELDS",
    "DEFECTS_FILE",
    "DEFECTS_HEADER",
    "DEFECT_KINDS",
    "DEFECT_REASONS",
    "GROUND_TRUTH_HEADER",
    "LINE_KINDS",
    "ORACLE_FILE",
    "PROBABILITY_DIGITS",
    "PROFILES",
    "PROFILE_CARDINALITY",
    "PROFILE_FIELDS",
    "SKELETON_KINDS",
    "SplitCounts",
    "SynthProfile",
    "SynthSummary",
    "feature_id_ranges",
    "ground_truth_file",
    "synthesize_ali_ccp",
]
