"""The world a data set is drawn from, fixed before any context: its sizes and feature-id
layout, the categories, shops, brands and items with their effects, the users with their
profile fields, tastes and 14-day behaviour histories."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from aliccp.synth.profiles import PROFILE_CARDINALITY, PROFILE_FIELDS, SynthProfile, resolve_profile
from aliccp.synth.streams import LAYOUT_STREAM, stream_rng
from models.features import ALL_FIELDS, CROSSES, HISTORY_FIELDS, POSITION_FIELD, USER_ID_FIELD

# Cross field -> (user history field, item field). A cross entry is written only when the
# context's history holds the item's category / shop / brand / intention node; its id
# encodes that matched entity (see `feature_id_ranges`) and its value is the history weight.
CROSS_FIELDS: Mapping[str, tuple[str, str]] = CROSSES

_LATENT_DIM = 8  # shared user x item taste
_CVR_LATENT_DIM = 4  # conversion-only user x item fit
_NODES_PER_CATEGORY = 4  # intention nodes a category's items draw from
_MAX_ITEM_NODES = 3
_USER_BLOCK = 2048  # users per block when drawing histories ...
_BLOCK_CELLS = _USER_BLOCK * 400  # ... at most this many (user, category) scores at once
_FULL_SORT_CATEGORIES = 400  # up to this many categories, histories sort every score
_HISTORY_USERS = 4096  # users per block of a large world's histories
_DRAW_PIECE = 1 << 20  # group draws done at a time (uniforms split without changing)


def feature_id_ranges(
    n_train: int, seed: int, profile: str | SynthProfile = "default"
) -> dict[str, range]:
    """The feature-id range of every field for a given `n_train`, `seed` and profile.

    Entity `k` of a field (user, category, shop, ...) has id `ranges[field].start + k`.
    Fields that name the same kind of entity share its index: a 508 entry with id `x`
    says the item's category `k = x - ranges["508"].start` is in the user's history, i.e.
    the 206 id is `ranges["206"].start + k` and 109_14 holds `ranges["109_14"].start + k`
    (likewise 509/207/110_14 shops, 702/216/127_14 brands, 853/210/150_14 nodes).

    Args:
        n_train: train impressions, as passed to `synthesize_ali_ccp`.
        seed: seed, as passed to `synthesize_ali_ccp`.
        profile: profile, as passed to `synthesize_ali_ccp`.

    Returns:
        Field id -> range of its feature ids; ranges are disjoint.
    """
    return layout(WorldSizes.for_train_size(n_train, resolve_profile(profile)), seed)


@dataclass(frozen=True)
class WorldSizes:
    """How many entities of each kind the world holds (positions: position ids)."""

    users: int
    items: int
    categories: int
    shops: int
    brands: int
    nodes: int
    positions: int

    @classmethod
    def for_train_size(cls, n_train: int, profile: SynthProfile) -> WorldSizes:
        """The sizes the profile gives a world of `n_train` train impressions."""
        categories = min(
            profile.max_categories,
            max(profile.min_categories, n_train // profile.impressions_per_category),
        )
        items = max(200, categories, n_train // profile.impressions_per_item)
        return cls(
            users=max(50, n_train // profile.impressions_per_user),
            items=items,
            categories=categories,
            shops=max(categories, items // profile.items_per_shop),
            brands=max(categories, items // profile.items_per_brand),
            nodes=max(2 * _NODES_PER_CATEGORY, 3 * categories),
            positions=profile.max_position + 1,
        )

    def cardinalities(self) -> dict[str, int]:
        """Field id -> distinct values (ids) of that field, for every field."""
        entity_count = {
            USER_ID_FIELD: self.users,
            "205": self.items,
            POSITION_FIELD: self.positions,
            **dict.fromkeys(("109_14", "206", "508"), self.categories),
            **dict.fromkeys(("110_14", "207", "509"), self.shops),
            **dict.fromkeys(("127_14", "216", "702"), self.brands),
            **dict.fromkeys(("150_14", "210", "853"), self.nodes),
            **PROFILE_CARDINALITY,
        }
        return {f: entity_count[f] for f in ALL_FIELDS}


def layout(sizes: WorldSizes, seed: int) -> dict[str, range]:
    """Disjoint id ranges, laid out in a seeded field order with seeded gaps."""
    rng = stream_rng(seed, LAYOUT_STREAM, 0)
    cardinality = sizes.cardinalities()
    start = 1 + int(rng.integers(0, 1000))
    ranges: dict[str, range] = {}
    for i in rng.permutation(len(ALL_FIELDS)):
        field = ALL_FIELDS[i]
        ranges[field] = range(start, start + cardinality[field])
        start += cardinality[field] + int(rng.integers(1, 1000))
    return {f: ranges[f] for f in ALL_FIELDS}


@dataclass(frozen=True)
class _GroupSampler:
    """Draws one member of a given group, with probability proportional to its weight."""

    members: np.ndarray  # member indices, sorted by group
    cumulative: np.ndarray  # cumulative weights in that order
    start: np.ndarray  # group g holds positions start[g] .. start[g + 1] - 1 (never empty)

    @classmethod
    def build(cls, group: np.ndarray, weight: np.ndarray, n_groups: int) -> _GroupSampler:
        members = np.argsort(group, kind="stable")
        start = np.searchsorted(group[members], np.arange(n_groups + 1))
        if np.any(np.diff(start) == 0):
            raise ValueError("every group needs at least one member")
        return cls(members, np.cumsum(weight[members]), start)

    def draw(self, group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if len(group) > _DRAW_PIECE:  # in pieces, to bound the temporaries; same draws
            out = np.empty(len(group), dtype=self.members.dtype)
            for lo in range(0, len(group), _DRAW_PIECE):
                out[lo : lo + _DRAW_PIECE] = self._draw(group[lo : lo + _DRAW_PIECE], rng)
            return out
        return self._draw(group, rng)

    def _draw(self, group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.start[group], self.start[group + 1]
        below = np.where(lo > 0, self.cumulative[lo - 1], 0.0)
        target = below + rng.random(len(group)) * (self.cumulative[hi - 1] - below)
        position = np.clip(np.searchsorted(self.cumulative, target, side="right"), lo, hi - 1)
        return self.members[position]


@dataclass(frozen=True)
class _Lists:
    """Per-user variable-length lists (CSR): user u owns entries offsets[u]:offsets[u+1]."""

    offsets: np.ndarray
    entity: np.ndarray
    rate: np.ndarray  # expected behaviour count per snapshot


@dataclass(frozen=True)
class World:
    """Everything fixed before contexts are drawn; indices are entity indices, not ids."""

    sizes: WorldSizes
    profile: SynthProfile
    # users
    user_profile: np.ndarray  # (users, len(PROFILE_FIELDS)) value index per profile field
    user_taste: np.ndarray  # (users, _LATENT_DIM)
    user_fit: np.ndarray  # (users, _CVR_LATENT_DIM)
    user_activity: np.ndarray  # probability of each user per context
    history: Mapping[str, _Lists]  # history field -> per-user lists
    # items
    item_category: np.ndarray
    item_shop: np.ndarray
    item_brand: np.ndarray  # -1: no brand
    item_nodes: np.ndarray  # (items, _MAX_ITEM_NODES), -1 padded
    item_taste: np.ndarray
    item_fit: np.ndarray
    item_ctr: np.ndarray
    item_cvr: np.ndarray
    item_price_tier: np.ndarray  # 0..2, from the brand (1 without brand)
    category_gender: np.ndarray
    category_age: np.ndarray  # (categories, 7)
    category_ctr: np.ndarray
    category_cvr: np.ndarray
    brand_ctr: np.ndarray  # one extra trailing 0 for "no brand" (index -1)
    brand_cvr: np.ndarray
    category_sampler: _GroupSampler  # global category popularity
    item_sampler: _GroupSampler  # items of a category, by item popularity


@dataclass(frozen=True)
class _Categories:
    """Per-category draws the items and histories are built from."""

    taste: np.ndarray  # (categories, _LATENT_DIM)
    fit: np.ndarray  # (categories, _CVR_LATENT_DIM)
    popularity: np.ndarray  # log weight
    gender: np.ndarray
    age: np.ndarray  # (categories, 7)
    nodes: np.ndarray  # (categories, _NODES_PER_CATEGORY) intention nodes


@dataclass(frozen=True)
class _Catalogue:
    """Shops, brands and items; item arrays are indexed by item."""

    shop_sampler: _GroupSampler  # shops of a category
    brand_sampler: _GroupSampler  # brands of a category
    category: np.ndarray
    shop: np.ndarray
    brand: np.ndarray  # -1: no brand
    nodes: np.ndarray  # (items, _MAX_ITEM_NODES), -1 padded
    taste: np.ndarray
    fit: np.ndarray
    ctr: np.ndarray
    cvr: np.ndarray
    price_tier: np.ndarray
    popularity: np.ndarray


@dataclass(frozen=True)
class _Users:
    """Per-user draws; arrays are indexed by user."""

    gender: np.ndarray  # 0 or 1
    profile: np.ndarray  # (users, len(PROFILE_FIELDS))
    taste: np.ndarray
    fit: np.ndarray
    activity: np.ndarray  # unnormalised


def build_world(sizes: WorldSizes, profile: SynthProfile, rng: np.random.Generator) -> World:
    """The world of `sizes`; every draw comes from `rng`, in a fixed order."""
    n_cat, spread = sizes.categories, profile.id_effect
    categories = _draw_categories(sizes, profile, rng)
    items = _draw_catalogue(sizes, profile, categories, rng)
    users = _draw_users(sizes, rng)

    # Behaviour histories: categories by preference, then shops, brands and nodes in them.
    gender_sign = np.where(users.gender == 1, 1.0, -1.0)

    def preference(user: np.ndarray) -> np.ndarray:
        """Score of each user (row) for each category (column)."""
        return (
            users.taste[user] @ categories.taste.T
            + gender_sign[user, None] * categories.gender
            + 0.5 * categories.popularity
        )

    history = _draw_histories(
        preference, categories.nodes, items.shop_sampler, items.brand_sampler, sizes, profile, rng
    )
    no_brand = np.zeros(1)
    return World(
        sizes=sizes,
        profile=profile,
        user_profile=users.profile,
        user_taste=users.taste,
        user_fit=users.fit,
        user_activity=users.activity / users.activity.sum(),
        history=history,
        item_category=items.category,
        item_shop=items.shop,
        item_brand=items.brand,
        item_nodes=items.nodes,
        item_taste=items.taste,
        item_fit=items.fit,
        item_ctr=items.ctr,
        item_cvr=items.cvr,
        item_price_tier=items.price_tier,
        category_gender=categories.gender,
        category_age=categories.age,
        # The id effects are drawn last, in this order (keyword arguments evaluate in order).
        category_ctr=rng.normal(0.0, spread, n_cat),
        category_cvr=rng.normal(0.0, profile.cvr_id_effect, n_cat),
        brand_ctr=np.concatenate([rng.normal(0.0, spread, sizes.brands), no_brand]),
        brand_cvr=np.concatenate([rng.normal(0.0, profile.cvr_id_effect, sizes.brands), no_brand]),
        category_sampler=_GroupSampler.build(
            np.zeros(n_cat, dtype=np.int64), np.exp(categories.popularity), 1
        ),
        item_sampler=_GroupSampler.build(items.category, items.popularity, n_cat),
    )


def _draw_categories(
    sizes: WorldSizes, profile: SynthProfile, rng: np.random.Generator
) -> _Categories:
    """Category tastes, popularity, profile effects and intention nodes."""
    n_cat = sizes.categories
    taste = rng.normal(0.0, 1.0 / math.sqrt(_LATENT_DIM), (n_cat, _LATENT_DIM))
    fit = rng.normal(0.0, 0.8 / math.sqrt(_CVR_LATENT_DIM), (n_cat, _CVR_LATENT_DIM))
    popularity = rng.normal(0.0, 1.0, n_cat)
    gender = rng.normal(0.0, profile.profile_effect, n_cat)
    age = rng.normal(0.0, profile.profile_effect, (n_cat, PROFILE_CARDINALITY["125"]))
    if n_cat > _FULL_SORT_CATEGORIES:  # large worlds: no (categories, nodes) matrix
        nodes = _distinct_draws(n_cat, sizes.nodes, _NODES_PER_CATEGORY, rng)
    else:
        nodes = np.argsort(rng.random((n_cat, sizes.nodes)), axis=1)[:, :_NODES_PER_CATEGORY]
    return _Categories(taste, fit, popularity, gender, age, nodes)


def _draw_catalogue(
    sizes: WorldSizes, profile: SynthProfile, categories: _Categories, rng: np.random.Generator
) -> _Catalogue:
    """Shops and brands per category, then items with their ids, tastes and effects."""
    n_cat, spread = sizes.categories, profile.id_effect
    # Shops and brands belong to one category each; every category has at least one.
    shop_category = _grouped(sizes.shops, categories.popularity, rng)
    shop_sampler = _GroupSampler.build(shop_category, rng.lognormal(0.0, 1.0, sizes.shops), n_cat)
    brand_category = _grouped(sizes.brands, categories.popularity, rng)
    brand_sampler = _GroupSampler.build(
        brand_category, rng.lognormal(0.0, 1.0, sizes.brands), n_cat
    )
    brand_tier = rng.integers(0, 3, sizes.brands)

    # Items.
    item_category = _grouped(sizes.items, categories.popularity, rng)
    item_shop = shop_sampler.draw(item_category, rng)
    item_brand = np.where(
        rng.random(sizes.items) < profile.no_brand_share, -1, brand_sampler.draw(item_category, rng)
    )
    n_nodes = rng.choice(_MAX_ITEM_NODES + 1, size=sizes.items, p=[0.03, 0.5, 0.3, 0.17])
    node_order = np.argsort(rng.random((sizes.items, _NODES_PER_CATEGORY)), axis=1)
    picked = np.take_along_axis(categories.nodes[item_category], node_order, axis=1)
    item_nodes = np.where(
        np.arange(_MAX_ITEM_NODES) < n_nodes[:, None], picked[:, :_MAX_ITEM_NODES], -1
    )
    item_taste = categories.taste[item_category] + rng.normal(
        0.0, 0.5 / math.sqrt(_LATENT_DIM), (sizes.items, _LATENT_DIM)
    )
    item_fit = categories.fit[item_category] + rng.normal(
        0.0, 0.6 / math.sqrt(_CVR_LATENT_DIM), (sizes.items, _CVR_LATENT_DIM)
    )
    item_ctr = rng.normal(0.0, spread, sizes.items)
    item_cvr = 0.2 * item_ctr + rng.normal(0.0, spread, sizes.items)
    # Attractive items that convert badly, and unattractive ones that convert well.
    kind = rng.random(sizes.items)
    clickbait = kind < profile.clickbait_share
    hidden_gem = (kind >= profile.clickbait_share) & (kind < 2 * profile.clickbait_share)
    return _Catalogue(
        shop_sampler=shop_sampler,
        brand_sampler=brand_sampler,
        category=item_category,
        shop=item_shop,
        brand=item_brand,
        nodes=item_nodes,
        taste=item_taste,
        fit=item_fit,
        ctr=item_ctr + 0.8 * clickbait - 0.5 * hidden_gem,
        cvr=item_cvr - 1.2 * clickbait + 0.8 * hidden_gem,
        price_tier=np.where(item_brand >= 0, brand_tier[item_brand], 1),
        popularity=rng.lognormal(0.0, profile.item_popularity_spread, sizes.items),
    )


def _draw_users(sizes: WorldSizes, rng: np.random.Generator) -> _Users:
    """Users' profile fields (121 .. 129), tastes and activity."""
    gender = rng.integers(0, 2, sizes.users)
    age = rng.choice(7, size=sizes.users, p=[0.05, 0.2, 0.3, 0.2, 0.12, 0.08, 0.05])
    taste = rng.normal(0.0, 1.0, (sizes.users, _LATENT_DIM))
    fit = rng.normal(0.0, 1.0, (sizes.users, _CVR_LATENT_DIM))
    consumption = rng.choice(3, size=sizes.users, p=[0.3, 0.45, 0.25])
    consumption_ii = np.where(
        rng.random(sizes.users) < 0.7, consumption, rng.integers(0, 3, sizes.users)
    )
    # 121: the user's nearest "profile category" centre in taste space.
    centres = rng.normal(0.0, 1.0, (PROFILE_CARDINALITY["121"], _LATENT_DIM))
    profile_category = np.argmax(taste @ centres.T, axis=1)
    columns = {
        "121": profile_category,
        "122": gender * 6 + np.minimum(age, 5),
        "124": gender,
        "125": age,
        "126": consumption,
        "127": consumption_ii,
        "128": rng.integers(0, 2, sizes.users),
        "129": rng.choice(4, size=sizes.users, p=[0.4, 0.3, 0.2, 0.1]),
    }
    profile = np.stack([columns[f] for f in PROFILE_FIELDS], axis=1)
    return _Users(gender, profile, taste, fit, activity=rng.lognormal(0.0, 0.8, sizes.users))


def _distinct_draws(n_rows: int, n_values: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n_rows, k) values from range(n_values), distinct within a row (needs n_values >= k)."""
    out = rng.integers(0, n_values, (n_rows, k))
    while True:
        ordered = np.sort(out, axis=1)
        repeat = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not repeat.any():
            return out
        out[repeat] = rng.integers(0, n_values, (int(repeat.sum()), k))


def _grouped(n: int, log_weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Assign n members to groups: one to each group first, the rest by popularity."""
    n_groups = len(log_weight)
    p = np.exp(log_weight - log_weight.max())
    rest = rng.choice(n_groups, size=n - n_groups, p=p / p.sum())
    return np.concatenate([np.arange(n_groups), rest])


def _draw_histories(
    preference: Callable[[np.ndarray], np.ndarray],
    category_nodes: np.ndarray,
    shop_sampler: _GroupSampler,
    brand_sampler: _GroupSampler,
    sizes: WorldSizes,
    profile: SynthProfile,
    rng: np.random.Generator,
) -> dict[str, _Lists]:
    """Each user's 14-day behaviour lists; categories are a top-k of a noisy preference.

    Large worlds (more than `_FULL_SORT_CATEGORIES` categories) are drawn a block of
    `_HISTORY_USERS` users at a time and stored compactly (int32 ids, float32 rates), so
    the temporaries stay bounded; small worlds in one go.
    """
    args = (preference, category_nodes, shop_sampler, brand_sampler, sizes, profile, rng)
    if sizes.categories <= _FULL_SORT_CATEGORIES:
        return _draw_history_block(0, sizes.users, *args)
    parts = [
        _draw_history_block(lo, min(_HISTORY_USERS, sizes.users - lo), *args, compact=True)
        for lo in range(0, sizes.users, _HISTORY_USERS)
    ]
    lists = {}
    for field in HISTORY_FIELDS:
        pieces = [part.pop(field) for part in parts]
        shift = np.cumsum([0] + [len(piece.entity) for piece in pieces[:-1]])
        lists[field] = _Lists(
            offsets=np.concatenate(
                [pieces[0].offsets[:1]]
                + [piece.offsets[1:] + at for piece, at in zip(pieces, shift, strict=True)]
            ),
            entity=np.concatenate([piece.entity for piece in pieces]),
            rate=np.concatenate([piece.rate for piece in pieces]),
        )
    return lists


def _draw_history_block(
    first_user: int,
    n_users: int,
    preference: Callable[[np.ndarray], np.ndarray],
    category_nodes: np.ndarray,
    shop_sampler: _GroupSampler,
    brand_sampler: _GroupSampler,
    sizes: WorldSizes,
    profile: SynthProfile,
    rng: np.random.Generator,
    *,
    compact: bool = False,
) -> dict[str, _Lists]:
    """The behaviour lists of users first_user .. first_user + n_users - 1."""
    n_cat = sizes.categories
    users, cats, likings = [], [], []
    block_users = max(1, min(_USER_BLOCK, _BLOCK_CELLS // n_cat))
    end = first_user + n_users
    for lo in range(first_user, end, block_users):  # blocks bound the (users, categories) matrix
        block = np.arange(lo, min(lo + block_users, end))
        score = preference(block)
        mean_extra = profile.history_categories - 1
        if profile.history_dispersion > 0:
            shape = profile.history_dispersion
            mean_extra = rng.gamma(shape, mean_extra / shape, len(block))
        k = np.clip(1 + rng.poisson(mean_extra, len(block)), 1, n_cat)
        k_max = int(k.max())
        noisy = score + rng.gumbel(size=score.shape)
        if n_cat > _FULL_SORT_CATEGORIES:  # select the top k_max, then order only those
            part = np.argpartition(-noisy, k_max - 1, axis=1)[:, :k_max]
            order = np.argsort(-np.take_along_axis(noisy, part, axis=1), axis=1, kind="stable")
            top = np.take_along_axis(part, order, axis=1)
        else:
            top = np.argsort(-noisy, axis=1, kind="stable")[:, :k_max]
        rows, ranks = np.nonzero(np.arange(k_max) < k[:, None])
        users.append(block[rows] - first_user)
        cats.append(top[rows, ranks])
        likings.append(score[rows, top[rows, ranks]])
    user, category, liking = np.concatenate(users), np.concatenate(cats), np.concatenate(likings)
    rate = profile.history_count * np.exp(
        0.4 * (liking - liking.mean()) + rng.normal(0.0, 0.5, len(user))
    )

    lists = {"109_14": _to_lists(user, category, rate, n_users, n_cat, compact)}
    # Shops, brands and nodes: a few per history category, each with part of its rate.
    kinds = (
        ("110_14", profile.shops_per_category, sizes.shops),
        ("127_14", profile.brands_per_category, sizes.brands),
        ("150_14", profile.nodes_per_category, sizes.nodes),
    )
    for field, mean_per_category, n_entities in kinds:
        parent = np.repeat(np.arange(len(user)), 1 + rng.poisson(mean_per_category - 1, len(user)))
        parent_category = category[parent]
        if field == "110_14":
            entity = shop_sampler.draw(parent_category, rng)
        elif field == "127_14":
            entity = brand_sampler.draw(parent_category, rng)
        else:
            entity = category_nodes[
                parent_category, rng.integers(0, _NODES_PER_CATEGORY, len(parent))
            ]
        share = rng.uniform(0.2, 1.0, len(parent))
        lists[field] = _to_lists(
            user[parent], entity, rate[parent] * share, n_users, n_entities, compact
        )
    return lists


def _to_lists(
    user: np.ndarray,
    entity: np.ndarray,
    rate: np.ndarray,
    n_users: int,
    n_entities: int,
    compact: bool = False,
) -> _Lists:
    """Per-user lists sorted by entity; a repeated (user, entity) keeps its first rate."""
    key, first = np.unique(user * n_entities + entity, return_index=True)
    offsets = np.searchsorted(key // n_entities, np.arange(n_users + 1))
    if compact:
        return _Lists(
            offsets=offsets,
            entity=(key % n_entities).astype(np.int32),
            rate=rate[first].astype(np.float32),
        )
    return _Lists(offsets=offsets, entity=key % n_entities, rate=rate[first])
