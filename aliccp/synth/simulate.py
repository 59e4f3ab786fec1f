"""Contexts and impressions: a split's user contexts, then per chunk of contexts the
behaviour snapshots, the impressions shown, their history matches (the crosses) and their
true click and conversion logits; and the two biases that calibrate those logits to the
profile's rates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aliccp.synth.profiles import PROFILE_FIELDS
from aliccp.synth.world import World
from models.features import HISTORY_FIELDS
from models.numeric import sigmoid, solve_increasing

_PILOT_IMPRESSIONS = 20_000  # impressions simulated to calibrate the two biases


def draw_contexts(
    world: World, n_impressions: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Users and impression counts of a split's contexts, summing to n_impressions."""
    mean_extra = world.profile.impressions_per_context - 1.0
    dispersion = 2.0
    sizes: list[np.ndarray] = []
    total = 0
    while total < n_impressions:
        batch = int((n_impressions - total) / world.profile.impressions_per_context) + 16
        drawn = 1 + rng.negative_binomial(dispersion, dispersion / (dispersion + mean_extra), batch)
        sizes.append(drawn)
        total += int(drawn.sum())
    size = np.concatenate(sizes)
    cumulative = np.cumsum(size)
    n_contexts = int(np.searchsorted(cumulative, n_impressions)) + 1
    size = size[:n_contexts]
    size[-1] -= int(cumulative[n_contexts - 1]) - n_impressions
    users = rng.choice(world.sizes.users, size=n_contexts, p=world.user_activity)
    return users, size


@dataclass(frozen=True)
class Entries:
    """Weighted entries of one field, sorted by line: (line, entity, behaviour count)."""

    line: np.ndarray
    entity: np.ndarray
    count: np.ndarray

    def lookup(self, line: np.ndarray, entity: np.ndarray, n_entities: int) -> np.ndarray:
        """Count of `entity` on `line`, 0 when absent; entities must be sorted per line."""
        if len(self.line) == 0:
            return np.zeros(len(line), dtype=np.int64)
        keys = self.line * n_entities + self.entity
        query = line * n_entities + entity
        position = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        return np.where(keys[position] == query, self.count[position], 0)

    def where(self, keep: np.ndarray) -> Entries:
        return Entries(self.line[keep], self.entity[keep], self.count[keep])


@dataclass(frozen=True)
class Block:
    """A chunk of contexts with their impressions and label-free truth."""

    context_user: np.ndarray
    context_profile: np.ndarray  # (contexts, len(PROFILE_FIELDS))
    snapshots: Mapping[str, Entries]  # history field -> entries, line = context
    impression_context: np.ndarray
    item: np.ndarray
    category: np.ndarray
    shop: np.ndarray
    brand: np.ndarray  # -1: none
    position: np.ndarray
    node_row: np.ndarray  # (impression, node) pairs of field 210, in impression order
    node: np.ndarray
    crosses: Mapping[str, Entries]  # cross field -> entries, line = impression
    logit_ctr: np.ndarray  # without the calibrated bias
    logit_cvr: np.ndarray
    hidden_ctr: np.ndarray  # the per-context noise inside logit_ctr (seen by no model)
    hidden_cvr: np.ndarray


@dataclass(frozen=True)
class _Impressions:
    """What a chunk's impressions show; arrays are indexed by impression."""

    context: np.ndarray  # index of the impression's context in the chunk
    user: np.ndarray
    position: np.ndarray
    item: np.ndarray
    category: np.ndarray
    shop: np.ndarray
    brand: np.ndarray  # -1: none
    node_row: np.ndarray  # (impression, node) pairs of field 210, in impression order
    node: np.ndarray


@dataclass(frozen=True)
class _HistoryCounts:
    """Per impression, the context's history count of what the item is (0: no match)."""

    category: np.ndarray
    shop: np.ndarray
    brand: np.ndarray
    node_best: np.ndarray  # log(1 + count) of the best matched intention node


def simulate(
    world: World, context_user: np.ndarray, context_size: np.ndarray, rng: np.random.Generator
) -> Block:
    """Draw the snapshots and impressions of a chunk of contexts and their true logits."""
    snapshots = _draw_snapshots(world, context_user, rng)
    shown = _draw_impressions(world, context_user, context_size, rng)
    crosses, counts = _match_histories(world, snapshots, shown)
    logit_ctr, logit_cvr, hidden_ctr, hidden_cvr = _true_logits(
        world, shown, counts, len(context_user), rng
    )
    return Block(
        context_user=context_user,
        context_profile=world.user_profile[context_user],
        snapshots=snapshots,
        impression_context=shown.context,
        item=shown.item,
        category=shown.category,
        shop=shown.shop,
        brand=shown.brand,
        position=shown.position,
        node_row=shown.node_row,
        node=shown.node,
        crosses=crosses,
        logit_ctr=logit_ctr,
        logit_cvr=logit_cvr,
        hidden_ctr=hidden_ctr,
        hidden_cvr=hidden_cvr,
    )


def _draw_snapshots(
    world: World, context_user: np.ndarray, rng: np.random.Generator
) -> dict[str, Entries]:
    """Each history entry's count this time, 0 dropping the entry; line = context."""
    activity = rng.lognormal(0.0, 0.4, len(context_user))
    snapshots = {}
    for field in HISTORY_FIELDS:
        lists = world.history[field]
        context, index = _ranges(lists.offsets[context_user], np.diff(lists.offsets)[context_user])
        count = rng.poisson(lists.rate[index] * activity[context])
        keep = count > 0
        snapshots[field] = Entries(context[keep], lists.entity[index][keep], count[keep])
    return snapshots


def _draw_impressions(
    world: World, context_user: np.ndarray, context_size: np.ndarray, rng: np.random.Generator
) -> _Impressions:
    """Items shown: from the user's history categories or by global popularity."""
    n = int(context_size.sum())
    impression_context = np.repeat(np.arange(len(context_user)), context_size)
    first = np.cumsum(context_size) - context_size
    position = np.minimum(np.arange(n) - first[impression_context], world.sizes.positions - 1)
    user = context_user[impression_context]
    categories = world.history["109_14"]
    pick = categories.offsets[user] + (rng.random(n) * np.diff(categories.offsets)[user]).astype(
        np.int64
    )
    personal = rng.random(n) < world.profile.personal_share
    popular = world.category_sampler.draw(np.zeros(n, dtype=np.int64), rng)
    item = world.item_sampler.draw(np.where(personal, categories.entity[pick], popular), rng)
    node_row, node_slot = np.nonzero(world.item_nodes[item] >= 0)
    return _Impressions(
        context=impression_context,
        user=user,
        position=position,
        item=item,
        category=world.item_category[item],
        shop=world.item_shop[item],
        brand=world.item_brand[item],
        node_row=node_row,
        node=world.item_nodes[item[node_row], node_slot],
    )


def _match_histories(
    world: World, snapshots: Mapping[str, Entries], shown: _Impressions
) -> tuple[dict[str, Entries], _HistoryCounts]:
    """The crosses (cross field -> entries, line = impression) and the counts behind them:
    the history count of the item's category / shop / brand / nodes (0: none)."""
    sizes, ctx, brand = world.sizes, shown.context, shown.brand
    n = len(shown.item)
    every = np.arange(n)
    has_brand = brand >= 0
    brand_count = np.zeros(n, dtype=np.int64)
    brand_count[has_brand] = snapshots["127_14"].lookup(
        ctx[has_brand], brand[has_brand], sizes.brands
    )
    category_count = snapshots["109_14"].lookup(ctx, shown.category, sizes.categories)
    shop_count = snapshots["110_14"].lookup(ctx, shown.shop, sizes.shops)
    node_count = snapshots["150_14"].lookup(ctx[shown.node_row], shown.node, sizes.nodes)
    candidates = {
        "508": Entries(every, shown.category, category_count),
        "509": Entries(every, shown.shop, shop_count),
        "702": Entries(every, brand, brand_count),
        "853": Entries(shown.node_row, shown.node, node_count),
    }
    crosses = {field: entries.where(entries.count > 0) for field, entries in candidates.items()}
    node_best = np.zeros(n)
    np.maximum.at(node_best, shown.node_row, np.log1p(node_count))
    return crosses, _HistoryCounts(category_count, shop_count, brand_count, node_best)


def _true_logits(
    world: World,
    shown: _Impressions,
    counts: _HistoryCounts,
    n_contexts: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(click logit, conversion logit, their hidden per-context parts), before the biases."""
    prof, user, item, category = world.profile, shown.user, shown.item, shown.category
    age = world.user_profile[user, PROFILE_FIELDS.index("125")]
    gender_sign = np.where(world.user_profile[user, PROFILE_FIELDS.index("124")] == 1, 1.0, -1.0)
    consumption = world.user_profile[user, PROFILE_FIELDS.index("126")]
    taste = np.einsum("ij,ij->i", world.user_taste[user], world.item_taste[item])
    fit = np.einsum("ij,ij->i", world.user_fit[user], world.item_fit[item])
    price_fit = 1.0 - np.abs(consumption - world.item_price_tier[item])
    context_ctr = rng.normal(0.0, prof.context_noise, n_contexts)[shown.context]
    context_cvr = 0.3 * context_ctr + rng.normal(0.0, prof.context_noise, n_contexts)[shown.context]
    logit_ctr = (
        prof.affinity * (taste + gender_sign * world.category_gender[category])
        + world.category_age[category, age]
        + world.category_ctr[category]
        + world.brand_ctr[shown.brand]
        + world.item_ctr[item]
        - prof.position_effect * np.log1p(shown.position)
        + prof.category_match * np.log1p(counts.category)
        + prof.shop_match * np.log1p(counts.shop)
        + prof.node_match * counts.node_best
        + context_ctr
    )
    logit_cvr = (
        prof.cvr_affinity * taste
        + prof.cvr_fit * fit
        + world.category_cvr[category]
        + world.brand_cvr[shown.brand]
        + world.item_cvr[item]
        + prof.price_fit * price_fit
        + prof.brand_match * np.log1p(counts.brand)
        + prof.shop_match * np.log1p(counts.shop)
        + context_cvr
    )
    return logit_ctr, logit_cvr, context_ctr, context_cvr


def _ranges(start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate index ranges start[i]:start[i]+length[i]; return (i, index) per element."""
    owner = np.repeat(np.arange(len(start)), length)
    offset = np.repeat(start - (np.cumsum(length) - length), length)
    return owner, np.arange(int(length.sum())) + offset


def calibrate(world: World, rng: np.random.Generator) -> tuple[float, float]:
    """Logit biases giving the profile's CTR and CVR on a pilot sample of impressions."""
    users, sizes = draw_contexts(world, _PILOT_IMPRESSIONS, rng)
    block = simulate(world, users, sizes, rng)
    bias_ctr = _solve_bias(block.logit_ctr, np.ones(len(block.logit_ctr)), world.profile.ctr)
    weight = sigmoid(block.logit_ctr + bias_ctr)
    return bias_ctr, _solve_bias(block.logit_cvr, weight, world.profile.cvr)


def _solve_bias(logit: np.ndarray, weight: np.ndarray, target: float) -> float:
    """The b with weighted mean sigmoid(logit + b) == target (bisection on [-30, 30], 80 steps)."""
    return solve_increasing(
        lambda bias: np.average(sigmoid(logit + bias), weights=weight), target, -30.0, 30.0, 80
    )
