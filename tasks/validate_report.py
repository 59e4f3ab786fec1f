"""The validation reports a person reads: `report.txt` and a self-contained `report.html`.

Both hold the same facts: the verdict, each anomaly, the label rates, every drift and skew
measurement against its threshold, and per-feature statistics of every split and table. The
HTML page is plain HTML with inline CSS and matplotlib charts embedded as base64 PNGs: no
script and nothing fetched, so it opens offline (TFDV's own viewer loads Facets from a CDN).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

from aliccp.format import SPLITS

TEXT_NAME, HTML_NAME = "report.txt", "report.html"


@dataclass(frozen=True)
class FeatureRow:
    name: str
    kind: str  # "categorical" (ids), "numeric" (weights, labels)
    present: float  # share of rows with a value (an absent field is an empty list)
    values_min: int
    values_mean: float
    values_max: int
    unique: int | None  # distinct values (categorical)
    top: str  # most frequent value and its share (categorical) or mean/min/max (numeric)


def feature_rows(statistics) -> list[FeatureRow]:
    """One row per feature of a one-dataset statistics list."""
    if not statistics.datasets:
        return []
    dataset = statistics.datasets[0]
    n = max(dataset.num_examples, 1)
    rows = []
    for f in sorted(dataset.features, key=lambda f: f.path.step[0]):
        name = f.path.step[0]
        if f.HasField("string_stats"):
            s = f.string_stats
            common = s.common_stats
            share = s.top_values[0].frequency / max(common.tot_num_values, 1) if s.top_values else 0
            top = f"{s.top_values[0].value} ({share:.1%})" if s.top_values else ""
            rows.append(
                FeatureRow(
                    name,
                    "categorical",
                    common.num_non_missing / n,
                    int(common.min_num_values),
                    common.avg_num_values,
                    int(common.max_num_values),
                    int(s.unique),
                    top,
                )
            )
        else:
            s = f.num_stats
            common = s.common_stats
            rows.append(
                FeatureRow(
                    name,
                    "numeric",
                    common.num_non_missing / n,
                    int(common.min_num_values),
                    common.avg_num_values,
                    int(common.max_num_values),
                    None,
                    f"mean {s.mean:.4g}, min {s.min:.4g}, max {s.max:.4g}",
                )
            )
    return rows


def render_text(result, statistics) -> str:
    """The plain-text report."""
    out = [
        f"ESMM data validation: {'PASSED' if result.passed else 'FAILED'}",
        f"data version: {result.data_version or 'unknown'}; "
        f"drift measured against: {result.previous_version or 'none'}",
        "rows profiled: " + ", ".join(f"{k} {v:,}" for k, v in result.num_examples.items()),
        "",
        f"Anomalies ({len(result.anomalies)})",
    ]
    out += [f"  - {a}" for a in result.anomalies] or ["  none"]
    if result.notes:
        out += ["", "Notes"] + [f"  - {n}" for n in result.notes]
    out += [
        "",
        "Label rates",
        f"  {'data':<10}{'rows':>12}{'clicks':>10}{'conv.':>8}{'CTR':>9}{'CVR|click':>11}",
    ]
    for name, r in result.label_rates.items():
        out.append(
            f"  {name:<10}{r.impressions:>12,}{r.clicks:>10,}{r.conversions:>8,}"
            f"{r.ctr:>9.4f}{r.cvr:>11.4f}"
        )
    out += ["", "Drift and skew (value / threshold)"]
    if not result.comparisons:
        out.append("  none measured")
    for c in _sorted(result.comparisons):
        flag = "ok  " if c.passed else "HIGH"
        out.append(
            f"  {flag} {c.kind:<5} {c.table:<11} {c.feature:<18} {c.measure:<14} "
            f"{c.value:.4f} / {c.threshold:.4f}"
        )
    for key, stats in statistics.items():
        rows = feature_rows(stats)
        if not rows:
            continue
        split, table = key.split("_", 1)
        out += [
            "",
            f"Statistics {split}/{table}",
            f"  {'feature':<18}{'present':>9}{'values min/mean/max':>22}  {'unique':>7}  top / summary",
        ]
        for r in rows:
            unique = "" if r.unique is None else f"{r.unique:,}"
            out.append(
                f"  {r.name:<18}{r.present:>9.1%}{r.values_min:>8}/{r.values_mean:>6.2f}/"
                f"{r.values_max:<6}  {unique:>7}  {r.top}"
            )
    return "\n".join(out) + "\n"


def _sorted(comparisons):
    return sorted(comparisons, key=lambda c: (c.passed, -c.value / c.threshold))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _charts(result, statistics) -> list[tuple[str, str]]:
    """(title, data URI) of each chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    charts = []
    # Presence of each field per split: an emptied or dropped field stands out.
    for table in ("impressions", "common"):
        per_split = {s: feature_rows(statistics.get(f"{s}_{table}")) for s in SPLITS}
        names = [r.name for r in per_split["train"] if r.name.startswith("ids_")]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 3))
        width = 0.8 / len(SPLITS)
        for i, split in enumerate(SPLITS):
            present = {r.name: r.present for r in per_split[split]}
            ax.bar(
                np.arange(len(names)) + i * width,
                [present.get(n, 0) for n in names],
                width,
                label=split,
            )
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, [n[4:] for n in names], rotation=45)
        ax.set_ylabel("rows with the field")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax.set_title(f"{table}: share of rows where each field is present")
        charts.append((f"Field presence ({table})", _png(fig)))
    # Label rates per split (and the previous version).
    if result.label_rates:
        names = list(result.label_rates)
        fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
        for ax, attr, title in ((axes[0], "ctr", "CTR"), (axes[1], "cvr", "CVR given click")):
            ax.bar(names, [getattr(result.label_rates[n], attr) for n in names], color="#4a78a8")
            ax.set_title(title)
        charts.append(("Label rates", _png(fig)))
    # Each drift/skew measurement as a share of its threshold.
    if result.comparisons:
        comps = _sorted(result.comparisons)[:40]
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(comps))))
        ratios = [c.value / c.threshold for c in comps]
        ax.barh(
            range(len(comps)),
            ratios,
            color=["#c0392b" if not c.passed else "#4a78a8" for c in comps],
        )
        ax.axvline(1.0, color="black", lw=1)
        ax.set_yticks(
            range(len(comps)),
            [f"{c.kind} {c.table}/{c.feature} {c.measure}" for c in comps],
            fontsize=7,
        )
        ax.invert_yaxis()
        ax.set_xlabel("value / threshold (above 1 is an anomaly)")
        charts.append(("Drift and skew against thresholds", _png(fig)))
    return charts


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1 .ok{color:#1e7d32} h1 .bad{color:#c0392b}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left} tr.high td{background:#fbe3e0}
li.anomaly{color:#c0392b} code{background:#f3f3f3;padding:0 3px}
details{margin:.3em 0} summary{cursor:pointer;font-weight:600}
"""


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


_HEAD = (
    "<!doctype html><html><head><meta charset='utf-8'><title>ESMM data validation</title>\n"
    f"<style>{_CSS}</style></head><body>"
)
_RATE_HEADER = [
    "data",
    "rows",
    "clicks",
    "conversions",
    "clicked conversions",
    "CTR",
    "CVR given click",
]
_COMPARISON_HEADER = ["kind", "table", "feature", "measure", "value", "threshold", "status"]
_FEATURE_HEADER = [
    "feature",
    "type",
    "present",
    "values min",
    "values mean",
    "values max",
    "unique",
    "top value / summary",
]


def _html_summary(result) -> list[str]:
    """The verdict, the data version, the rows profiled, the anomalies and the notes."""
    e = html.escape
    verdict = (
        '<span class="ok">passed</span>' if result.passed else '<span class="bad">FAILED</span>'
    )
    parts = [
        f"<h1>ESMM data validation: {verdict}</h1>",
        f"<p>Data version <code>{e(result.data_version or 'unknown')}</code>; drift measured "
        f"against <code>{e(result.previous_version or 'none')}</code>.<br>Rows profiled: "
        + e(", ".join(f"{k} {v:,}" for k, v in result.num_examples.items()))
        + "</p>",
        f"<h2>Anomalies ({len(result.anomalies)})</h2><ul>",
    ]
    parts += [f'<li class="anomaly">{e(a)}</li>' for a in result.anomalies] or ["<li>none</li>"]
    parts.append("</ul>")
    if result.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{e(n)}</li>" for n in result.notes] + ["</ul>"]
    return parts


def _html_label_rates(result) -> list[str]:
    rows = [
        [
            k,
            f"{r.impressions:,}",
            f"{r.clicks:,}",
            f"{r.conversions:,}",
            f"{r.clicked_conversions:,}",
            f"{r.ctr:.4f}",
            f"{r.cvr:.4f}",
        ]
        for k, r in result.label_rates.items()
    ]
    return ["<h2>Label rates</h2>", _table(_RATE_HEADER, rows)]


def _html_comparisons(result) -> list[str]:
    comps = _sorted(result.comparisons)
    if not comps:
        return ["<h2>Drift and skew</h2>", "<p>none measured</p>"]
    rows = [
        [
            c.kind,
            c.table,
            c.feature,
            c.measure,
            f"{c.value:.4f}",
            f"{c.threshold:.4f}",
            "ok" if c.passed else "HIGH",
        ]
        for c in comps
    ]
    classes = ["" if c.passed else "high" for c in comps]
    return ["<h2>Drift and skew</h2>", _table(_COMPARISON_HEADER, rows, classes)]


def _html_charts(result, statistics) -> list[str]:
    e = html.escape
    parts = ["<h2>Charts</h2>"]
    for title, uri in _charts(result, statistics):
        parts.append(f"<h3>{e(title)}</h3><img alt='{e(title)}' src='{uri}'>")
    return parts


def _html_statistics(statistics) -> list[str]:
    """One folding section per split and table (the training splits open)."""
    e = html.escape
    parts = ["<h2>Statistics</h2>"]
    for key, stats in statistics.items():
        split, table = key.split("_", 1)
        parts.append(
            f"<details{' open' if split == 'train' else ''}><summary>{e(split)}/{e(table)} "
            f"({sum(d.num_examples for d in stats.datasets):,} rows)</summary>"
        )
        rows = [
            [
                r.name,
                r.kind,
                f"{r.present:.1%}",
                str(r.values_min),
                f"{r.values_mean:.2f}",
                str(r.values_max),
                "" if r.unique is None else f"{r.unique:,}",
                r.top,
            ]
            for r in feature_rows(stats)
        ]
        parts.append(_table(_FEATURE_HEADER, rows))
        parts.append("</details>")
    return parts


def render_html(result, statistics) -> str:
    """The self-contained HTML report."""
    parts = [
        _HEAD,
        *_html_summary(result),
        *_html_label_rates(result),
        *_html_comparisons(result),
        *_html_charts(result, statistics),
        *_html_statistics(statistics),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_reports(result, statistics: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write `report.txt` and `report.html` into out_dir; returns their paths."""
    text_path, html_path = Path(out_dir) / TEXT_NAME, Path(out_dir) / HTML_NAME
    text_path.write_text(render_text(result, statistics))
    html_path.write_text(render_html(result, statistics))
    return text_path, html_path
