"""The generator's random streams: every draw comes from its own numbered stream of the seed,
SeedSequence(seed, spawn_key=(stream, index, ...)), so that each part (world, layout, pilot,
contexts, chunks, defects) is fixed by the seed alone, whatever the other parts draw."""

from __future__ import annotations

import numpy as np

WORLD_STREAM = 1  # the world: items, users, histories
LAYOUT_STREAM = 2  # the feature-id layout
PILOT_STREAM = 3  # the pilot impressions that calibrate the two biases
CONTEXT_STREAM = 4  # (4, split index): a split's contexts
CHUNK_STREAM = 5  # (5 + split index, chunk index): a chunk's impressions and labels
DEFECT_STREAM = 8  # (8, split index, chunk index): a chunk's defects


def stream_rng(seed: int, *key: int) -> np.random.Generator:
    """The generator of stream `key` (stream number, then indices) of `seed`."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
