"""How close to the oracle can any model get? An upper bound from an informed "genie".

The generator's oracle AUC scores the test split with the TRUE probabilities. Those include
two things no model trained on the data can know:

- the hidden per-context noise (`SynthProfile.context_noise`): test contexts are new;
- each item's own click and conversion effects (`item_ctr`, `item_cvr`), which a training
  set reveals only through that item's few impressions (the default profile has about 20
  per item at every size, about 1.4 clicks and 0.2 conversions each).

The genie is told everything else exactly: every other parameter of the generator's world,
each training impression's full logit except its item's effects (the context noise of
training impressions included), and the prior the item effects were drawn from. It then
predicts each test impression with the exact Bayesian posterior predictive: the item's
effects averaged over their posterior given that item's training labels (on the empirical
prior of all items' (ctr, cvr) effects), and the context noise averaged over its prior
(Gauss-Hermite). Any model learns strictly less from the same training data, so the
genie's AUCs bound from above what a model can reach on this data, and `oracle - genie` is
a gap no model can close.

The train and test impressions and labels are replayed from the generator's own random
streams, so they are exactly those of `tasks.synth.synthesize_ali_ccp(...)` with the same
arguments (checked: the replayed oracle AUCs equal the written `oracle.json`).

    python -m benchmarks.attainable --train 1000000 --test 300000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METRICS = ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked")


def replay(n_train: int, n_test: int, seed: int, profile: str = "default"):
    """The world, the calibrated biases and per split the impressions' truth and labels."""
    from tasks import synth as S

    prof = S._resolve_profile(profile)
    sizes = S._WorldSizes.for_train_size(n_train, prof)
    world = S._build_world(sizes, prof, S._rng(seed, S._WORLD_STREAM, 0))
    bias_ctr, bias_cvr = S._calibrate(world, S._rng(seed, S._PILOT_STREAM, 0))
    scale = 10**S.PROBABILITY_DIGITS
    splits = {}
    for split_index, (split, n) in enumerate(zip(S.SPLITS, (n_train, n_test), strict=True)):
        users, context_sizes = S._draw_contexts(
            world, n, S._rng(seed, S._CONTEXT_STREAM, split_index)
        )
        parts: dict[str, list[np.ndarray]] = {}
        for chunk, start in enumerate(range(0, len(users), S._CHUNK_CONTEXTS)):
            stop = start + S._CHUNK_CONTEXTS
            rng = S._rng(seed, S._CHUNK_STREAM + split_index, chunk)
            block = S._simulate(world, users[start:stop], context_sizes[start:stop], rng)
            # The writer's label draws, in its order (tasks.synth._SplitWriter.write).
            top = scale - 1
            q_ctr = np.minimum(np.rint(S._sigmoid(block.logit_ctr + bias_ctr) * scale), top)
            q_cvr = np.minimum(np.rint(S._sigmoid(block.logit_cvr + bias_cvr) * scale), top)
            click = rng.random(len(q_ctr)) < q_ctr / scale
            conversion = click & (rng.random(len(q_ctr)) < q_cvr / scale)
            user = block.context_user[block.impression_context]
            taste = np.einsum("ij,ij->i", world.user_taste[user], world.item_taste[block.item])
            for key, value in (
                ("item", block.item),
                # named parts of the true click logit (the rest: profile x category,
                # position, the crosses' history counts)
                ("taste_ctr", prof.affinity * taste),
                ("item_ctr", world.item_ctr[block.item]),
                ("brand_ctr", world.brand_ctr[block.brand]),
                ("category_ctr", world.category_ctr[block.category]),
                ("known_ctr", block.logit_ctr - world.item_ctr[block.item] - block.hidden_ctr),
                ("known_cvr", block.logit_cvr - world.item_cvr[block.item] - block.hidden_cvr),
                ("hidden_ctr", block.hidden_ctr),
                ("hidden_cvr", block.hidden_cvr),
                ("p_ctr", q_ctr / scale),
                ("p_cvr", q_cvr / scale),
                ("click", click),
                ("conversion", conversion),
            ):
                parts.setdefault(key, []).append(value)
        splits[split] = {k: np.concatenate(v) for k, v in parts.items()}
    return world, (bias_ctr, bias_cvr), splits


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def item_posteriors(
    train: dict[str, np.ndarray],
    support_ctr: np.ndarray,
    support_cvr: np.ndarray,
    bias: tuple[float, float],
    n_items: int,
    chunk: int = 20_000,
) -> np.ndarray:
    """(n_items, K) posterior weights of each item over the K prior support points."""
    loglik = np.zeros((n_items, len(support_ctr)))
    a = train["known_ctr"] + train["hidden_ctr"] + bias[0]  # the genie knows training noise
    b = train["known_cvr"] + train["hidden_cvr"] + bias[1]
    click, conv, item = train["click"], train["conversion"], train["item"]
    for start in range(0, len(a), chunk):
        s = slice(start, start + chunk)
        logit = a[s, None] + support_ctr[None, :]
        ll = np.where(click[s, None], _log_sigmoid(logit), _log_sigmoid(-logit))
        clicked = click[s]
        logit_v = b[s][clicked, None] + support_cvr[None, :]
        ll[clicked] += np.where(
            conv[s][clicked, None], _log_sigmoid(logit_v), _log_sigmoid(-logit_v)
        )
        np.add.at(loglik, item[s], ll)
    loglik -= loglik.max(axis=1, keepdims=True)
    weights = np.exp(loglik)
    return weights / weights.sum(axis=1, keepdims=True)


def genie_predict(
    test: dict[str, np.ndarray],
    posterior: np.ndarray,
    support_ctr: np.ndarray,
    support_cvr: np.ndarray,
    bias: tuple[float, float],
    noise: float,
    nodes: int = 5,
    chunk: int = 5_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior predictive p_ctr and p_ctcvr of each test impression.

    Context noise: e_ctr ~ N(0, noise), e_cvr = 0.3 e_ctr + N(0, noise) (tasks.synth)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)  # probabilists': weight exp(-x^2/2)
    w = w / w.sum()
    e_ctr = noise * x[:, None] + 0.0 * x[None, :]  # (nodes, nodes)
    e_cvr = 0.3 * e_ctr + noise * x[None, :]
    e_w = (w[:, None] * w[None, :]).ravel()
    e_ctr, e_cvr = e_ctr.ravel(), e_cvr.ravel()
    p_ctr = np.empty(len(test["item"]))
    p_ctcvr = np.empty(len(test["item"]))
    for start in range(0, len(p_ctr), chunk):
        s = slice(start, start + chunk)
        post = posterior[test["item"][s]]  # (n, K)
        a = test["known_ctr"][s, None, None] + bias[0] + support_ctr[None, :, None] + e_ctr
        b = test["known_cvr"][s, None, None] + bias[1] + support_cvr[None, :, None] + e_cvr
        sa = 1.0 / (1.0 + np.exp(-a))  # (n, K, E)
        sb = 1.0 / (1.0 + np.exp(-b))
        p_ctr[s] = np.einsum("nk,nke,e->n", post, sa, e_w)
        p_ctcvr[s] = np.einsum("nk,nke,e->n", post, sa * sb, e_w)
    return p_ctr, p_ctcvr


def aucs(
    click: np.ndarray,
    conversion: np.ndarray,
    p_ctr: np.ndarray,
    p_ctcvr: np.ndarray,
    p_cvr: np.ndarray | None = None,
):
    """CTR and CTCVR AUC on all impressions, CVR AUC on clicked ones, as the evaluation step
    computes them (p_cvr defaults to p_ctcvr / p_ctr)."""
    import pandas as pd

    from tasks.evaluate import compute_metrics

    if p_cvr is None:
        p_cvr = p_ctcvr / np.maximum(p_ctr, 1e-12)
    frame = pd.DataFrame(
        {
            "click": click.astype(np.int64),
            "conversion": conversion.astype(np.int64),
            "p_ctr": p_ctr,
            "p_cvr": p_cvr,
            "p_ctcvr": p_ctcvr,
        }
    )
    metrics = compute_metrics(frame)
    return {m: metrics[m] for m in METRICS}


CTR_PARTS = ("taste_ctr", "item_ctr", "brand_ctr", "category_ctr")


def ctr_auc_without_parts(split: dict[str, np.ndarray]) -> dict[str, float]:
    """CTR AUC of the true click logit (context noise left out) with each named part, and
    taste and item effects together, taken out: what each part is worth to a ranker."""
    from sklearn.metrics import roc_auc_score

    logit = split["known_ctr"] + split["item_ctr"]
    drops = {part: split[part] for part in CTR_PARTS}
    drops["taste_ctr+item_ctr"] = split["taste_ctr"] + split["item_ctr"]
    out = {"nothing": round(float(roc_auc_score(split["click"], logit)), 4)}
    for name, part in drops.items():
        out[name] = round(float(roc_auc_score(split["click"], logit - part)), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1_000_000)
    parser.add_argument("--test", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--support", type=int, default=256, help="prior support points")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    from benchmarks.machine import machine_info, write_record

    start = time.perf_counter()
    world, bias, splits = replay(args.train, args.test, args.seed, args.profile)
    train, test = splits["train"], splits["test"]
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(world.item_ctr), size=args.support, replace=False)
    support_ctr, support_cvr = world.item_ctr[pick], world.item_cvr[pick]
    posterior = item_posteriors(train, support_ctr, support_cvr, bias, len(world.item_ctr))
    noise = world.profile.context_noise
    p_ctr, p_ctcvr = genie_predict(test, posterior, support_ctr, support_cvr, bias, noise)
    click, conv = test["click"], test["conversion"]
    oracle = aucs(click, conv, test["p_ctr"], test["p_ctr"] * test["p_cvr"], test["p_cvr"])
    genie = aucs(click, conv, p_ctr, p_ctcvr)
    # Item effects known too: only the context noise integrated out.
    a = test["known_ctr"] + world.item_ctr[test["item"]]
    b = test["known_cvr"] + world.item_cvr[test["item"]]
    items_known = genie_predict(
        {**test, "known_ctr": a, "known_cvr": b, "item": np.zeros(len(a), dtype=np.int64)},
        np.ones((1, 1)),
        np.zeros(1),
        np.zeros(1),
        bias,
        noise,
    )
    no_noise = aucs(click, conv, *items_known)
    without = ctr_auc_without_parts(test)
    seen = np.bincount(train["item"], minlength=len(world.item_ctr))
    record = {
        "benchmark": "attainable",
        "machine": machine_info(),
        "profile": args.profile,
        "seed": args.seed,
        "train_impressions": args.train,
        "test_impressions": args.test,
        "items": len(world.item_ctr),
        "train_impressions_per_item_median": float(np.median(seen[seen > 0])),
        "test_impressions_with_unseen_item": float(np.mean(seen[test["item"]] == 0)),
        "oracle": {m: round(v, 4) for m, v in oracle.items()},
        "without_context_noise": {m: round(v, 4) for m, v in no_noise.items()},
        "genie": {m: round(v, 4) for m, v in genie.items()},
        "irreducible_gap": {m: round(oracle[m] - genie[m], 4) for m in METRICS},
        "ctr_auc_of_the_true_logit_without": without,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(record, indent=2))
    path = write_record(args.out, f"attainable-{args.profile}-{args.train}", record)
    print(f"wrote {path}")
    if not math.isfinite(genie["ctr_auc"]):
        raise SystemExit("genie AUC is not finite")


if __name__ == "__main__":
    main()
