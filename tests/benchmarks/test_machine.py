"""Benchmark records: named by benchmark, date and tag, and never overwritten."""

from __future__ import annotations

import json

from benchmarks.machine import machine_info, write_record


def test_records_are_named_by_date_and_tag_and_never_overwrite_each_other(tmp_path):
    record = {"machine": machine_info(), "value": 1}
    day = record["machine"]["date"][:10]
    first = write_record(tmp_path / "results", "quality-table-1000", record, tag="seed7")
    assert first.name == f"quality-table-1000-{day}-seed7.json"
    second = write_record(
        tmp_path / "results", "quality-table-1000", {**record, "value": 2}, "seed7"
    )
    assert second != first and second.name.startswith(first.stem + "-")
    assert json.loads(first.read_text())["value"] == 1
    assert json.loads(second.read_text())["value"] == 2
