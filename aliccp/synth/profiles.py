"""Synthetic data profiles: target rates, world sizes and signal strengths (`SynthProfile`),
the named profiles (`PROFILES`) and the user profile fields with their cardinalities."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Number of distinct values of the single-valued user profile fields (as in the real data).
PROFILE_CARDINALITY: Mapping[str, int] = {
    "121": 98,
    "122": 13,
    "124": 2,
    "125": 7,
    "126": 3,
    "127": 3,
    "128": 2,
    "129": 4,
}
PROFILE_FIELDS: tuple[str, ...] = tuple(PROFILE_CARDINALITY)


@dataclass(frozen=True)
class SynthProfile:
    """Target rates, world sizes and signal strengths of one synthetic data profile.

    Attributes:
        name: profile name, as used in `params.yaml`.
        ctr: target share of impressions that are clicked.
        cvr: target share of clicks that convert.
        impressions_per_context: mean impressions of one user context.
        impressions_per_user: train impressions per user (sets the number of users).
        impressions_per_item: train impressions per item (sets the number of items).
        impressions_per_category: train impressions per category (sets the number of
            categories, between `min_categories` and `max_categories`).
        min_categories: fewest categories, whatever the size.
        max_categories: most categories, whatever the size.
        items_per_shop: items per shop (sets the number of shops).
        items_per_brand: items per brand (sets the number of brands).
        max_position: largest position id; later impressions of a context share it.
        history_categories: mean categories in a user's 14-day history (109_14).
        history_dispersion: spread of the history lengths between users: 0 gives
            Poisson lengths; a positive `a` draws each user's mean from a gamma with
            shape `a` first (coefficient of variation about 1 / sqrt(a)).
        shops_per_category: mean history shops per history category (110_14).
        brands_per_category: mean history brands per history category (127_14).
        nodes_per_category: mean history intention nodes per history category (150_14).
        history_count: typical behaviour count of a history entry in one snapshot.
        personal_share: share of impressions recommended from the user's history
            categories; the rest follow global popularity.
        no_brand_share: share of items without a brand (216 absent).
        item_popularity_spread: sigma of the log-normal item popularity within a
            category; larger is a longer tail.
        affinity: weight of the user x item taste in the click logit.
        cvr_affinity: weight of the same taste in the conversion logit (shared part).
        cvr_fit: weight of the conversion-only user x item fit.
        id_effect: spread of the per-category, per-brand and per-item click effects and
            of the per-item conversion effects.
        cvr_id_effect: spread of the per-category and per-brand conversion effects.
        profile_effect: spread of the gender and age x category effects.
        position_effect: click logit lost per unit of log(1 + position).
        category_match: click weight of log(1 + history count of the item's category).
        shop_match: click and conversion weight of the shop history count.
        brand_match: conversion weight of the brand history count.
        node_match: click weight of the largest matched intention-node count.
        price_fit: conversion weight of consumption level x brand price tier fit.
        clickbait_share: share of items that attract clicks but convert badly, and
            equally of items that are rarely clicked but convert well.
        context_noise: spread of the hidden per-context effect (both logits).
    """

    name: str
    ctr: float = 0.07
    cvr: float = 0.12
    impressions_per_context: float = 15.0
    impressions_per_user: int = 100
    impressions_per_item: int = 20
    impressions_per_category: int = 250
    min_categories: int = 40
    max_categories: int = 400
    items_per_shop: int = 5
    items_per_brand: int = 8
    max_position: int = 49
    history_categories: float = 12.0
    history_dispersion: float = 0.0
    shops_per_category: float = 1.5
    brands_per_category: float = 1.3
    nodes_per_category: float = 1.5
    history_count: float = 3.0
    personal_share: float = 0.6
    no_brand_share: float = 0.05
    item_popularity_spread: float = 1.0
    affinity: float = 0.4
    cvr_affinity: float = 0.3
    cvr_fit: float = 0.3
    id_effect: float = 0.3
    cvr_id_effect: float = 0.5
    profile_effect: float = 0.25
    position_effect: float = 0.2
    category_match: float = 0.3
    shop_match: float = 0.2
    brand_match: float = 0.3
    node_match: float = 0.15
    price_fit: float = 0.3
    clickbait_share: float = 0.08
    context_noise: float = 0.2


PROFILES: Mapping[str, SynthProfile] = {
    # Small, dense and quick to learn: short histories, high rates (the default data set).
    "default": SynthProfile(name="default"),
    # Shaped like the real Ali-CCP (ESMM paper, Table 1: 0.4M users, 4.3M items, 84M
    # impressions, 3.4M clicks, 18k conversions): CTR about 4%, conversion given click about
    # 0.5%, about 25 impressions per context, about 210 impressions per user and 20 per
    # item, thousands of categories, long-tailed item popularity, and behaviour lists of
    # hundreds of entries per context (medians at 1M-10M impressions: 109_14 about 120,
    # 110_14 about 320, 127_14 about 160, 150_14 about 140; a bit shorter in small worlds).
    "realistic": SynthProfile(
        name="realistic",
        ctr=0.04,
        cvr=0.005,
        impressions_per_context=25.0,
        impressions_per_user=210,
        impressions_per_item=20,
        impressions_per_category=1250,
        min_categories=600,
        max_categories=8000,
        items_per_shop=2,
        items_per_brand=4,
        history_categories=150.0,
        history_dispersion=3.0,
        shops_per_category=3.8,
        brands_per_category=1.8,
        nodes_per_category=1.6,
        item_popularity_spread=2.0,
    ),
}


def resolve_profile(profile: str | SynthProfile) -> SynthProfile:
    """The profile itself, or the one of `PROFILES` with that name.

    Raises:
        ValueError: the name is not in `PROFILES`.
    """
    if isinstance(profile, SynthProfile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    return PROFILES[profile]
