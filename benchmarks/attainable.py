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

That genie is generous: it is also told each user's taste and conversion fit (the latent
user x item terms of both logits), which a model sees only through the user's behaviour
history and own labels. A second, tighter estimate, the "data genie", is told everything
else as before but learns those two user latents from the data: the taste's prior mean from
the user's category history, profile category and gender (a ridge regression on history
summaries fitted out-of-fold over the world's users, `taste_from_history`), then the
Laplace posterior mode of taste and fit given the user's training clicks and conversions
(`user_posteriors`). It still knows every item's latents and every global parameter, which a
model must learn from the same data, so `oracle - data genie` is a gap a model cannot be
expected to close (not a strict bound: the history step is a linear estimate of the
posterior mean, and the posterior is used as a point estimate).

A third, tighter still, the "category genie", also learns the items' latents only as far
as their categories show them (`item_latents_by_category`: each item's taste and fit
replaced by its category's mean; an item's own deviation shows only through its few
training impressions), learns the users' latents against those, and then the items' own
effects against both estimates. It is still told every category's latents, the functional
form and every global effect, which a model must learn from the same data.

The train and test impressions and labels are replayed from the generator's own random
streams, so they are exactly those of `aliccp.synth.synthesize_ali_ccp(...)` with the same
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
    from aliccp.format import RAW_SPLITS
    from aliccp.synth.generate import CHUNK_CONTEXTS
    from aliccp.synth.profiles import resolve_profile
    from aliccp.synth.simulate import calibrate, draw_contexts, simulate
    from aliccp.synth.streams import (
        CHUNK_STREAM,
        CONTEXT_STREAM,
        PILOT_STREAM,
        WORLD_STREAM,
        stream_rng,
    )
    from aliccp.synth.world import WorldSizes, build_world
    from aliccp.synth.writer import PROBABILITY_DIGITS
    from models.numeric import sigmoid

    prof = resolve_profile(profile)
    sizes = WorldSizes.for_train_size(n_train, prof)
    world = build_world(sizes, prof, stream_rng(seed, WORLD_STREAM, 0))
    bias_ctr, bias_cvr = calibrate(world, stream_rng(seed, PILOT_STREAM, 0))
    scale = 10**PROBABILITY_DIGITS
    splits = {}
    for split_index, (split, n) in enumerate(zip(RAW_SPLITS, (n_train, n_test), strict=True)):
        users, context_sizes = draw_contexts(
            world, n, stream_rng(seed, CONTEXT_STREAM, split_index)
        )
        parts: dict[str, list[np.ndarray]] = {}
        for chunk, start in enumerate(range(0, len(users), CHUNK_CONTEXTS)):
            stop = start + CHUNK_CONTEXTS
            rng = stream_rng(seed, CHUNK_STREAM + split_index, chunk)
            block = simulate(world, users[start:stop], context_sizes[start:stop], rng)
            # The writer's label draws, in its order (aliccp.synth.writer._draw_labels).
            top = scale - 1
            q_ctr = np.minimum(np.rint(sigmoid(block.logit_ctr + bias_ctr) * scale), top)
            q_cvr = np.minimum(np.rint(sigmoid(block.logit_cvr + bias_cvr) * scale), top)
            click = rng.random(len(q_ctr)) < q_ctr / scale
            conversion = click & (rng.random(len(q_ctr)) < q_cvr / scale)
            user = block.context_user[block.impression_context]
            taste = np.einsum("ij,ij->i", world.user_taste[user], world.item_taste[block.item])
            fit = np.einsum("ij,ij->i", world.user_fit[user], world.item_fit[block.item])
            for key, value in (
                ("item", block.item),
                ("user", user),
                # named parts of the true click logit (the rest: profile x category,
                # position, the crosses' history counts)
                ("taste_ctr", prof.affinity * taste),
                ("taste_cvr", prof.cvr_affinity * taste),
                ("fit_cvr", prof.cvr_fit * fit),
                ("item_cvr", world.item_cvr[block.item]),
                ("brand_cvr", world.brand_cvr[block.brand]),
                ("category_cvr", world.category_cvr[block.category]),
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


def category_means(world, values: np.ndarray) -> np.ndarray:
    """(categories, dim): the mean of `values` (one row per item) over each category's items."""
    n_cat = len(world.category_ctr)
    count = np.bincount(world.item_category, minlength=n_cat)
    means = np.zeros((n_cat, values.shape[1]))
    np.add.at(means, world.item_category, values)
    return means / np.maximum(count, 1)[:, None]


def item_latents_by_category(world) -> tuple[np.ndarray, np.ndarray]:
    """Each item's taste and fit latents replaced by its category's mean over items: what
    a model can learn of an item's latents through its category. An item's own deviation
    (a fifth of the taste's variance, a third of the fit's, in the default profile) shows
    only through its few training impressions (about 1.4 clicks each)."""
    category = world.item_category
    return (
        category_means(world, world.item_taste)[category],
        category_means(world, world.item_fit)[category],
    )


def learnt_share(estimate: np.ndarray, truth: np.ndarray) -> float:
    """The least-squares coefficient of `estimate` on `truth`: the share of the true
    effect an estimate carries, as `benchmarks/decompose.py` reports it for a model."""
    cov = np.cov(estimate, truth)
    return float(cov[0, 1] / cov[1, 1])


def taste_from_history(world, folds: int = 2, alphas=(0.3, 1.0, 3.0, 10.0), seed: int = 0):
    """Each user's taste as predicted from what a model sees of the user: the category
    history (109_14, with its rates), the profile category (121) and the gender.

    Ridge regression on history summaries (the chosen categories' and their log rates'
    category tastes, summed and averaged), fitted out-of-fold on the world's users with the
    best ridge penalty: an estimate of E[taste | history]. Returns the (users, dim) estimate
    and the covariance of its residuals (the prior of the click posterior).
    """
    n_users, dim = world.user_taste.shape
    # Category tastes: the mean taste of each category's items (items = category + noise).
    category_taste = category_means(world, world.item_taste)
    lists = world.history["109_14"]
    owner = np.repeat(np.arange(n_users), np.diff(lists.offsets))
    chosen = np.zeros((n_users, dim))
    np.add.at(chosen, owner, category_taste[lists.entity])
    rated = np.zeros((n_users, dim))
    np.add.at(rated, owner, np.log(lists.rate)[:, None] * category_taste[lists.entity])
    length = np.maximum(np.diff(lists.offsets), 1)[:, None]
    from aliccp.synth import PROFILE_FIELDS

    profile_category = world.user_profile[:, PROFILE_FIELDS.index("121")]
    gender = world.user_profile[:, PROFILE_FIELDS.index("124")]
    onehot_121 = np.eye(int(profile_category.max()) + 1)[profile_category]
    x = np.hstack(
        [chosen, rated, chosen / length, onehot_121, gender[:, None], np.ones((n_users, 1))]
    )
    y = world.user_taste
    fold = np.random.default_rng(seed).integers(0, folds, n_users)
    best = None
    for alpha in alphas:
        pred = np.zeros_like(y)
        for f in range(folds):
            fit, held = fold != f, fold == f
            w = np.linalg.solve(x[fit].T @ x[fit] + alpha * np.eye(x.shape[1]), x[fit].T @ y[fit])
            pred[held] = x[held] @ w
        error = float(((y - pred) ** 2).sum())
        if best is None or error < best[0]:
            best = (error, pred)
    pred = best[1]
    residual = y - pred
    return pred, residual.T @ residual / n_users


def user_posteriors(
    world,
    train: dict[str, np.ndarray],
    bias: tuple[float, float],
    newton_steps: int = 8,
    item_taste: np.ndarray | None = None,
    item_fit: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior modes of each user's taste and conversion fit (Laplace), from the history
    (the prior, `taste_from_history`; the fit's prior is its N(0, I)) and the user's training
    clicks and conversions. Everything else in each training logit is given exactly,
    item effects and item latents included (the latents are the world's unless
    `item_taste` / `item_fit` give others, e.g. `item_latents_by_category`).
    Returns (users, taste dim), (users, fit dim)."""
    prof = world.profile
    item_taste = world.item_taste if item_taste is None else item_taste
    item_fit = world.item_fit if item_fit is None else item_fit
    taste_mean, taste_cov = taste_from_history(world)
    n_users, d_taste = world.user_taste.shape
    d_fit = world.user_fit.shape[1]
    d = d_taste + d_fit
    prior_mean = np.hstack([taste_mean, np.zeros((n_users, d_fit))])
    prior_precision = np.zeros((d, d))
    prior_precision[:d_taste, :d_taste] = np.linalg.inv(taste_cov)
    prior_precision[d_taste:, d_taste:] = np.eye(d_fit)
    user, item, click = train["user"], train["item"], train["click"]
    # Click logit = offset + x . z (z = [taste, fit]); conversion likewise on clicked rows.
    x_ctr = np.hstack([prof.affinity * item_taste[item], np.zeros((len(item), d_fit))])
    x_cvr = np.hstack([prof.cvr_affinity * item_taste[item], prof.cvr_fit * item_fit[item]])[click]
    rest = train["hidden_ctr"] + world.item_ctr[item] + bias[0]
    o_ctr = train["known_ctr"] - train["taste_ctr"] + rest
    rest_cvr = train["hidden_cvr"] + world.item_cvr[item] + bias[1]
    o_cvr = (train["known_cvr"] - train["taste_cvr"] - train["fit_cvr"] + rest_cvr)[click]
    rows = (
        (user, o_ctr, x_ctr, click.astype(float)),
        (user[click], o_cvr, x_cvr, train["conversion"][click].astype(float)),
    )
    z = prior_mean.copy()
    for _ in range(newton_steps):
        grad = -(z - prior_mean) @ prior_precision
        hess = np.broadcast_to(-prior_precision, (n_users, d, d)).copy()
        for owner, offset, x, label in rows:
            p = 1.0 / (1.0 + np.exp(-(offset + np.einsum("ij,ij->i", x, z[owner]))))
            np.add.at(grad, owner, (label - p)[:, None] * x)
            np.add.at(hess, owner, -(p * (1 - p))[:, None, None] * x[:, :, None] * x[:, None, :])
        z = z - np.linalg.solve(hess, grad[:, :, None])[:, :, 0]
    return z[:, :d_taste], z[:, d_taste:]


def with_user_estimates(
    world,
    split: dict[str, np.ndarray],
    taste: np.ndarray,
    fit: np.ndarray,
    item_taste: np.ndarray | None = None,
    item_fit: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The split with the true user x item taste and fit terms in its known logits replaced
    by those of estimated user latents (and, if given, estimated item latents)."""
    prof = world.profile
    item_taste = world.item_taste if item_taste is None else item_taste
    item_fit = world.item_fit if item_fit is None else item_fit
    user, item = split["user"], split["item"]
    t = np.einsum("ij,ij->i", taste[user], item_taste[item])
    f = np.einsum("ij,ij->i", fit[user], item_fit[item])
    known_ctr = split["known_ctr"] - split["taste_ctr"] + prof.affinity * t
    known_cvr = (
        split["known_cvr"]
        - split["taste_cvr"]
        - split["fit_cvr"]
        + prof.cvr_affinity * t
        + prof.cvr_fit * f
    )
    return {**split, "known_ctr": known_ctr, "known_cvr": known_cvr}


def learnt_users_genie(
    world,
    splits: dict[str, dict[str, np.ndarray]],
    bias: tuple[float, float],
    support_ctr: np.ndarray,
    support_cvr: np.ndarray,
    item_taste: np.ndarray,
    item_fit: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """p_ctr and p_ctcvr of the test split by a genie given these item latents: the users'
    latents learnt against them (`user_posteriors`), then the items' own effects against
    both (`item_posteriors`), the context noise averaged out (`genie_predict`)."""
    train, test = splits["train"], splits["test"]
    taste, fit = user_posteriors(world, train, bias, 8, item_taste, item_fit)
    posterior = item_posteriors(
        with_user_estimates(world, train, taste, fit, item_taste, item_fit),
        support_ctr,
        support_cvr,
        bias,
        len(world.item_ctr),
    )
    return genie_predict(
        with_user_estimates(world, test, taste, fit, item_taste, item_fit),
        posterior,
        support_ctr,
        support_cvr,
        bias,
        world.profile.context_noise,
    )


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

    Context noise: e_ctr ~ N(0, noise), e_cvr = 0.3 e_ctr + N(0, noise) (aliccp.synth)."""
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
# named parts of the true conversion logit (the rest: price fit, the brand and shop
# history counts)
CVR_PARTS = ("taste_cvr", "fit_cvr", "item_cvr", "brand_cvr", "category_cvr")


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


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1_000_000)
    parser.add_argument("--test", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--support", type=int, default=256, help="prior support points")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args()


def _genies(world, bias, splits: dict, seed: int, support: int) -> dict:
    """The test AUCs of the oracle and of each genie, the taste the data reveal, and how
    much of the items' own effects the genie's posterior means carry."""
    train, test = splits["train"], splits["test"]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(world.item_ctr), size=support, replace=False)
    support_ctr, support_cvr = world.item_ctr[pick], world.item_cvr[pick]
    posterior = item_posteriors(train, support_ctr, support_cvr, bias, len(world.item_ctr))
    noise = world.profile.context_noise
    p_ctr, p_ctcvr = genie_predict(test, posterior, support_ctr, support_cvr, bias, noise)
    click, conv = test["click"], test["conversion"]
    oracle = aucs(click, conv, test["p_ctr"], test["p_ctr"] * test["p_cvr"], test["p_cvr"])
    genie = aucs(click, conv, p_ctr, p_ctcvr)
    # The users' taste and conversion fit only as the data reveal them.
    taste, fit = user_posteriors(world, train, bias)
    p_ctr_u, p_ctcvr_u = genie_predict(
        with_user_estimates(world, test, taste, fit),
        posterior,
        support_ctr,
        support_cvr,
        bias,
        noise,
    )
    data_genie = aucs(click, conv, p_ctr_u, p_ctcvr_u)
    # Items' latents too only as far as their categories show them: users' latents, then
    # the items' own effects, learnt against those estimates.
    by_category = item_latents_by_category(world)
    category_genie = aucs(
        click,
        conv,
        *learnt_users_genie(world, splits, bias, support_ctr, support_cvr, *by_category),
    )
    test_users = test["user"]
    taste_corr = np.corrcoef(
        np.einsum("ij,ij->i", taste[test_users], world.item_taste[test["item"]]),
        test["taste_ctr"],
    )[0, 1]
    no_noise = _items_known(world, test, bias, noise)
    # How much of the items' own effects the genie's posterior means carry (a model's
    # coefficients on the same parts are in `decompose.py`'s record).
    item, clicked = test["item"], test["click"]
    item_share = {
        "item_ctr": learnt_share((posterior @ support_ctr)[item], test["item_ctr"]),
        "item_cvr_clicked": learnt_share(
            (posterior @ support_cvr)[item][clicked], test["item_cvr"][clicked]
        ),
    }
    return {
        "oracle": oracle,
        "genie": genie,
        "data_genie": data_genie,
        "taste_corr": taste_corr,
        "category_genie": category_genie,
        "no_noise": no_noise,
        "item_share": item_share,
    }


def _items_known(world, test: dict, bias, noise) -> dict[str, float]:
    """The AUCs with the item effects known too: only the context noise integrated out."""
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
    return aucs(test["click"], test["conversion"], *items_known)


def _record(args: argparse.Namespace, world, splits: dict, found: dict, start: float) -> dict:
    """The JSON record of a run: its settings, the data's coverage and the genies' AUCs
    (`found`, from `_genies`) with their gaps to the oracle."""
    from benchmarks.machine import machine_info

    train, test = splits["train"], splits["test"]
    oracle, genie = found["oracle"], found["genie"]
    data_genie, category_genie = found["data_genie"], found["category_genie"]
    without = ctr_auc_without_parts(test)
    seen = np.bincount(train["item"], minlength=len(world.item_ctr))
    return {
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
        "without_context_noise": {m: round(v, 4) for m, v in found["no_noise"].items()},
        "genie": {m: round(v, 4) for m, v in genie.items()},
        "irreducible_gap": {m: round(oracle[m] - genie[m], 4) for m in METRICS},
        "genie_users_from_data": {m: round(v, 4) for m, v in data_genie.items()},
        "gap_users_from_data": {m: round(oracle[m] - data_genie[m], 4) for m in METRICS},
        "test_taste_correlation_users_from_data": round(float(found["taste_corr"]), 4),
        "genie_items_by_category": {m: round(v, 4) for m, v in category_genie.items()},
        "gap_items_by_category": {m: round(oracle[m] - category_genie[m], 4) for m in METRICS},
        "ctr_auc_of_the_true_logit_without": without,
        "genie_item_effect_coefficients": {k: round(v, 3) for k, v in found["item_share"].items()},
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    """Replay the data, score the oracle and the genies, record and print the result."""
    args = _arguments()

    from benchmarks.machine import write_record

    start = time.perf_counter()
    world, bias, splits = replay(args.train, args.test, args.seed, args.profile)
    found = _genies(world, bias, splits, args.seed, args.support)
    record = _record(args, world, splits, found, start)
    print(json.dumps(record, indent=2))
    path = write_record(args.out, f"attainable-{args.profile}-{args.train}", record)
    print(f"wrote {path}")
    if not math.isfinite(found["genie"]["ctr_auc"]):
        raise SystemExit("genie AUC is not finite")


if __name__ == "__main__":
    main()
