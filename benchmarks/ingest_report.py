"""The report of the ingestion benchmark (`benchmarks.ingest`): the baselines it names, the
table printed after a run, and the README table of every recorded result (older records
included: before the usual script, one baseline; before the start load, the first run's).
"""

from __future__ import annotations

import json
from pathlib import Path

# Baselines: name -> (label, extra arguments of benchmarks.baseline_parser).
BASELINES = {
    "usual": ("usual script", ["--usual"]),
    "optimised": ("optimised parser", []),
}


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time among the successful ones (all runs when none was)."""
    ok = [r for r in runs if r["exit_code"] == 0] or runs
    return sorted(ok, key=lambda r: r["wall_s"])[len(ok) // 2]


def _get(d: dict | None, key: str, spec: str = ",.0f") -> str:
    """d[key] formatted, or '-' when the run is missing, failed or the value is unknown."""
    if not d or d.get(key) is None or (d.get("ok") is False and key != "wall_s"):
        return "-"
    return format(d[key], spec)


def _baselines_of(record: dict) -> dict[str, dict | None]:
    """name -> summary of each baseline; records before the usual script had one baseline
    (`baseline`, the optimised parser)."""
    if "baselines" in record:
        return record["baselines"]
    return {"usual": None, "optimised": record.get("baseline")}


def _csv_mb_of(record: dict) -> dict[str, float | None]:
    sizes = record["sizes_mb"]
    if "baseline_csv_mb" in sizes:
        return sizes["baseline_csv_mb"]
    return {"usual": None, "optimised": sizes.get("baseline_csv")}


def _load_of(record: dict) -> float | None:
    """1-min load average when the record's runs started (older records: before ours ran)."""
    if record.get("loadavg_start"):
        return record["loadavg_start"][0]
    runs = (record.get("ours") or {}).get("runs") or []
    loads = [r["loadavg_1min_before"] for r in runs if "loadavg_1min_before" in r]
    return loads[0] if loads else None


def _max_load_of(record: dict) -> float | None:
    """Highest 1-min load average seen before or after any run of the record."""
    sides = [record.get("ours"), *_baselines_of(record).values()]
    loads = [
        r[key]
        for side in sides
        if side
        for r in side.get("runs", [])
        for key in ("loadavg_1min_before", "loadavg_1min_after")
        if key in r
    ]
    return max(loads) if loads else None


def _fmt_load(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def result_table(record: dict) -> str:
    ours, bases, csv_mb = record["ours"], _baselines_of(record), _csv_mb_of(record)
    sizes = record["sizes_mb"]
    names = [n for n, b in bases.items() if b]
    sides = [("ours", ours)] + [(BASELINES[n][0], bases[n]) for n in names]
    rows = [
        ("", *[name for name, _ in sides]),
        ("ok", *[str(s.get("ok", "-")) for _, s in sides]),
        ("wall s", *[_get(s, "wall_s", ".1f") for _, s in sides]),
        ("impressions/s", *[_get(s, "impressions_per_s") for _, s in sides]),
        ("CPU s", *[_get(s, "cpu_s", ".1f") for _, s in sides]),
        ("peak RSS MB", *[_get(s, "peak_rss_mb") for _, s in sides]),
        ("peak tree PSS MB", *[_get(s, "peak_tree_pss_mb") for _, s in sides]),
        ("interpreter+imports MB", *[_get(s, "floor_rss_mb") for _, s in sides]),
        (
            "output MB",
            _get(sizes, "ours_output", ",.1f"),
            *[_get(csv_mb, n, ",.1f") for n in names],
        ),
        ("impressions written", *[_get(s, "impressions_written") for _, s in sides]),
    ]
    lines = ["".join(f"{c:>18}" if i else f"{c:<24}" for i, c in enumerate(r)) for r in rows]
    for n in names:
        lines.append(f"speed-up vs {BASELINES[n][0]}: {record['speedups'][n]}x")
    lines.append(
        f"raw text {sizes['raw_text']:,.1f} MB -> ours {sizes['ours_output']:,.1f} MB "
        f"(Parquet {sizes['ours_parquet']:,.1f}); 1-min load average at start "
        f"{_fmt_load(_load_of(record))}, at most {_fmt_load(_max_load_of(record))} between runs"
    )
    return "\n".join(lines)


def markdown_table(results: Path) -> str:
    """One README row per recorded ingest result (older records: no usual-script columns)."""
    head = (
        "| date | machine | code | profile | impressions (train+test) "
        "| load (1 min): at start / max between runs "
        "| ours imp/s | usual script imp/s | optimised parser imp/s "
        "| speed-up vs usual script | speed-up vs optimised parser "
        "| ours peak RSS MB (tree PSS) | usual script peak RSS MB | optimised parser peak RSS MB "
        "| raw text MB | ours output MB | usual script CSV MB | optimised parser CSV MB |\n"
        + "|---" * 18
        + "|"
    )
    rows = [head]
    records = [json.loads(p.read_text()) for p in results.glob("ingest-*.json")]
    for r in sorted(records, key=lambda r: (r["impressions"]["total"], r["machine"]["date"])):
        m, o, s, c = r["machine"], r["ours"], r["sizes_mb"], r["code"]
        bases, csv_mb = _baselines_of(r), _csv_mb_of(r)
        code = f"{c['commit'][:7]} (ingest code {c['tasks_ingest_sha256'][:8]})"
        if c["tasks_ingest_uncommitted"]:
            code += " + uncommitted ingest code"
        if c.get("changed_during_run"):
            code += " (changed during run)"
        for key, value in (r.get("params_ingest_overrides") or {}).items():
            code += f", {key}={value}"
        speedups = []
        for name in BASELINES:
            b = bases.get(name)
            ok = o["ok"] and b and b["ok"]
            speedups.append(f"{b['wall_s'] / o['wall_s']:.2f}x" if ok else "-")
        load = f"{_fmt_load(_load_of(r))} / {_fmt_load(_max_load_of(r))}"
        rss = " | ".join(_get(bases.get(n), "peak_rss_mb") for n in BASELINES)
        rates = " | ".join(_get(bases.get(n), "impressions_per_s") for n in BASELINES)
        csvs = " | ".join(_get(csv_mb, n) for n in BASELINES)
        rows.append(
            f"| {m['date'][:10]} | {m['cores']} cores, {m['cpu']} | {code} "
            f"| {r['raw']['profile']} | {r['impressions']['total']:,} "
            f"| {load} "
            f"| {_get(o, 'impressions_per_s')} | {rates} | {' | '.join(speedups)} "
            f"| {_get(o, 'peak_rss_mb')} ({_get(o, 'peak_tree_pss_mb')}) | {rss} "
            f"| {s['raw_text']:,.0f} | {_get(s, 'ours_output')} | {csvs} |"
        )
    return "\n".join(rows)
