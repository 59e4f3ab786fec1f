"""Validation step: TFDV statistics over Apache Beam, schema checks, drift and skew.

Statistics are computed by TFDV's Beam transform over record batches read straight from the
ingested Parquet files, for the impression table and the user-side table separately (the
denormalised join is never built). The runner is named explicitly: Beam's default local
runner tries to download a binary, which fails offline. Any Beam flags (Flink, Spark,
Dataflow) pass through `validate.beam_options`.

What TFDV sees of a row (`to_tfdv_batch`): ids as categorical strings (`ids_F`), weights as
floats (`wts_F`), an absent field (an empty list) as a missing value, the labels, and the
derived `clicked_conversion` = click * conversion, from which the statistics alone give the
conversions without a click and the conversion rate given a click.

Checks, every one an anomaly that stops the run: each split and table against the committed
schema (`schema/<table>.pbtxt`, TRAINING environment); labels 0/1 and no conversion without
a click; drift of the training split from the previous data version and skew of the test
split from the training split (TFDV's Jensen-Shannon and L-infinity comparators; no
Jensen-Shannon where TFDV's estimate would be noise, `unmeasurable_jensen_shannon`); drift of
the click rate and of the conversion rate given a click. Training statistics of each data
version are kept in a history folder, which is how the previous version is found.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aliccp.format import SPLITS
from models.features import (
    ALL_FIELDS,
    CLICK_LABEL_KEY,
    COMMON_INDEX_KEY,
    CONVERSION_LABEL_KEY,
    CROSS_FIELDS,
    LABEL_KEYS,
    MULTI_VALUED_FIELDS,
    SAMPLE_ID_KEY,
    ids_key,
    wts_key,
)
from tasks.config import DriftConfig, ValidateConfig
from tasks.progress import FileProgress, record

TRAINING, SERVING = "TRAINING", "SERVING"  # schema environments
TABLES: dict[str, str] = {"impressions": "impressions.parquet", "common": "common.parquet"}
CLICKED_CONVERSION_KEY = "clicked_conversion"  # derived: click * conversion
# Label columns as TFDV sees them: absent when serving, never compared for drift (the label
# rates are checked on their own).
LABEL_COLUMNS: tuple[str, ...] = (*LABEL_KEYS, CLICKED_CONVERSION_KEY)
# Keys identify rows; they are not features.
_NOT_FEATURES = (SAMPLE_ID_KEY, COMMON_INDEX_KEY)
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


class DataValidationError(RuntimeError):
    """Anomalies were found; the message names each feature and the reason."""


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


@dataclass(frozen=True)
class LabelRates:
    impressions: int
    clicks: int
    conversions: int
    clicked_conversions: int

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else float("nan")

    @property
    def cvr(self) -> float:
        """Conversion rate given a click."""
        return self.clicked_conversions / self.clicks if self.clicks else float("nan")


@dataclass(frozen=True)
class ValidationResult:
    passed: bool
    anomalies: list[str]  # "where: feature 'f': reason"
    num_examples: dict[str, int]  # "split/table" -> rows profiled
    data_version: str | None = None
    previous_version: str | None = None  # the version drift was measured against
    comparisons: list[Comparison] = field(default_factory=list)
    label_rates: dict[str, LabelRates] = field(default_factory=dict)  # split or "previous"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rows = ", ".join(f"{k} {v:,}" for k, v in self.num_examples.items())
        verdict = "passed" if self.passed else f"FAILED ({len(self.anomalies)} anomalies)"
        return f"validation {verdict}; rows profiled: {rows}"

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "anomalies": self.anomalies,
            "num_examples": self.num_examples,
            "data_version": self.data_version,
            "previous_version": self.previous_version,
            "comparisons": [{**asdict(c), "passed": c.passed} for c in self.comparisons],
            "label_rates": {
                k: {**asdict(r), "ctr": r.ctr, "cvr_given_click": r.cvr}
                for k, r in self.label_rates.items()
            },
            "notes": self.notes,
        }


def _as_lists(col: pa.Array, value_type: pa.DataType) -> pa.Array:
    """A list column with its values cast, and empty lists (an absent field) as nulls."""
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pc.list_flatten(col).cast(value_type)
    # A null offset marks a null list.
    return pa.ListArray.from_arrays(pa.array(offsets, mask=np.append(lengths == 0, False)), values)


def to_tfdv_batch(table: pa.Table | pa.RecordBatch) -> pa.RecordBatch:
    """The record batch TFDV profiles: list columns, ids as strings, empty lists missing,
    keys dropped, and `clicked_conversion` added when both labels are there."""
    columns, names = [], []
    for name in table.column_names:
        if name in _NOT_FEATURES:
            continue
        col = table.column(name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if name.startswith("ids_"):
            col = _as_lists(col, pa.string())  # ids are categories, not quantities
        elif name.startswith("wts_"):
            col = _as_lists(col, pa.float32())
        else:  # a label: one int per row
            col = pa.ListArray.from_arrays(
                pa.array(np.arange(len(col) + 1, dtype=np.int32)), col.cast(pa.int64())
            )
        columns.append(col)
        names.append(name)
    if CLICK_LABEL_KEY in names and CONVERSION_LABEL_KEY in names:
        click = pc.list_flatten(columns[names.index(CLICK_LABEL_KEY)])
        conversion = pc.list_flatten(columns[names.index(CONVERSION_LABEL_KEY)])
        both = pc.multiply(click, conversion)
        columns.append(
            pa.ListArray.from_arrays(pa.array(np.arange(len(both) + 1, dtype=np.int32)), both)
        )
        names.append(CLICKED_CONVERSION_KEY)
    return pa.RecordBatch.from_arrays(columns, names=names)


def pipeline_options(cfg: ValidateConfig):
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions([f"--runner={cfg.beam_runner}", *cfg.beam_options])


def _tfdv():
    """TFDV, imported without its notice that IPython is missing (its display helpers are
    for notebooks; the reports here are built without them). TFDV is imported only where it
    is used: it takes seconds and `esmm --help` must not wait for it."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        import tensorflow_data_validation as tfdv
    return tfdv


def _counted(table: pa.Table, progress_path: str) -> pa.RecordBatch:
    """`to_tfdv_batch`, counting the rows for the progress line (runs in Beam's workers)."""
    record(progress_path, table.num_rows)
    return to_tfdv_batch(table)


def generate_statistics(tables: dict[str, Path], out_dir: Path, cfg: ValidateConfig) -> dict:
    """TFDV statistics of several Parquet tables, computed in ONE Beam pipeline (one runner
    start-up, one branch per table); each saved as `out_dir/<name>.stats.binpb`.

    Returns:
        {name: DatasetFeatureStatisticsList}.
    """
    import apache_beam as beam

    tfdv = _tfdv()
    from apache_beam.io.parquetio import ReadFromParquetBatched

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.stats.binpb" for name in tables}
    for path in paths.values():  # a fresh run, not Beam's warning about overwriting
        path.unlink(missing_ok=True)
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in tables.values())
    progress = FileProgress("validate: statistics", rows, "rows", out_dir / ".progress")
    with progress, beam.Pipeline(options=pipeline_options(cfg)) as pipeline:
        for name, parquet_path in tables.items():
            _ = (
                pipeline
                | f"Read[{name}]" >> ReadFromParquetBatched(str(parquet_path))
                | f"ToRecordBatch[{name}]" >> beam.Map(_counted, str(progress.path))
                | f"Statistics[{name}]" >> tfdv.GenerateStatistics(tfdv.StatsOptions())
                | f"Write[{name}]" >> tfdv.WriteStatisticsToBinaryFile(str(paths[name]))
            )
    return {name: tfdv.load_stats_binary(str(path)) for name, path in paths.items()}


def _features(statistics) -> dict:
    """{feature name: FeatureNameStatistics} of a one-dataset statistics list."""
    if not statistics.datasets:
        return {}
    return {f.path.step[0]: f for f in statistics.datasets[0].features}


def _num_examples(statistics) -> int:
    return sum(d.num_examples for d in statistics.datasets)


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
    tfdv = _tfdv()
    from tensorflow_metadata.proto.v0 import schema_pb2

    schema = tfdv.infer_schema(
        statistics, infer_feature_shape=False, max_string_domain_size=max_domain_size
    )
    schema.default_environment.extend([TRAINING, SERVING])
    stats = _features(statistics)
    rows = max(_num_examples(statistics), 1)
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


def _anomaly_lines(where: str, anomalies, keep=lambda reason: True) -> list[str]:
    lines = []
    for name, info in sorted(anomalies.anomaly_info.items()):
        reasons = [r for r in info.reason if keep(r)]
        if reasons:
            text = "; ".join(f"{r.short_description}: {r.description}" for r in reasons)
            lines.append(f"{where}: feature '{name}': {text}")
    return lines


_CUT = "more distinct ids than TFDV's rank histogram holds"


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
    features = [_features(s) for s in statistics]
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


def label_rates(statistics) -> LabelRates:
    """Impressions, clicks, conversions and clicked conversions from impression statistics."""
    feats = _features(statistics)

    def total(key: str) -> int:
        if key not in feats:
            return 0
        num = feats[key].num_stats
        return round(num.mean * num.common_stats.num_non_missing)

    return LabelRates(
        _num_examples(statistics),
        total(CLICK_LABEL_KEY),
        total(CONVERSION_LABEL_KEY),
        total(CLICKED_CONVERSION_KEY),
    )


def _label_checks(where: str, statistics) -> list[str]:
    """What a schema cannot say: labels outside {0, 1} and conversions without a click."""
    feats = _features(statistics)
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


def _label_drift(previous: LabelRates, current: LabelRates, cfg) -> list[str]:
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


def _save_history(history_dir: Path, version: str, out_dir: Path) -> None:
    """Keep this version's training statistics (overwriting an earlier run of it)."""
    folder = history_dir / version
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for table in TABLES:
        shutil.copy2(out_dir / f"train_{table}.stats.binpb", folder)
    created = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    (folder / "version.json").write_text(json.dumps({"version": version, "created": created}))


def previous_version(history_dir: Path, version: str | None) -> str | None:
    """The most recently saved version in the history other than `version`."""
    saved = []
    for meta in Path(history_dir).glob("*/version.json"):
        info = json.loads(meta.read_text())
        if info["version"] != version:
            saved.append((info["created"], info["version"]))
    return max(saved)[1] if saved else None


def validate_data(
    ingest_dir: Path,
    out_dir: Path,
    schema_dir: Path,
    cfg: ValidateConfig,
    data_version: str | None = None,
    history_dir: Path | None = None,
) -> ValidationResult:
    """Profile every split and table and run every check; write the statistics and reports.

    Args:
        data_version: names this data in the statistics history; without it (or without
            `history_dir`) there is no drift check.
        history_dir: training statistics per data version (`<version>/*.stats.binpb`).

    Raises:
        DataValidationError: anomalies were found (after the reports are written).
    """
    tfdv = _tfdv()

    from tasks.validate_report import write_reports

    known = {key(f) for f in ALL_FIELDS for key in (ids_key, wts_key)}
    for kind, section in (("drift", cfg.drift), ("skew", cfg.skew)):
        unknown = sorted(set(section.features) - known)
        if unknown:
            raise ValueError(f"validate.{kind}.features: unknown feature(s) {unknown}")
    out_dir, schema_dir = Path(out_dir), Path(schema_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("report.json", "report.txt", "report.html"):  # never show an old verdict
        (out_dir / stale).unlink(missing_ok=True)
    anomalies: list[str] = []
    notes: list[str] = []
    num_examples: dict[str, int] = {}
    inputs = {
        f"{split}_{table}": Path(ingest_dir) / split / filename
        for table, filename in TABLES.items()
        for split in SPLITS
    }
    statistics = generate_statistics(inputs, out_dir, cfg)

    previous = None
    if data_version and history_dir:
        previous = previous_version(history_dir, data_version)
        if previous is None:
            notes.append("no earlier data version in the statistics history: drift not checked")
    else:
        notes.append("no data version given: drift not checked, history not updated")

    comparisons: list[Comparison] = []
    rates: dict[str, LabelRates] = {}
    for table in TABLES:
        schema_path = schema_dir / f"{table}.pbtxt"
        if schema_path.is_file():
            schema = tfdv.load_schema_text(str(schema_path))
        else:  # first run: propose a schema from the training split
            schema = infer_schema(
                statistics[f"train_{table}"], cfg.max_domain_size, cfg.value_domains
            )
            schema_dir.mkdir(parents=True, exist_ok=True)
            tfdv.write_schema_text(schema, str(schema_path))
            notes.append(f"{schema_path} was absent: inferred from this training split")
        # Schema and label checks, split by split.
        for split in SPLITS:
            stats = statistics[f"{split}_{table}"]
            where = f"{split}/{table}"
            num_examples[where] = _num_examples(stats)
            if not num_examples[where]:
                notes.append(f"{where} is empty: not checked")
                continue
            found = tfdv.validate_statistics(stats, schema, environment=TRAINING)
            anomalies += _anomaly_lines(where, found)
            anomalies += _label_checks(where, stats)
            if table == "impressions":
                rates[split] = label_rates(stats)
        train = statistics[f"train_{table}"]
        # Skew: the test split against the training split.
        rows = min(num_examples[f"test/{table}"], num_examples[f"train/{table}"])
        if rows < cfg.skew.min_examples:
            notes.append(
                f"skew {table}: {rows:,} rows on the smaller side, below "
                f"validate.skew.min_examples ({cfg.skew.min_examples:,}): not measured"
            )
        else:
            test = statistics[f"test_{table}"]
            unmeasured = unmeasurable_jensen_shannon(cfg.skew, train, test)
            notes += _unmeasured_note("skew", table, unmeasured)
            found = tfdv.validate_statistics(
                train,
                _with_comparators(schema, cfg.skew, "skew", unmeasured),
                environment=TRAINING,
                serving_statistics=test,
            )
            anomalies += _anomaly_lines(f"skew test vs train/{table}", found, _is_comparator)
            comparisons += _comparisons(found, "skew", table)
        # Drift: this training split against the previous version's.
        if previous is not None:
            old = tfdv.load_stats_binary(
                str(Path(history_dir) / previous / f"train_{table}.stats.binpb")
            )
            rows = min(_num_examples(old), num_examples[f"train/{table}"])
            if table == "impressions":
                rates["previous"] = label_rates(old)
            if rows < cfg.drift.min_examples:
                notes.append(
                    f"drift {table}: {rows:,} rows on the smaller side, below "
                    f"validate.drift.min_examples ({cfg.drift.min_examples:,}): not measured"
                )
                continue
            unmeasured = unmeasurable_jensen_shannon(cfg.drift, train, old)
            notes += _unmeasured_note("drift", table, unmeasured)
            found = tfdv.validate_statistics(
                train,
                _with_comparators(schema, cfg.drift, "drift", unmeasured),
                environment=TRAINING,
                previous_statistics=old,
            )
            anomalies += _anomaly_lines(f"drift train/{table} vs {previous}", found, _is_comparator)
            comparisons += _comparisons(found, "drift", table)
            if table == "impressions":
                anomalies += _label_drift(rates["previous"], rates["train"], cfg.label_drift)

    if data_version and history_dir:
        _save_history(Path(history_dir), data_version, out_dir)
    result = ValidationResult(
        not anomalies,
        anomalies,
        num_examples,
        data_version,
        previous,
        comparisons,
        rates,
        notes,
    )
    (out_dir / "report.json").write_text(json.dumps(result.to_json(), indent=2))
    write_reports(result, statistics, out_dir)
    if anomalies:
        raise DataValidationError("data validation failed:\n  " + "\n  ".join(anomalies))
    return result


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


def validate_records(
    records: pa.Table, schema_path: Path, cfg: ValidateConfig, environment: str = SERVING
) -> list[str]:
    """Anomalies of in-memory records (by default serving records, which carry no labels)
    against one environment of a schema."""
    import tempfile

    import apache_beam as beam

    tfdv = _tfdv()

    schema = tfdv.load_schema_text(str(schema_path))
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "serving.stats.binpb"
        with beam.Pipeline(options=pipeline_options(cfg)) as pipeline:
            _ = (
                pipeline
                | beam.Create([to_tfdv_batch(records)])
                | tfdv.GenerateStatistics(tfdv.StatsOptions())
                | tfdv.WriteStatisticsToBinaryFile(str(stats_path))
            )
        stats = tfdv.load_stats_binary(str(stats_path))
    found = tfdv.validate_statistics(stats, schema, environment=environment)
    return [
        f"feature '{name}': {info.short_description}"
        for name, info in sorted(found.anomaly_info.items())
    ]
