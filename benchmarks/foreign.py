"""Ali-CCP-format data made differently from `aliccp/synth/`, to check that the product is
built for the format and not for our generator.

Each choice below differs from the project's generator on purpose, within what
docs/ali_ccp_format.md allows:

- feature ids are random 9-10 digit integers, not ranges per field;
- the cross 702 has an id per (user group, brand) pair, not per matched entity, so it holds
  thousands of ids that each appear a few times;
- plain fields are written `1` or `1.0` at random, history and cross weights as raw integer
  counts (heavy-tailed), not log counts;
- the entries of a line are shuffled; the common file is in its own random order;
- 128 and 129 are absent for a tenth and a fifth of the users, 216 for 15% of the items;
  129 has 300 values;
- the truth is an FM-like logit (user and item biases, a user x item taste, history-count
  matches, position, gender x category) and a conversion logit with its own user x item
  fit that no feature shows (only the user's own labels do), no context noise.

The files are written with `oracle.json` (the AUCs of the true probabilities, same keys as
the project's generator), so `benchmarks/quality.py --raw DIR` reports the gaps. Its
`test_conversion_without_hidden` scores the test split with the conversion truth less the
user's own fit and the item's own conversion effect, which the data barely show: a rough
ceiling for the CVR and CTCVR AUCs.

    python -m benchmarks.foreign --out /tmp/foreign --train 1000000 --test 300000
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

LATENT = 6
HEAVY = 10**8, 9 * 10**9  # feature id range

# Every part below draws from the one generator of the seed, in the order foreign_data calls
# them: a seed's files depend on that order, so a part must not draw more, less or earlier.


class _Ids:
    """Distinct random feature ids, unique across all fields."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.used = rng, set()

    def draw(self, n: int) -> np.ndarray:
        out = []
        while len(out) < n:
            for v in self.rng.integers(*HEAVY, n - len(out)).tolist():
                if v not in self.used:
                    self.used.add(v)
                    out.append(v)
        return np.array(out, np.int64)


@dataclass(frozen=True)
class _World:
    """Items, users and their feature ids; sizes scale with the impressions asked for."""

    n_users: int
    n_items: int
    n_cat: int
    n_node: int
    n_shop: int
    n_brand: int
    # items
    cat_taste: np.ndarray
    cat_pop: np.ndarray
    item_cat: np.ndarray
    item_taste: np.ndarray
    item_fit: np.ndarray
    item_click: np.ndarray
    item_conv: np.ndarray
    item_shop: np.ndarray
    item_brand: np.ndarray  # -1: no brand
    brand_tier: np.ndarray
    item_nodes: list[np.ndarray]
    item_pop: np.ndarray
    cat_items: list[np.ndarray]
    # users
    user_taste: np.ndarray
    user_fit: np.ndarray
    user_bias: np.ndarray
    gender: np.ndarray
    age: np.ndarray
    level: np.ndarray
    geo: np.ndarray
    occupation: np.ndarray
    profile_cat: np.ndarray
    cat_gender: np.ndarray  # gender x category click effect
    fid: dict[str, np.ndarray]  # field -> feature id of each value


@dataclass(frozen=True)
class _Impressions:
    """The impressions (one entry each) and their contexts."""

    context: np.ndarray
    user: np.ndarray
    item: np.ndarray
    pos: np.ndarray
    context_user: list[int]
    n_context: int
    is_test: np.ndarray  # per context


@dataclass(frozen=True)
class _Truth:
    """Per impression: the history counts its item matches, true probabilities, labels."""

    category_count: np.ndarray
    shop_count: np.ndarray
    brand_count: np.ndarray
    p_ctr: np.ndarray
    p_cvr: np.ndarray
    p_cvr_seen: np.ndarray  # the conversion truth without what no feature shows
    click: np.ndarray
    conversion: np.ndarray


def _items(rng: np.random.Generator, n_items: int, n_cat: int, n_node: int) -> dict:
    """Items: category, latents around their category's, biases, shop, brand (or none),
    nodes."""
    n_shop, n_brand = n_items // 4, n_items // 10
    cat_taste = rng.normal(0, 0.6, (n_cat, LATENT))
    cat_fit = rng.normal(0, 0.6, (n_cat, LATENT))
    cat_pop = rng.lognormal(0, 1.0, n_cat)
    item_cat = rng.choice(n_cat, n_items, p=cat_pop / cat_pop.sum())
    item_taste = cat_taste[item_cat] + rng.normal(0, 0.3, (n_items, LATENT))
    item_fit = cat_fit[item_cat] + rng.normal(0, 0.3, (n_items, LATENT))
    item_click, item_conv = rng.normal(0, 0.4, n_items), rng.normal(0, 0.5, n_items)
    item_shop = rng.integers(0, n_shop, n_items)
    item_brand = np.where(rng.random(n_items) < 0.15, -1, rng.integers(0, n_brand, n_items))
    brand_tier = rng.integers(0, 3, n_brand)
    item_nodes = [rng.choice(n_node, rng.integers(1, 4), replace=False) for _ in range(n_items)]
    item_pop = rng.lognormal(0, 1.5, n_items)
    cat_items = [np.flatnonzero(item_cat == c) for c in range(n_cat)]
    return {
        "n_shop": n_shop, "n_brand": n_brand, "cat_taste": cat_taste, "cat_pop": cat_pop,
        "item_cat": item_cat, "item_taste": item_taste, "item_fit": item_fit,
        "item_click": item_click, "item_conv": item_conv, "item_shop": item_shop,
        "item_brand": item_brand, "brand_tier": brand_tier, "item_nodes": item_nodes,
        "item_pop": item_pop, "cat_items": cat_items,
    }  # fmt: skip


def _users(rng: np.random.Generator, n_users: int, n_cat: int) -> dict:
    """Users: latents, bias, profile (and the gender x category effect, drawn after)."""
    user_taste = rng.normal(0, 1.0, (n_users, LATENT))
    user_fit = rng.normal(0, 1.0, (n_users, LATENT))
    user_bias = rng.normal(0, 0.3, n_users)
    gender, age = rng.integers(0, 2, n_users), rng.integers(0, 7, n_users)
    level, geo = rng.integers(0, 3, n_users), rng.integers(0, 300, n_users)
    occupation = rng.integers(0, 2, n_users)
    profile_cat = np.argmax(user_taste @ rng.normal(0, 1, (40, LATENT)).T, 1)
    cat_gender = rng.normal(0, 0.3, (n_cat, 2))
    return {
        "user_taste": user_taste, "user_fit": user_fit, "user_bias": user_bias,
        "gender": gender, "age": age, "level": level, "geo": geo, "occupation": occupation,
        "profile_cat": profile_cat, "cat_gender": cat_gender,
    }  # fmt: skip


def _feature_ids(
    ids: _Ids, n_users: int, n_items: int, n_cat: int, n_node: int, n_shop: int, n_brand: int
) -> dict[str, np.ndarray]:
    """Field -> the random feature id of each of its values."""
    return {
        "101": ids.draw(n_users), "121": ids.draw(40), "122": ids.draw(10),
        "124": ids.draw(2), "125": ids.draw(7), "126": ids.draw(3), "127": ids.draw(3),
        "128": ids.draw(2), "129": ids.draw(300), "109_14": ids.draw(n_cat),
        "110_14": ids.draw(n_shop), "127_14": ids.draw(n_brand), "150_14": ids.draw(n_node),
        "205": ids.draw(n_items), "206": ids.draw(n_cat), "207": ids.draw(n_shop),
        "210": ids.draw(n_node), "216": ids.draw(n_brand), "301": ids.draw(60),
        "508": ids.draw(n_cat), "509": ids.draw(n_shop), "853": ids.draw(n_node),
        "702": ids.draw(50 * n_brand),  # (user group, brand) pairs
    }  # fmt: skip


def _world(rng: np.random.Generator, total: int) -> _World:
    """The items, users and feature ids of `total` impressions."""
    ids = _Ids(rng)
    n_users, n_items, n_cat, n_node = max(total // 120, 50), max(total // 25, 200), 600, 1500
    items = _items(rng, n_items, n_cat, n_node)
    users = _users(rng, n_users, n_cat)
    fid = _feature_ids(ids, n_users, n_items, n_cat, n_node, items["n_shop"], items["n_brand"])
    return _World(
        n_users=n_users, n_items=n_items, n_cat=n_cat, n_node=n_node, **items, **users, fid=fid
    )


def _histories(rng: np.random.Generator, w: _World) -> list[tuple[dict, dict, dict, dict]]:
    """Per user: history categories (by taste and popularity) with counts; the shops,
    brands and nodes of them with counts."""
    history = []
    for u in range(w.n_users):
        k = min(max(1, int(rng.negative_binomial(2, 2 / 32))), w.n_cat)
        logit = 1.5 * (w.cat_taste @ w.user_taste[u]) + np.log(w.cat_pop)
        p = np.exp(logit - logit.max())
        cats = rng.choice(w.n_cat, k, replace=False, p=p / p.sum())
        counts = 1 + rng.poisson(np.exp(0.5 * w.cat_taste[cats] @ w.user_taste[u]))
        shops, brands, nodes = {}, {}, {}
        for c, n in zip(cats.tolist(), counts.tolist(), strict=True):
            if len(w.cat_items[c]) == 0:
                continue
            for it in rng.choice(w.cat_items[c], min(len(w.cat_items[c]), rng.integers(1, 4))):
                shops[w.item_shop[it]] = shops.get(w.item_shop[it], 0) + int(rng.integers(1, n + 1))
                if w.item_brand[it] >= 0:
                    b = w.item_brand[it]
                    brands[b] = brands.get(b, 0) + int(rng.integers(1, n + 1))
                nodes[w.item_nodes[it][0]] = nodes.get(w.item_nodes[it][0], 0) + n
        history.append(
            (dict(zip(cats.tolist(), counts.tolist(), strict=True)), shops, brands, nodes)
        )
    return history


def _impressions(
    rng: np.random.Generator, w: _World, history: list, total: int, n_test: int
) -> _Impressions:
    """Contexts of about 13 impressions, half the items from the user's history categories;
    the test split: whole contexts, drawn at random, up to `n_test` impressions."""
    rows, context_user = [], []
    popular = w.item_pop / w.item_pop.sum()
    while len(rows) < total:
        u = int(rng.integers(0, w.n_users))
        context = len(context_user)
        context_user.append(u)
        categories = list(history[u][0])
        for pos in range(1 + int(rng.geometric(1 / 12))):
            c = categories[int(rng.integers(0, len(categories)))]
            if rng.random() < 0.5 and len(w.cat_items[c]):
                weights = w.item_pop[w.cat_items[c]]
                item = int(w.cat_items[c][rng.choice(len(weights), p=weights / weights.sum())])
            else:
                item = -1  # by popularity, drawn below
            rows.append((context, u, item, min(pos, 59)))
    context, user, item, pos = np.array(rows[:total]).T
    by_popularity = item < 0
    item[by_popularity] = rng.choice(w.n_items, int(by_popularity.sum()), p=popular)
    n_context = int(context.max()) + 1
    order = rng.permutation(n_context)
    sizes = np.bincount(context, minlength=n_context)[order]
    is_test = np.zeros(n_context, bool)
    is_test[order[np.cumsum(sizes) <= n_test]] = True
    return _Impressions(context, user, item, pos, context_user, n_context, is_test)


def _truth(rng: np.random.Generator, w: _World, history: list, imp: _Impressions) -> _Truth:
    """An FM-like click logit and a conversion logit with its own user x item fit; the
    labels drawn from them."""
    user, item, total = imp.user, imp.item, len(imp.user)
    category_count = np.array(
        [history[u][0].get(c, 0) for u, c in zip(user, w.item_cat[item], strict=True)]
    )
    shop_count = np.array(
        [history[u][1].get(s, 0) for u, s in zip(user, w.item_shop[item], strict=True)]
    )
    brand_count = np.array(
        [
            history[u][2].get(b, 0) if b >= 0 else 0
            for u, b in zip(user, w.item_brand[item], strict=True)
        ]
    )
    taste = np.einsum("ij,ij->i", w.user_taste[user], w.item_taste[item])
    fit = np.einsum("ij,ij->i", w.user_fit[user], w.item_fit[item])
    click_logit = (
        -4.5 + 0.7 * taste + w.item_click[item] + w.user_bias[user]
        + 0.35 * np.log1p(category_count) + 0.2 * np.log1p(shop_count)
        - 0.25 * np.log1p(imp.pos) + w.cat_gender[w.item_cat[item], w.gender[user]]
    )  # fmt: skip
    brand = w.item_brand[item]
    tier_match = (brand >= 0) & (w.brand_tier[np.maximum(brand, 0)] == w.level[user])
    conv_logit = (
        -3.3 + 0.7 * fit + 0.3 * taste + w.item_conv[item] + 0.4 * tier_match
        + 0.3 * np.log1p(brand_count) - 0.1 * w.age[user] / 6
    )  # fmt: skip
    p_ctr, p_cvr = 1 / (1 + np.exp(-click_logit)), 1 / (1 + np.exp(-conv_logit))
    # The conversion truth without what no feature shows: the user's own fit (seen only
    # through about one conversion per user) and the item's own effect (about 0.3 each).
    p_cvr_seen = 1 / (1 + np.exp(-(conv_logit - 0.7 * fit - w.item_conv[item])))
    click = (rng.random(total) < p_ctr).astype(int)
    conversion = ((rng.random(total) < p_cvr) & (click == 1)).astype(int)
    return _Truth(
        category_count, shop_count, brand_count, p_ctr, p_cvr, p_cvr_seen, click, conversion
    )


def _one(rng: np.random.Generator) -> str:
    """A plain field's weight, written `1` or `1.0` at random."""
    return "1" if rng.random() < 0.5 else "1.0"


def _line(rng: np.random.Generator, entries: list[tuple[str, int, str]]) -> str:
    """The feature entries of a line, shuffled."""
    rng.shuffle(entries)
    return "\x01".join(f"{f}\x02{i}\x03{w}" for f, i, w in entries)


def _write_skeleton(
    path: Path,
    rng: np.random.Generator,
    w: _World,
    history: list,
    imp: _Impressions,
    truth: _Truth,
    keys: list[str],
    rows_out: np.ndarray,
) -> None:
    """One sample_skeleton file: the impressions `rows_out`, in that order."""
    fid, one = w.fid, _one
    with open(path, "w") as fh:
        for sample_id, i in enumerate(rows_out.tolist(), 1):
            it, u = imp.item[i], imp.user[i]
            e = [
                ("205", fid["205"][it], one(rng)),
                ("206", fid["206"][w.item_cat[it]], one(rng)),
                ("207", fid["207"][w.item_shop[it]], one(rng)),
                ("301", fid["301"][imp.pos[i]], one(rng)),
            ]
            e += [("210", fid["210"][n], one(rng)) for n in w.item_nodes[it]]
            if w.item_brand[it] >= 0:
                e.append(("216", fid["216"][w.item_brand[it]], one(rng)))
            if truth.category_count[i]:
                e.append(("508", fid["508"][w.item_cat[it]], str(truth.category_count[i])))
            if truth.shop_count[i]:
                e.append(("509", fid["509"][w.item_shop[it]], str(truth.shop_count[i])))
            if truth.brand_count[i]:
                pair = (u % 50) * w.n_brand + w.item_brand[it]
                e.append(("702", fid["702"][pair], str(truth.brand_count[i])))
            for n in w.item_nodes[it]:
                if history[u][3].get(n):
                    e.append(("853", fid["853"][n], str(history[u][3][n])))
            fh.write(
                f"{sample_id},{truth.click[i]},{truth.conversion[i]},{keys[imp.context[i]]},"
                f"{len(e)},{_line(rng, e)}\n"
            )


def _write_common(
    path: Path,
    rng: np.random.Generator,
    w: _World,
    history: list,
    context_user: list[int],
    keys: list[str],
    contexts: np.ndarray,
) -> None:
    """One common_features file: the `contexts`, in a random order of their own."""
    fid, one = w.fid, _one
    with open(path, "w") as fh:
        for c in rng.permutation(contexts).tolist():
            u = context_user[c]
            e = [
                ("101", fid["101"][u], one(rng)),
                ("121", fid["121"][w.profile_cat[u]], one(rng)),
                ("122", fid["122"][w.profile_cat[u] // 4], one(rng)),
                ("124", fid["124"][w.gender[u]], one(rng)),
                ("125", fid["125"][w.age[u]], one(rng)),
                ("126", fid["126"][w.level[u]], one(rng)),
                ("127", fid["127"][w.level[u]], one(rng)),
            ]
            if u % 10:  # absent for a tenth of the users
                e.append(("128", fid["128"][w.occupation[u]], one(rng)))
            if u % 5:  # absent for a fifth
                e.append(("129", fid["129"][w.geo[u]], one(rng)))
            for f, counts in zip(("109_14", "110_14", "127_14", "150_14"), history[u], strict=True):
                e += [(f, fid[f][k], str(v)) for k, v in counts.items()]
            fh.write(f"{keys[c]},{len(e)},{_line(rng, e)}\n")


def _split_oracle(truth: _Truth, rows_out: np.ndarray, n_contexts: int) -> dict:
    """Counts and the AUCs of the true probabilities over one split's impressions."""
    y, z = truth.click[rows_out], truth.conversion[rows_out]
    pc, pv = truth.p_ctr[rows_out], truth.p_cvr[rows_out]
    return {
        "impressions": len(rows_out),
        "contexts": n_contexts,
        "clicks": int(y.sum()),
        "conversions": int(z.sum()),
        "ctr_auc": float(roc_auc_score(y, pc)),
        "ctcvr_auc": float(roc_auc_score(z, pc * pv)),
        "cvr_auc_clicked": float(roc_auc_score(z[y == 1], pv[y == 1])),
    }


def _without_hidden(truth: _Truth, rows_out: np.ndarray) -> dict:
    """The test AUCs of the conversion truth less what no feature shows (`p_cvr_seen`)."""
    y, z, pc = truth.click[rows_out], truth.conversion[rows_out], truth.p_ctr[rows_out]
    seen = truth.p_cvr_seen[rows_out]
    return {
        "ctcvr_auc": float(roc_auc_score(z, pc * seen)),
        "cvr_auc_clicked": float(roc_auc_score(z[y == 1], seen[y == 1])),
    }


def foreign_data(out: Path, n_train: int, n_test: int, seed: int = 7) -> dict:
    """Write `sample_skeleton_{train,test}.csv`, `common_features_{train,test}.csv` and
    `oracle.json` to `out`; returns the oracle record.

    The generative story in order (world, histories, impressions, truth, lines): every
    draw's order fixes the files a seed writes."""
    rng = np.random.default_rng(seed)
    total = n_train + n_test
    world = _world(rng, total)
    history = _histories(rng, world)
    imp = _impressions(rng, world, history, total, n_test)
    truth = _truth(rng, world, history, imp)

    out.mkdir(parents=True, exist_ok=True)
    raw_keys = rng.bytes(16 * imp.n_context)  # 128 random bits each, from the seed
    keys = [raw_keys[16 * c : 16 * (c + 1)].hex() for c in range(imp.n_context)]
    assert len(set(keys)) == imp.n_context
    oracle = {}
    by_context = np.argsort(imp.context, kind="stable")  # each context's rows: a slice of this
    starts = np.searchsorted(imp.context[by_context], np.arange(imp.n_context + 1))
    for split, selected in (("train", ~imp.is_test), ("test", imp.is_test)):
        contexts = np.flatnonzero(selected)
        rng.shuffle(contexts)
        rows_out = np.concatenate([by_context[starts[c] : starts[c + 1]] for c in contexts])
        _write_skeleton(
            out / f"sample_skeleton_{split}.csv", rng, world, history, imp, truth, keys, rows_out
        )
        _write_common(
            out / f"common_features_{split}.csv",
            rng,
            world,
            history,
            imp.context_user,
            keys,
            contexts,
        )
        oracle[split] = _split_oracle(truth, rows_out, len(contexts))
        if split == "test":
            oracle["test_conversion_without_hidden"] = _without_hidden(truth, rows_out)
    (out / "oracle.json").write_text(json.dumps(oracle, indent=2, sort_keys=True))
    return oracle


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=1_000_000)
    parser.add_argument("--test", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(foreign_data(args.out, args.train, args.test, args.seed), indent=2))


if __name__ == "__main__":
    main()
