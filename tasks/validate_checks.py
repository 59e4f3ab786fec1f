"""Checks of the validation step: schema anomalies, label checks, drift and skew.

Every finding is an anomaly line, "where: feature 'f': reason", and every one stops the run:
a split's statistics against the committed schema (TRAINING environment); labels 0/1 and no
conversion without a click; drift of the training split from the previous data version and
skew of the test split from the training split (TFDV's Jensen-Shannon and L-infinity
comparators; no Jensen-Shannon where TFDV's estimate would be noise,
`unmeasurable_jensen_shannon`); drift of the click rate and of the conversion rate given a
click. Each drift and skew measurement is also kept as a `Comparison` for the reports.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from models.features import CLICK_LABEL_KEY, CONVERSION_LABEL_KEY, LABEL_KEYS
from tasks.config import DriftConfig, LabelDriftConfig
from tasks.validate_schema import TRAINING
from tasks.validate_stats import LABEL_COLUMNS, LabelRates, feature_stats, import_tfdv, label_rates

_CUT = "more distinct ids than TFDV's rank histogram holds"


@dataclass(frozen=True)
class Comparison:
    """One drift or skew measurement of one feature."""

    kind: str  # "drift" or "skew"
    table: str
    feature: str
    measure: str  # "jensen_shannon" or "infinity_norm"
    value: float
    threshold: float

    @property
    def passed(self) -> bool:
        return self.value <= self.threshold


def _anomaly_lines(where: str, anomalies, keep=lambda reason: True) -> list[str]:
    lines = []
    for name, info in sorted(anomalies.anomaly_info.items()):
        reasons = [r for r in info.reason if keep(r)]
        if reasons:
            text = "; ".join(f"{r.short_description}: {r.description}" for r in reasons)
            lines.append(f"{where}: feature '{name}': {text}")
    return lines


def unmeasurable_jensen_shannon(cfg: DriftConfig, *statistics) -> dict[str, str]:
    """Id features whose Jensen-Shannon divergence TFDV cannot estimate from `statistics`,
    each with the reason; their L-infinity distance (the largest change in one id's share)
    is still measured.

    - The rank histogram is cut: TFDV computes the divergence of an id feature from that
      histogram alone, which holds at most `StatsOptions.num_rank_histogram_buckets` (1000)
      ids. Cut, it compares which ids made the cut on each side: on two samples of one flat
      distribution of a few thousand ids, 0.4-0.9. Item, shop, brand and cross ids are like
      that (real Ali-CCP: 4.3M items).
    - Too few values per id: two samples of one distribution over K ids with n1 and n2
      values differ by about (K - 1) / (8 ln 2) * (1/n1 + 1/n2) bits from sampling alone;
      where that exceeds half the threshold, the measure would be noise.
    """
    features = [feature_stats(s) for s in statistics]
    out = {}
    for name in sorted(set().union(*features)):
        threshold = cfg.thresholds(name)[0]
        if not name.startswith("ids_") or threshold is None:
            continue
        stats = [f[name].string_stats for f in features if name in f]
        if any(s.unique > len(s.rank_histogram.buckets) for s in stats):
            out[name] = _CUT
            continue
        ids = max(s.unique for s in stats)
        noise = (ids - 1) / (8 * math.log(2))
        noise *= sum(1 / max(s.common_stats.tot_num_values, 1) for s in stats)
        if noise > threshold / 2:
            out[name] = f"{ids:,} ids, sampling alone about {noise:.2f}"
    return out


def _with_comparators(schema, cfg: DriftConfig, kind: str, no_jensen_shannon):
    """A copy of `schema` carrying drift or skew comparators with the configured thresholds;
    none of Jensen-Shannon on the features of `no_jensen_shannon`."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = copy.deepcopy(schema)
    for feature in schema.feature:
        if feature.name in LABEL_COLUMNS:
            continue
        jensen_shannon, infinity_norm = cfg.thresholds(feature.name)
        comparator = feature.drift_comparator if kind == "drift" else feature.skew_comparator
        if jensen_shannon is not None and feature.name not in no_jensen_shannon:
            comparator.jensen_shannon_divergence.threshold = jensen_shannon
            if feature.type == schema_pb2.FLOAT:  # counts: quantiles, not equal-width buckets
                quantiles = schema_pb2.HistogramSelection.QUANTILES
                comparator.jensen_shannon_divergence.source.type = quantiles
        if infinity_norm is not None and feature.type == schema_pb2.BYTES:
            comparator.infinity_norm.threshold = infinity_norm
    return schema


def _unmeasured_note(kind: str, table: str, unmeasured: dict[str, str]) -> list[str]:
    """The report's note on the features whose Jensen-Shannon divergence was not measured,
    grouped by reason."""
    cut = [name for name, why in unmeasured.items() if why == _CUT]
    sparse = [f"{name} ({why})" for name, why in unmeasured.items() if why != _CUT]
    parts = [f"{_CUT}: {', '.join(cut)}"] if cut else []
    parts += [f"too few values per id: {', '.join(sparse)}"] if sparse else []
    if not parts:
        return []
    return [f"{kind} {table}: Jensen-Shannon not measured (L-infinity is), {'; '.join(parts)}"]


def _comparisons(anomalies, kind: str, table: str) -> list[Comparison]:
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    names = {
        anomalies_pb2.DriftSkewInfo.Measurement.JENSEN_SHANNON_DIVERGENCE: "jensen_shannon",
        anomalies_pb2.DriftSkewInfo.Measurement.L_INFTY: "infinity_norm",
    }
    out = []
    for info in anomalies.drift_skew_info:
        measurements = info.drift_measurements if kind == "drift" else info.skew_measurements
        for m in measurements:
            if m.type in names:
                out.append(
                    Comparison(kind, table, info.path.step[0], names[m.type], m.value, m.threshold)
                )
    return out


def _is_comparator(reason) -> bool:
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    return anomalies_pb2.AnomalyInfo.Type.Name(reason.type).startswith("COMPARATOR_")


def too_few_rows_note(kind: str, table: str, rows: int, cfg: DriftConfig) -> list[str]:
    """The report's note that a drift or skew comparison was not measured, when the smaller
    side has fewer than `min_examples` rows; none when it has enough."""
    if rows >= cfg.min_examples:
        return []
    return [
        f"{kind} {table}: {rows:,} rows on the smaller side, below "
        f"validate.{kind}.min_examples ({cfg.min_examples:,}): not measured"
    ]


def compare(
    kind: str, where: str, table: str, schema, cfg: DriftConfig, train, other
) -> tuple[list[str], list[Comparison], list[str]]:
    """Drift (`other`: the previous version's training statistics) or skew (`other`: the
    test split's) of the training statistics `train`, with the comparators of `cfg`.

    Returns:
        (anomaly lines, comparisons, notes).
    """
    tfdv = import_tfdv()
    unmeasured = unmeasurable_jensen_shannon(cfg, train, other)
    notes = _unmeasured_note(kind, table, unmeasured)
    other_side = {"previous_statistics" if kind == "drift" else "serving_statistics": other}
    found = tfdv.validate_statistics(
        train,
        _with_comparators(schema, cfg, kind, unmeasured),
        environment=TRAINING,
        **other_side,
    )
    return _anomaly_lines(where, found, _is_comparator), _comparisons(found, kind, table), notes


def schema_anomalies(where: str, statistics, schema) -> list[str]:
    """Anomalies of one split and table: against the schema (TRAINING environment), then
    the label checks."""
    tfdv = import_tfdv()
    found = tfdv.validate_statistics(statistics, schema, environment=TRAINING)
    return _anomaly_lines(where, found) + _label_checks(where, statistics)


def _label_checks(where: str, statistics) -> list[str]:
    """What a schema cannot say: labels outside {0, 1} and conversions without a click."""
    feats = feature_stats(statistics)
    lines = []
    for key in LABEL_KEYS:
        if key in feats:
            num = feats[key].num_stats
            if num.min < 0 or num.max > 1:
                lines.append(
                    f"{where}: feature '{key}': label outside {{0, 1}}: "
                    f"values range from {num.min:g} to {num.max:g}"
                )
    rates = label_rates(statistics)
    without_click = rates.conversions - rates.clicked_conversions
    if CONVERSION_LABEL_KEY in feats and CLICK_LABEL_KEY in feats and without_click > 0:
        lines.append(
            f"{where}: feature '{CONVERSION_LABEL_KEY}': conversion without click: "
            f"{without_click:,} rows have conversion=1 and click=0"
        )
    return lines


def label_drift(previous: LabelRates, current: LabelRates, cfg: LabelDriftConfig) -> list[str]:
    """Anomalies of the click rate and the conversion rate given a click: a relative change
    from the previous version larger than allowed."""
    lines = []
    for key, name, old, new, limit in (
        (CLICK_LABEL_KEY, "click rate (CTR)", previous.ctr, current.ctr, cfg.max_ctr_change),
        (
            CONVERSION_LABEL_KEY,
            "conversion rate given click",
            previous.cvr,
            current.cvr,
            cfg.max_cvr_change,
        ),
    ):
        if limit is None or not old > 0 or not np.isfinite(new):
            continue
        change = new / old - 1
        if abs(change) > limit:
            lines.append(
                f"drift train/impressions: feature '{key}': {name} changed by {change:+.1%} "
                f"({old:.4f} -> {new:.4f}), more than the allowed {limit:.0%}"
            )
    return lines
