"""Reference point for the ingest benchmark: a straightforward pure-Python Ali-CCP parser.

This is what the usual public ESMM reproduction scripts do (see "What common reproductions
do" in ALI_CCP_FORMAT.md), written as plainly and as fast as that approach allows:

- load the whole common-features file into a dict keyed by `common_feature_index`
  (each context's feature list is parsed once, at load time, not once per impression);
- stream the skeleton file line by line, split on ',' and on the 0x01/0x02/0x03 separators;
- join each impression with its context from the dict;
- drop `click=0, conversion=1` rows (and impressions whose context is missing), silently;
- keep the LAST id of each multi-valued field, throwing every other entry and all weights away;
- write one CSV per split with one column per field.

It is deliberately NOT slowed down: no csv module, no pandas, no regexes, no per-entry float
parsing; and it skips the second pass the public scripts also make (label-encoding ids seen
at least ~10 times), so it is an optimistic baseline. Standard library only, so its memory
footprint is the interpreter plus its data.

Output (under `out_dir`): `train.csv`, `test.csv` with the header
`sample_id,click,conversion,<field ids...>`; an absent field is an empty cell.

    python -m benchmarks.baseline_parser RAW_DIR OUT_DIR    # prints a JSON summary
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Hard-coded as the public scripts do (same order as models.features.ALL_FIELDS).
COMMON_FIELDS = (
    "101", "121", "122", "124", "125", "126", "127", "128", "129",
    "109_14", "110_14", "127_14", "150_14",
)  # fmt: skip
SKELETON_FIELDS = ("205", "206", "207", "210", "216", "508", "509", "702", "853", "301")
SPLITS = ("train", "test")
_BUFFER = 1 << 20


def _last_ids(feature_list: str, fields: tuple[str, ...]) -> list[str]:
    """Id of the last entry of each of `fields` in a feature list ('' when absent)."""
    last: dict[str, str] = {}
    for entry in feature_list.split("\x01"):
        field, _, rest = entry.partition("\x02")
        last[field] = rest  # later entries of a multi-valued field overwrite earlier ones
    out = []
    for f in fields:
        rest = last.get(f)
        out.append(rest.partition("\x03")[0] if rest else "")
    return out


def _all_entries(feature_list: str, fields: tuple[str, ...]) -> list[str]:
    """Every entry of each of `fields`, id and weight parsed, as `id:weight;id:weight` cells.

    The `--keep-all` variant: the same information our ingestion keeps, parsed the plain way.
    """
    lists: dict[str, list[str]] = {}
    for entry in feature_list.split("\x01"):
        field, _, rest = entry.partition("\x02")
        fid, _, value = rest.partition("\x03")
        lists.setdefault(field, []).append(f"{int(fid)}:{float(value)}")
    return [";".join(lists.get(f, ())) for f in fields]


_fields_of = _last_ids


def load_common(path: Path) -> dict[str, str]:
    """common_feature_index -> the CSV text of its common-field columns."""
    common: dict[str, str] = {}
    with open(path, encoding="utf-8", buffering=_BUFFER) as fh:
        for line in fh:
            key, _num, feature_list = line.rstrip("\r\n").split(",", 2)
            common[key] = ",".join(_fields_of(feature_list, COMMON_FIELDS))
    return common


def parse_split(raw_dir: Path, out_path: Path, split: str) -> dict[str, int]:
    """Join one split's skeleton with its common features and write it as CSV."""
    common = load_common(raw_dir / f"common_features_{split}.csv")
    read = written = dropped_label = dropped_key = 0
    header = ",".join(("sample_id", "click", "conversion", *COMMON_FIELDS, *SKELETON_FIELDS))
    with (
        open(raw_dir / f"sample_skeleton_{split}.csv", encoding="utf-8", buffering=_BUFFER) as fh,
        open(out_path, "w", encoding="utf-8", buffering=_BUFFER) as out,
    ):
        out.write(header + "\n")
        write = out.write
        for line in fh:
            read += 1
            sample_id, click, conversion, key, _num, feature_list = line.rstrip("\r\n").split(
                ",", 5
            )
            if click == "0" and conversion == "1":
                dropped_label += 1
                continue
            user = common.get(key)
            if user is None:
                dropped_key += 1
                continue
            item = ",".join(_fields_of(feature_list, SKELETON_FIELDS))
            write(f"{sample_id},{click},{conversion},{user},{item}\n")
            written += 1
    return {
        "contexts": len(common),
        "rows_read": read,
        "rows_written": written,
        "dropped_conversion_without_click": dropped_label,
        "dropped_unknown_key": dropped_key,
    }


def parse_ali_ccp(raw_dir: Path, out_dir: Path) -> dict[str, dict[str, int]]:
    """Parse train then test; the train dict is freed before test is loaded."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {split: parse_split(raw_dir, out_dir / f"{split}.csv", split) for split in SPLITS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--keep-all",
        action="store_true",
        help="keep every entry with its parsed id and weight (the work our ingestion does) "
        "instead of the last id of each field",
    )
    args = parser.parse_args(argv)
    if args.keep_all:
        global _fields_of
        _fields_of = _all_entries
    start = time.perf_counter()
    splits = parse_ali_ccp(args.raw_dir, args.out_dir)
    json.dump(
        {"seconds": round(time.perf_counter() - start, 3), "splits": splits}, sys.stdout, indent=2
    )
    print()


if __name__ == "__main__":
    main()
