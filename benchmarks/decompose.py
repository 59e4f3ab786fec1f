"""Which parts of the true click logit a trained model has learnt.

The generator's click logit is a sum of named parts (`benchmarks.attainable.replay`): the
user x item taste, the item's, brand's and category's own effects, and the rest (profile
x category effects, position, the crosses' history counts). This script scores the test
split with a trained model (a `model.keras` of `benchmarks.quality` or `esmm train`) and
regresses the model's CTR logit on those parts by least squares: a coefficient of 1 means
the model ranks by that part as the truth does, 0 that it has not learnt it. It does the
same for the model's CVR logit against the true conversion logit's parts (taste, the
user x item fit, the item's, brand's and category's conversion effects, the rest) over
the clicked impressions, where the clicked-CVR AUC is measured. The record also holds what
each click part is worth: the CTR AUC of the true logit without it.

    python -m benchmarks.decompose \\
        --model /work/bench/quality/default-1000000-300000-2018/train-esmm-T/model.keras \\
        --split /work/bench/quality/default-1000000-300000-2018/ingest-2/test \\
        --train 1000000 --test 300000

`--model` and `--first-id-model` (the first-id baseline's models, fed the first id of each
field as they were trained) may be given several times, e.g. one per training seed: the
split is replayed once, each model gets its regressions, and the record adds the mean
coefficients per kind of input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.attainable import CTR_PARTS, CVR_PARTS, ctr_auc_without_parts, replay

REPO = Path(__file__).resolve().parents[1]


def regress_on_parts(
    logit: np.ndarray, split: dict[str, np.ndarray], tower: str = "ctr"
) -> dict[str, object]:
    """Least-squares coefficients of `logit` on the true `tower` logit's parts (and the
    rest), the R^2, and each part's correlation with `logit`."""
    names = CTR_PARTS if tower == "ctr" else CVR_PARTS
    truth = split[f"known_{tower}"] + split[f"item_{tower}"]
    rest = truth - sum(split[p] for p in names)
    parts = {**{p: split[p] for p in names}, "rest": rest}
    design = np.column_stack([*parts.values(), np.ones(len(logit))])
    coef, *_ = np.linalg.lstsq(design, logit, rcond=None)
    residual = logit - design @ coef
    return {
        "coefficients": {p: round(float(c), 3) for p, c in zip(parts, coef, strict=False)},
        "r2": round(float(1 - residual.var() / logit.var()), 3),
        "correlations": {p: round(float(np.corrcoef(logit, v)[0, 1]), 3) for p, v in parts.items()},
        "part_std": {p: round(float(v.std()), 3) for p, v in parts.items()},
    }


def load_model(model_path: Path):
    """A trained `model.keras` (the custom layers registered)."""
    import keras

    import models.esmm  # noqa: F401  (registers the custom layers)

    return keras.models.load_model(model_path)


def model_logits(
    model, split_dir: Path, first_id_only: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's CTR and CVR logits per test impression, in sample-id order, and the
    click labels (`first_id_only`: fed as the first-id baseline was trained)."""
    from benchmarks.first_id import FirstIdReader
    from tasks.inputs import SplitReader, predict_split

    reader = FirstIdReader if first_id_only else SplitReader
    frame = predict_split(model, reader(split_dir))
    order = np.argsort(frame["sample_id"].to_numpy().astype(np.int64), kind="stable")

    def logit(column: str) -> np.ndarray:
        p = np.clip(frame[column].to_numpy()[order], 1e-12, 1 - 1e-12)
        return np.log(p / (1 - p))

    return logit("p_ctr"), logit("p_cvr"), frame["click"].to_numpy()[order]


def model_tables(model, half: str = "towers") -> dict[str, np.ndarray] | None:
    """A model's 109_14 and 206 tables (ESMM's shared ones, else the CTR tower's).

    With `model.interest_match` those tables are twice as wide (as wide as the 205 table
    twice): `half="towers"` gives the columns the towers read, `half="interest"` the ones
    the interest match reads (None for a model without them)."""
    names = {layer.name for layer in model.layers}

    def table(field: str) -> np.ndarray:
        name = f"embedding_{field}" if f"embedding_{field}" in names else f"ctr_embedding_{field}"
        return np.asarray(model.get_layer(name).embeddings)

    dim = table("205").shape[1]
    out = {}
    for field in ("109_14", "206"):
        rows = table(field)
        if half == "interest":
            if rows.shape[1] == dim:
                return None
            out[field] = rows[:, dim:]
        else:
            out[field] = rows[:, :dim]
    return out


def category_tables(
    tables: dict[str, np.ndarray], vocab: dict[str, np.ndarray], ranges: dict, world, splits
) -> dict:
    """How much of the categories' true taste a model's 109_14 (history categories) and
    206 (item category) tables hold, and how much of the user x item taste a bilinear form
    of them can carry.

    Args:
        tables: per field, the table's rows (row 0 the OOV bucket, then `vocab`'s ids), as
            `model_tables` gives them.
        vocab: the model's vocabularies; ranges: `aliccp.synth.feature_id_ranges` of the data.

    Returns:
        `taste_r2_<field>`: R^2 of the best linear map from a table's rows to the true
        category tastes (the mean taste of each category's items), over the categories it
        holds. `bilinear_taste_correlation`: the history table's rows averaged over each
        user's 109_14 list with its rates (as the model's weighted-mean pooling does),
        against the item category's row; the best bilinear form of the two (least squares
        on at most 300k training impressions, fitted to the true taste) correlates this
        much with the true taste on the test split. A model's taste coefficient in the
        regression above is at most about its square.
    """
    from benchmarks.attainable import category_means

    truth = category_means(world, world.item_taste)
    n_cat = len(truth)
    by_category, out = {}, {}
    for field in ("109_14", "206"):
        held = vocab[field] - ranges[field].start
        rows = tables[field][1 : len(held) + 1]
        table = np.zeros((n_cat, rows.shape[1]))
        table[held] = rows  # categories the vocabulary lacks stay zero
        x = np.column_stack([rows, np.ones(len(held))])
        coef, *_ = np.linalg.lstsq(x, truth[held], rcond=None)
        residual = truth[held] - x @ coef
        out[f"taste_r2_{field}"] = round(
            float(1 - (residual**2).sum() / ((truth[held] - truth[held].mean(0)) ** 2).sum()), 3
        )
        by_category[field] = table
    tables = by_category
    lists = world.history["109_14"]
    owner = np.repeat(np.arange(len(world.user_taste)), np.diff(lists.offsets))
    user = np.zeros((len(world.user_taste), tables["109_14"].shape[1]))
    np.add.at(user, owner, lists.rate[:, None] * tables["109_14"][lists.entity])
    total = np.bincount(owner, weights=lists.rate, minlength=len(user))
    user /= np.maximum(total, 1e-12)[:, None]

    def design(split: dict[str, np.ndarray], rows: slice) -> np.ndarray:
        u = user[split["user"][rows]]
        v = tables["206"][world.item_category[split["item"][rows]]]
        return (u[:, :, None] * v[:, None, :]).reshape(len(u), -1)

    fit = slice(0, 300_000)
    coef, *_ = np.linalg.lstsq(
        design(splits["train"], fit), splits["train"]["taste_ctr"][fit], rcond=None
    )
    test = splits["test"]
    estimate = design(test, slice(None)) @ coef
    out["bilinear_taste_correlation"] = round(
        float(np.corrcoef(estimate, test["taste_ctr"])[0, 1]), 3
    )
    return out


_REGRESSIONS = ("model_ctr_logit_on_the_true_parts", "model_cvr_logit_on_the_true_parts_clicked")


def _regressions(path: Path, model, first_id: bool, args, test: dict[str, np.ndarray]) -> dict:
    """One model's regressions of its CTR and CVR logits on the true parts."""
    logit, cvr_logit, click = model_logits(model, args.split, first_id)
    if len(logit) != len(test["click"]) or not np.array_equal(click, test["click"]):
        raise SystemExit(
            f"{args.split}: its {len(logit)} impressions and clicks are not those of the "
            f"generator's test split with --train {args.train} --test {args.test} "
            f"--seed {args.seed} --profile {args.profile}"
        )
    ctr_key, cvr_key = _REGRESSIONS
    return {
        "model": str(path),
        "first_id_only": first_id,
        ctr_key: regress_on_parts(logit, test),
        # on the clicked impressions, where the clicked-CVR AUC is measured
        cvr_key: regress_on_parts(
            cvr_logit[click == 1], {k: v[click == 1] for k, v in test.items()}, "cvr"
        ),
    }


def _arguments() -> tuple[argparse.Namespace, list[tuple[Path, bool]]]:
    """The options, and the models to score as (path, fed the first id only)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, action="append", default=[], help="a trained model.keras"
    )
    parser.add_argument(
        "--first-id-model",
        type=Path,
        action="append",
        default=[],
        help="a model of the first-id baseline (fed the first id of each field)",
    )
    parser.add_argument("--split", type=Path, required=True, help="the ingested test split")
    parser.add_argument("--train", type=int, default=1_000_000)
    parser.add_argument("--test", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--tables",
        action="store_true",
        help="also measure the taste held by each model's 109_14 and 206 tables "
        "(category_tables; default profile's category fields)",
    )
    args = parser.parse_args()
    runs = [(path, False) for path in args.model] + [(path, True) for path in args.first_id_model]
    if not runs:
        parser.error("give at least one --model or --first-id-model")
    return args, runs


def _add_tables(args: argparse.Namespace, entries: list[dict], loaded: list, world, splits) -> dict:
    """Add each model's `category_tables` (and its interest tables') to its entry; returns
    the references: the co-occurrence start of params.yaml's model (every entry) and the
    true category tastes themselves (padded to the same size)."""
    from aliccp.synth import feature_id_ranges
    from benchmarks.attainable import category_means
    from tasks.config import load_params
    from tasks.cooccurrence import cooccurrence_tables
    from tasks.ingest import load_vocabularies
    from tasks.inputs import SplitReader

    vocab = load_vocabularies(args.split.parent / "vocab.parquet")
    ranges = feature_id_ranges(args.train, args.seed, args.profile)
    for entry, model in zip(entries, loaded, strict=True):
        tables = model_tables(model)
        entry["category_tables"] = category_tables(tables, vocab, ranges, world, splits)
        if (interest := model_tables(model, "interest")) is not None:
            entry["interest_tables"] = category_tables(interest, vocab, ranges, world, splits)
    model_cfg = load_params(REPO / "params.yaml").model
    start = cooccurrence_tables(
        SplitReader(args.split.parent / "train"),
        vocab,
        "508",
        model_cfg.embedding_dim,
        model_cfg.cooccurrence_scale,
    )
    truth = category_means(world, world.item_taste)
    told = {
        f: np.vstack([truth[:1] * 0, truth[vocab[f] - ranges[f].start]]) for f in ("109_14", "206")
    }
    return {
        "cooccurrence_start": category_tables(
            {"109_14": start.history, "206": start.item}, vocab, ranges, world, splits
        ),
        "true_category_tastes": category_tables(told, vocab, ranges, world, splits),
    }


def _mean_coefficients(entries: list[dict]) -> dict:
    """Per kind of input (every entry, first id), each regression's mean coefficients."""
    return {
        kind: {
            key: {
                part: round(float(np.mean([e[key]["coefficients"][part] for e in same])), 3)
                for part in same[0][key]["coefficients"]
            }
            for key in _REGRESSIONS
        }
        for kind, first_id in (("every_entry", False), ("first_id", True))
        if (same := [e for e in entries if e["first_id_only"] == first_id])
    }


def main() -> None:
    """Replay the split, regress each model's logits on the true parts, record and print."""
    args, runs = _arguments()

    from benchmarks.machine import machine_info, write_record

    world, _, splits = replay(args.train, args.test, args.seed, args.profile)
    test = splits["test"]
    loaded = [load_model(path) for path, _ in runs]  # each loaded once
    entries = [
        _regressions(path, model, first_id, args, test)
        for (path, first_id), model in zip(runs, loaded, strict=True)
    ]
    reference = _add_tables(args, entries, loaded, world, splits) if args.tables else None
    record = {
        "benchmark": "decompose",
        "machine": machine_info(),
        "profile": args.profile,
        "seed": args.seed,
        "train_impressions": args.train,
        "test_impressions": args.test,
        "ctr_auc_of_the_true_logit_without": ctr_auc_without_parts(test),
    }
    if reference:
        record["category_tables_reference"] = reference
    if len(entries) == 1:
        record.update(entries[0])
    else:
        record["models"] = entries
        record["mean_coefficients"] = _mean_coefficients(entries)
    print(json.dumps(record, indent=2))
    print(f"wrote {write_record(args.out, f'decompose-{args.train}', record, args.tag)}")


if __name__ == "__main__":
    main()
