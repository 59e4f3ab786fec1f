"""The attainable-AUC bound: it replays exactly the generator's data, and it lies between
knowing nothing about items and knowing everything (the oracle)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aliccp.synth import synthesize_ali_ccp
from benchmarks.attainable import (
    aucs,
    genie_predict,
    item_latents_by_category,
    item_posteriors,
    learnt_share,
    learnt_users_genie,
    replay,
    taste_from_history,
    user_posteriors,
    with_user_estimates,
)


def _oracle(test: dict) -> dict:
    """AUCs of the true probabilities, as the generator computes them."""
    return aucs(
        test["click"],
        test["conversion"],
        test["p_ctr"],
        test["p_ctr"] * test["p_cvr"],
        test["p_cvr"],
    )


@pytest.fixture(scope="module")
def world_and_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    synthesize_ali_ccp(out, 20_000, 8_000, seed=5)
    return out, replay(20_000, 8_000, seed=5)


def test_replay_reproduces_the_written_labels_and_truth(world_and_files):
    out, (_, _, splits) = world_and_files
    for split in ("train", "test"):
        rows = np.loadtxt(out / f"sample_skeleton_{split}.csv", delimiter=",", usecols=(1, 2))
        truth = np.loadtxt(
            out / f"ground_truth_{split}.csv", delimiter=",", usecols=(1, 2), skiprows=1
        )
        np.testing.assert_array_equal(rows[:, 0], splits[split]["click"])
        np.testing.assert_array_equal(rows[:, 1], splits[split]["conversion"])
        np.testing.assert_allclose(truth[:, 0], splits[split]["p_ctr"], atol=1e-8)
        np.testing.assert_allclose(truth[:, 1], splits[split]["p_cvr"], atol=1e-8)
    test = splits["test"]
    oracle = _oracle(test)
    written = json.loads((out / "oracle.json").read_text())["test"]
    for metric, value in oracle.items():
        assert value == pytest.approx(written[metric], abs=1e-9)


def test_genie_is_below_the_oracle_and_above_an_item_blind_predictor(world_and_files):
    _, (world, bias, splits) = world_and_files
    train, test = splits["train"], splits["test"]
    support_ctr, support_cvr = world.item_ctr[:128], world.item_cvr[:128]
    n_items = len(world.item_ctr)
    posterior = item_posteriors(train, support_ctr, support_cvr, bias, n_items)
    assert np.allclose(posterior.sum(axis=1), 1.0)
    noise = world.profile.context_noise
    genie = aucs(
        test["click"],
        test["conversion"],
        *genie_predict(test, posterior, support_ctr, support_cvr, bias, noise),
    )
    prior = np.full_like(posterior, 1.0 / posterior.shape[1])  # items never learned
    blind = aucs(
        test["click"],
        test["conversion"],
        *genie_predict(test, prior, support_ctr, support_cvr, bias, noise),
    )
    oracle = _oracle(test)
    assert blind["ctr_auc"] < genie["ctr_auc"] < oracle["ctr_auc"]
    assert genie["ctcvr_auc"] < oracle["ctcvr_auc"]
    # Its posterior means carry part of the items' effects: shrunk towards the prior.
    share = learnt_share((posterior @ support_ctr)[test["item"]], test["item_ctr"])
    assert 0.05 < share < 1.0
    assert learnt_share((prior @ support_ctr)[test["item"]], test["item_ctr"]) == pytest.approx(
        0.0, abs=1e-9
    )


def test_learnt_share_is_the_share_of_the_truth_an_estimate_carries():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=200_000)
    estimate = 0.3 * truth + rng.normal(size=truth.size)  # shrunk, plus independent noise
    assert learnt_share(estimate, truth) == pytest.approx(0.3, abs=0.01)


def test_user_latents_learnt_from_the_data_rank_between_knowing_them_and_not(world_and_files):
    """The data genie: users' taste from their history, then taste and fit from their labels.
    It ranks below the genie told the true latents and above one that knows nothing of them."""
    _, (world, bias, splits) = world_and_files
    train, test = splits["train"], splits["test"]
    prior_taste, residual_cov = taste_from_history(world)
    truth = world.user_taste
    assert np.trace(residual_cov) < 0.8 * truth.var(axis=0).sum()  # history explains taste
    taste, fit = user_posteriors(world, train, bias)
    assert taste.shape == truth.shape and fit.shape == world.user_fit.shape
    r = np.corrcoef(taste.ravel(), truth.ravel())[0, 1]
    assert r > np.corrcoef(prior_taste.ravel(), truth.ravel())[0, 1] - 0.02  # clicks add
    support_ctr, support_cvr = world.item_ctr[:128], world.item_cvr[:128]
    posterior = item_posteriors(train, support_ctr, support_cvr, bias, len(world.item_ctr))
    noise = world.profile.context_noise

    def scored(split):
        return aucs(
            test["click"],
            test["conversion"],
            *genie_predict(split, posterior, support_ctr, support_cvr, bias, noise),
        )

    told = scored(test)
    learnt = scored(with_user_estimates(world, test, taste, fit))
    blind = scored(with_user_estimates(world, test, 0 * taste, 0 * fit))
    assert blind["ctr_auc"] < learnt["ctr_auc"] < told["ctr_auc"]
    assert blind["ctcvr_auc"] < learnt["ctcvr_auc"] < told["ctcvr_auc"]


def test_item_latents_from_their_category_rank_below_the_true_ones(world_and_files):
    """The category genie: items' latents at their category's mean. The users' latents are
    learnt against those, so it ranks below the data genie (true item latents) and above
    a predictor that knows no user x item term at all."""
    _, (world, bias, splits) = world_and_files
    test = splits["test"]
    item_taste, item_fit = item_latents_by_category(world)
    categories, first = np.unique(world.item_category, return_index=True)
    at = np.searchsorted(categories, world.item_category)
    np.testing.assert_array_equal(item_taste, item_taste[first][at])  # one row per category
    np.testing.assert_array_equal(item_fit, item_fit[first][at])
    # the category mean keeps most of the taste, not all of it
    r = np.corrcoef(item_taste.ravel(), world.item_taste.ravel())[0, 1]
    assert 0.6 < r < 0.99
    support_ctr, support_cvr = world.item_ctr[:128], world.item_cvr[:128]

    def scored(latents):
        p_ctr, p_ctcvr = learnt_users_genie(world, splits, bias, support_ctr, support_cvr, *latents)
        return aucs(test["click"], test["conversion"], p_ctr, p_ctcvr)

    true_items = scored((world.item_taste, world.item_fit))
    by_category = scored((item_taste, item_fit))
    blind = scored((0 * item_taste, 0 * item_fit))
    assert blind["ctr_auc"] < by_category["ctr_auc"] < true_items["ctr_auc"]
    assert blind["ctcvr_auc"] < by_category["ctcvr_auc"] < true_items["ctcvr_auc"]


def test_each_named_part_of_the_click_logit_ranks_the_clicks(world_and_files):
    """The replayed parts are those of each impression: alone, each ranks the clicks
    better than chance (a part of another impression would not), and taking one out of
    the true logit lowers its AUC."""
    from sklearn.metrics import roc_auc_score

    from benchmarks.attainable import CTR_PARTS, ctr_auc_without_parts

    _, (_, _, splits) = world_and_files
    train = splits["train"]
    for part in CTR_PARTS:
        assert roc_auc_score(train["click"], train[part]) > 0.53, part
    without = ctr_auc_without_parts(train)
    for name, auc in without.items():
        if name != "nothing":
            assert auc < without["nothing"] - 0.005, name


def test_regression_on_the_parts_recovers_planted_coefficients(world_and_files):
    from benchmarks.decompose import regress_on_parts

    _, (_, _, splits) = world_and_files
    test = splits["test"]
    truth = test["known_ctr"] + test["item_ctr"]
    rest = truth - test["taste_ctr"] - test["item_ctr"] - test["brand_ctr"] - test["category_ctr"]
    logit = 0.3 * test["taste_ctr"] + 0.8 * test["category_ctr"] + rest + 2.0
    got = regress_on_parts(logit, test)
    assert got["coefficients"] == pytest.approx(
        {"taste_ctr": 0.3, "item_ctr": 0.0, "brand_ctr": 0.0, "category_ctr": 0.8, "rest": 1.0},
        abs=1e-6,
    )
    assert got["r2"] == pytest.approx(1.0)


def test_the_conversion_parts_rank_conversions_and_regress_like_the_click_parts(world_and_files):
    """The replayed conversion-logit parts: each ranks the conversions of clicked
    impressions above chance, and the regression recovers planted coefficients."""
    from sklearn.metrics import roc_auc_score

    from benchmarks.attainable import CVR_PARTS
    from benchmarks.decompose import regress_on_parts

    _, (_, _, splits) = world_and_files
    train, test = splits["train"], splits["test"]
    clicked = train["click"]
    for part in CVR_PARTS:
        assert roc_auc_score(train["conversion"][clicked], train[part][clicked]) > 0.52, part
    truth = test["known_cvr"] + test["item_cvr"]
    rest = truth - sum(test[p] for p in CVR_PARTS)
    logit = 0.5 * test["fit_cvr"] + 0.2 * test["item_cvr"] + rest - 1.0
    got = regress_on_parts(logit, test, "cvr")
    planted = dict.fromkeys(CVR_PARTS, 0.0) | {"fit_cvr": 0.5, "item_cvr": 0.2, "rest": 1.0}
    assert got["coefficients"] == pytest.approx(planted, abs=1e-6)
