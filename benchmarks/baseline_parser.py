"""Reference points for the ingest benchmark: pure-Python Ali-CCP parsers, in three modes.

`--usual`: the usual script. The preprocessing that most public ESMM reproductions run on
the raw files (Dongbo Xi's Ali-CCP script, reused by PaddleRec, torch-rechub, AITM and
others; "What common reproductions do" in ALI_CCP_FORMAT.md). Written here from that
algorithm, step for step, not copied:

- per split, load the whole common-features file into a dict: for each line
  `line.strip().split(',')`, `np.array(re.split('\x01|\x02|\x03', feature_list))`, and
  `dict(zip(kv[0::3], kv[1::3]))` (field -> id, so the last id of a multi-valued field wins,
  and the weights are thrown away);
- stream the skeleton the same way, silently skip `click=0, conversion=1` rows, join each
  line's dict with its context's (`common[key]`: an unknown key raises `KeyError`), and write
  `click,purchase` plus one id per column of `USUAL_COLUMNS` ('0' when absent) to a joined
  CSV, counting how often each id occurs per column (train only);
- second pass: label-encode the ids seen more than `USUAL_MIN_COUNT` times (1, 2, ... per
  column; 0 for the rest) and write `train.csv` and `dev.csv` (about 10% of the train rows,
  drawn at random with a fixed seed) and `test.csv`. The joined `*.csv.tmp` files are left
  behind, as the scripts do.

Default mode: an optimised parser, a stricter reference point. It does what the usual
script's first pass does, written as plainly and as fast as that approach allows:

- load the whole common-features file into a dict keyed by `common_feature_index`
  (each context's feature list is parsed once, at load time, not once per impression);
- stream the skeleton file line by line, split on ',' and on the 0x01/0x02/0x03 separators;
- join each impression with its context from the dict;
- drop `click=0, conversion=1` rows (and impressions whose context is missing), silently;
- keep the LAST id of each multi-valued field, throwing every other entry and all weights away;
- write one CSV per split with one column per field.

It is deliberately NOT slowed down: no csv module, no numpy, no regexes, no per-entry float
parsing, `str.partition` instead of splitting every entry; and it skips the second pass
(label-encoding). Standard library only, so its memory footprint is the interpreter plus its
data. Output: `train.csv`, `test.csv` with the header `sample_id,click,conversion,<field
ids...>` (all fields, as in `COMMON_FIELDS` and `SKELETON_FIELDS`); an absent field is an
empty cell.

`--keep-all`: the optimised parser keeping every entry with its parsed id and weight (the
information our ingestion keeps), written as the denormalised join.

    python -m benchmarks.baseline_parser RAW_DIR OUT_DIR            # optimised; JSON summary
    python -m benchmarks.baseline_parser RAW_DIR OUT_DIR --usual    # the usual script
"""

from __future__ import annotations

import argparse
import json
import random
import re
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


# --- the usual script ------------------------------------------------------------------------

# The columns the public scripts keep: single-valued fields and the item-side crosses (the
# 14-day behaviour lists 109_14/110_14/127_14/150_14 and the intention node 210 are dropped).
USUAL_COLUMNS = (
    "101", "121", "122", "124", "125", "126", "127", "128", "129",
    "205", "206", "207", "216", "508", "509", "702", "853", "301",
)  # fmt: skip
USUAL_MIN_COUNT = 10  # ids seen more often than this get their own code
USUAL_DEV_FRACTION = 0.1
_SEPARATORS = re.compile("\x01|\x02|\x03")


def _usual_splitter():
    """field -> id of a feature list, the scripts' way (the last id of a field wins).

    numpy is imported here: only this mode uses it, as the scripts do."""
    import numpy as np

    def fields(feature_list: str) -> dict[str, str]:
        kv = np.array(_SEPARATORS.split(feature_list))
        return dict(zip(kv[0::3], kv[1::3], strict=False))

    return fields


def _usual_join(raw_dir: Path, split: str, joined: Path, vocab: dict | None) -> dict[str, int]:
    """Pass 1: contexts into a dict, then the skeleton joined with them into a CSV."""
    _usual_fields = _usual_splitter()
    common = {}
    with open(raw_dir / f"common_features_{split}.csv") as fh:
        for line in fh:
            parts = line.strip().split(",")
            common[parts[0]] = _usual_fields(parts[2])
    read = written = dropped = 0
    with open(raw_dir / f"sample_skeleton_{split}.csv") as fr, open(joined, "w") as fw:
        fw.write("click,purchase," + ",".join(USUAL_COLUMNS) + "\n")
        for line in fr:
            read += 1
            parts = line.strip().split(",")
            if parts[1] == "0" and parts[2] == "1":
                dropped += 1
                continue
            features = _usual_fields(parts[5])
            features.update(common[parts[3]])
            fw.write(",".join(parts[1:3] + [features.get(k, "0") for k in USUAL_COLUMNS]) + "\n")
            if vocab is not None:
                for k in USUAL_COLUMNS:
                    v = features.get(k)
                    if v is not None:
                        counts = vocab[k]
                        counts[v] = counts.get(v, 0) + 1
            written += 1
    return {
        "contexts": len(common),
        "rows_read": read,
        "rows_written": written,
        "dropped_conversion_without_click": dropped,
    }


def _usual_encode(joined: Path, outs: list[Path], codes: dict, rng: random.Random | None) -> None:
    """Pass 2: ids replaced by their codes; with `rng`, rows split between outs[0] and outs[1]."""
    files = [open(out, "w") for out in outs]  # noqa: SIM115 (closed below)
    try:
        with open(joined) as fr:
            header = fr.readline()
            for fh in files:
                fh.write(header)
            for line in fr:
                parts = line.strip().split(",")
                encoded = parts[:2] + [
                    str(codes[k].get(v, 0)) for v, k in zip(parts[2:], USUAL_COLUMNS, strict=True)
                ]
                dev = rng is not None and rng.random() < USUAL_DEV_FRACTION
                files[1 if dev else 0].write(",".join(encoded) + "\n")
    finally:
        for fh in files:
            fh.close()


def usual_script(raw_dir: Path, out_dir: Path, seed: int = 2018) -> dict[str, dict[str, int]]:
    """The usual public preprocessing: join, count, label-encode, split train/dev, test."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, dict[str, int]] = {k: {} for k in USUAL_COLUMNS}
    train = _usual_join(raw_dir, "train", out_dir / "train.csv.tmp", vocab)
    codes = {
        k: {v: i for i, v in enumerate((v for v, n in counts.items() if n > USUAL_MIN_COUNT), 1)}
        for k, counts in vocab.items()
    }
    train["vocabulary"] = sum(len(c) for c in codes.values())
    del vocab
    outs = [out_dir / "train.csv", out_dir / "dev.csv"]
    _usual_encode(out_dir / "train.csv.tmp", outs, codes, random.Random(seed))
    test = _usual_join(raw_dir, "test", out_dir / "test.csv.tmp", None)
    _usual_encode(out_dir / "test.csv.tmp", [out_dir / "test.csv"], codes, None)
    return {"train": train, "test": test}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--usual",
        action="store_true",
        help="the usual public script (regex split, numpy array, dict zip, two passes)",
    )
    mode.add_argument(
        "--keep-all",
        action="store_true",
        help="keep every entry with its parsed id and weight (the work our ingestion does) "
        "instead of the last id of each field",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.usual:
        splits = usual_script(args.raw_dir, args.out_dir)
    else:
        if args.keep_all:
            global _fields_of
            _fields_of = _all_entries
        splits = parse_ali_ccp(args.raw_dir, args.out_dir)
    mode_name = "usual" if args.usual else "keep-all" if args.keep_all else "optimised"
    json.dump(
        {"mode": mode_name, "seconds": round(time.perf_counter() - start, 3), "splits": splits},
        sys.stdout,
        indent=2,
    )
    print()


if __name__ == "__main__":
    main()
