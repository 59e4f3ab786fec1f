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
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

LATENT = 6
HEAVY = 10**8, 9 * 10**9  # feature id range


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


# One long function on purpose: the generative story reads top to bottom (world, users, items,
# truth, lines), and every draw's order fixes the files a seed writes.
def foreign_data(out: Path, n_train: int, n_test: int, seed: int = 7) -> dict:
    """Write `sample_skeleton_{train,test}.csv`, `common_features_{train,test}.csv` and
    `oracle.json` to `out`; returns the oracle record."""
    rng = np.random.default_rng(seed)
    ids = _Ids(rng)
    total = n_train + n_test
    n_users, n_items, n_cat, n_node = max(total // 120, 50), max(total // 25, 200), 600, 1500
    n_shop, n_brand = n_items // 4, n_items // 10

    # Items: category, latents around their category's, biases, shop, brand (or none), nodes.
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

    # Users: latents, bias, profile.
    user_taste = rng.normal(0, 1.0, (n_users, LATENT))
    user_fit = rng.normal(0, 1.0, (n_users, LATENT))
    user_bias = rng.normal(0, 0.3, n_users)
    gender, age = rng.integers(0, 2, n_users), rng.integers(0, 7, n_users)
    level, geo = rng.integers(0, 3, n_users), rng.integers(0, 300, n_users)
    occupation = rng.integers(0, 2, n_users)
    profile_cat = np.argmax(user_taste @ rng.normal(0, 1, (40, LATENT)).T, 1)
    cat_gender = rng.normal(0, 0.3, (n_cat, 2))
    fid = {
        "101": ids.draw(n_users), "121": ids.draw(40), "122": ids.draw(10),
        "124": ids.draw(2), "125": ids.draw(7), "126": ids.draw(3), "127": ids.draw(3),
        "128": ids.draw(2), "129": ids.draw(300), "109_14": ids.draw(n_cat),
        "110_14": ids.draw(n_shop), "127_14": ids.draw(n_brand), "150_14": ids.draw(n_node),
        "205": ids.draw(n_items), "206": ids.draw(n_cat), "207": ids.draw(n_shop),
        "210": ids.draw(n_node), "216": ids.draw(n_brand), "301": ids.draw(60),
        "508": ids.draw(n_cat), "509": ids.draw(n_shop), "853": ids.draw(n_node),
        "702": ids.draw(50 * n_brand),  # (user group, brand) pairs
    }  # fmt: skip

    # Histories: categories by taste and popularity, counts; shops, brands, nodes of them.
    history = []
    for u in range(n_users):
        k = min(max(1, int(rng.negative_binomial(2, 2 / 32))), n_cat)
        logit = 1.5 * (cat_taste @ user_taste[u]) + np.log(cat_pop)
        p = np.exp(logit - logit.max())
        cats = rng.choice(n_cat, k, replace=False, p=p / p.sum())
        counts = 1 + rng.poisson(np.exp(0.5 * cat_taste[cats] @ user_taste[u]))
        shops, brands, nodes = {}, {}, {}
        for c, n in zip(cats.tolist(), counts.tolist(), strict=True):
            if len(cat_items[c]) == 0:
                continue
            for it in rng.choice(cat_items[c], min(len(cat_items[c]), rng.integers(1, 4))):
                shops[item_shop[it]] = shops.get(item_shop[it], 0) + int(rng.integers(1, n + 1))
                if item_brand[it] >= 0:
                    b = item_brand[it]
                    brands[b] = brands.get(b, 0) + int(rng.integers(1, n + 1))
                nodes[item_nodes[it][0]] = nodes.get(item_nodes[it][0], 0) + n
        history.append(
            (dict(zip(cats.tolist(), counts.tolist(), strict=True)), shops, brands, nodes)
        )

    # Contexts of about 13 impressions; half the items from the user's history categories.
    rows, context_user = [], []
    popular = item_pop / item_pop.sum()
    while len(rows) < total:
        u = int(rng.integers(0, n_users))
        context = len(context_user)
        context_user.append(u)
        categories = list(history[u][0])
        for pos in range(1 + int(rng.geometric(1 / 12))):
            c = categories[int(rng.integers(0, len(categories)))]
            if rng.random() < 0.5 and len(cat_items[c]):
                w = item_pop[cat_items[c]]
                item = int(cat_items[c][rng.choice(len(w), p=w / w.sum())])
            else:
                item = -1  # by popularity, drawn below
            rows.append((context, u, item, min(pos, 59)))
    context, user, item, pos = np.array(rows[:total]).T
    by_popularity = item < 0
    item[by_popularity] = rng.choice(n_items, int(by_popularity.sum()), p=popular)
    n_context = int(context.max()) + 1
    # The test split: whole contexts, drawn at random, up to n_test impressions.
    order = rng.permutation(n_context)
    sizes = np.bincount(context, minlength=n_context)[order]
    is_test = np.zeros(n_context, bool)
    is_test[order[np.cumsum(sizes) <= n_test]] = True

    # The truth.
    category_count = np.array(
        [history[u][0].get(c, 0) for u, c in zip(user, item_cat[item], strict=True)]
    )
    shop_count = np.array(
        [history[u][1].get(s, 0) for u, s in zip(user, item_shop[item], strict=True)]
    )
    brand_count = np.array(
        [
            history[u][2].get(b, 0) if b >= 0 else 0
            for u, b in zip(user, item_brand[item], strict=True)
        ]
    )
    taste = np.einsum("ij,ij->i", user_taste[user], item_taste[item])
    fit = np.einsum("ij,ij->i", user_fit[user], item_fit[item])
    click_logit = (
        -4.5 + 0.7 * taste + item_click[item] + user_bias[user]
        + 0.35 * np.log1p(category_count) + 0.2 * np.log1p(shop_count)
        - 0.25 * np.log1p(pos) + cat_gender[item_cat[item], gender[user]]
    )  # fmt: skip
    brand = item_brand[item]
    tier_match = (brand >= 0) & (brand_tier[np.maximum(brand, 0)] == level[user])
    conv_logit = (
        -3.3 + 0.7 * fit + 0.3 * taste + item_conv[item] + 0.4 * tier_match
        + 0.3 * np.log1p(brand_count) - 0.1 * age[user] / 6
    )  # fmt: skip
    p_ctr, p_cvr = 1 / (1 + np.exp(-click_logit)), 1 / (1 + np.exp(-conv_logit))
    # The conversion truth without what no feature shows: the user's own fit (seen only
    # through about one conversion per user) and the item's own effect (about 0.3 each).
    p_cvr_seen = 1 / (1 + np.exp(-(conv_logit - 0.7 * fit - item_conv[item])))
    click = (rng.random(total) < p_ctr).astype(int)
    conversion = ((rng.random(total) < p_cvr) & (click == 1)).astype(int)

    # The files.
    out.mkdir(parents=True, exist_ok=True)
    raw_keys = rng.bytes(16 * n_context)  # 128 random bits each, from the seed
    keys = [raw_keys[16 * c : 16 * (c + 1)].hex() for c in range(n_context)]
    assert len(set(keys)) == n_context

    def one() -> str:
        return "1" if rng.random() < 0.5 else "1.0"

    def line(entries: list[tuple[str, int, str]]) -> str:
        rng.shuffle(entries)
        return "\x01".join(f"{f}\x02{i}\x03{w}" for f, i, w in entries)

    oracle = {}
    by_context = np.argsort(context, kind="stable")  # each context's rows: a slice of this
    starts = np.searchsorted(context[by_context], np.arange(n_context + 1))
    for split, selected in (("train", ~is_test), ("test", is_test)):
        contexts = np.flatnonzero(selected)
        rng.shuffle(contexts)
        rows_out = np.concatenate([by_context[starts[c] : starts[c + 1]] for c in contexts])
        with open(out / f"sample_skeleton_{split}.csv", "w") as fh:
            for sample_id, i in enumerate(rows_out.tolist(), 1):
                it, u = item[i], user[i]
                e = [
                    ("205", fid["205"][it], one()),
                    ("206", fid["206"][item_cat[it]], one()),
                    ("207", fid["207"][item_shop[it]], one()),
                    ("301", fid["301"][pos[i]], one()),
                ]
                e += [("210", fid["210"][n], one()) for n in item_nodes[it]]
                if item_brand[it] >= 0:
                    e.append(("216", fid["216"][item_brand[it]], one()))
                if category_count[i]:
                    e.append(("508", fid["508"][item_cat[it]], str(category_count[i])))
                if shop_count[i]:
                    e.append(("509", fid["509"][item_shop[it]], str(shop_count[i])))
                if brand_count[i]:
                    pair = (u % 50) * n_brand + item_brand[it]
                    e.append(("702", fid["702"][pair], str(brand_count[i])))
                for n in item_nodes[it]:
                    if history[u][3].get(n):
                        e.append(("853", fid["853"][n], str(history[u][3][n])))
                fh.write(
                    f"{sample_id},{click[i]},{conversion[i]},{keys[context[i]]},{len(e)},"
                    f"{line(e)}\n"
                )
        with open(out / f"common_features_{split}.csv", "w") as fh:
            for c in rng.permutation(contexts).tolist():
                u = context_user[c]
                e = [
                    ("101", fid["101"][u], one()),
                    ("121", fid["121"][profile_cat[u]], one()),
                    ("122", fid["122"][profile_cat[u] // 4], one()),
                    ("124", fid["124"][gender[u]], one()),
                    ("125", fid["125"][age[u]], one()),
                    ("126", fid["126"][level[u]], one()),
                    ("127", fid["127"][level[u]], one()),
                ]
                if u % 10:  # absent for a tenth of the users
                    e.append(("128", fid["128"][occupation[u]], one()))
                if u % 5:  # absent for a fifth
                    e.append(("129", fid["129"][geo[u]], one()))
                for f, counts in zip(
                    ("109_14", "110_14", "127_14", "150_14"), history[u], strict=True
                ):
                    e += [(f, fid[f][k], str(v)) for k, v in counts.items()]
                fh.write(f"{keys[c]},{len(e)},{line(e)}\n")
        y, z, pc, pv = click[rows_out], conversion[rows_out], p_ctr[rows_out], p_cvr[rows_out]
        oracle[split] = {
            "impressions": len(rows_out),
            "contexts": len(contexts),
            "clicks": int(y.sum()),
            "conversions": int(z.sum()),
            "ctr_auc": float(roc_auc_score(y, pc)),
            "ctcvr_auc": float(roc_auc_score(z, pc * pv)),
            "cvr_auc_clicked": float(roc_auc_score(z[y == 1], pv[y == 1])),
        }
        if split == "test":
            seen = p_cvr_seen[rows_out]
            oracle["test_conversion_without_hidden"] = {
                "ctcvr_auc": float(roc_auc_score(z, pc * seen)),
                "cvr_auc_clicked": float(roc_auc_score(z[y == 1], seen[y == 1])),
            }
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
