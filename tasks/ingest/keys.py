"""Key hashes and the checks built on them: stable 64-bit hashes of string keys, the
train/valid split by context key, runs of equal keys, duplicate detection over a whole file
(`SeenKeys`) and exact membership in a set of keys (`KnownKeys`).

`hash_keys` is pandas' `hash_array(values, categorize=False)` on strings, re-done with numpy
so that pandas stays out of ingestion (its import is slow, see benchmarks/ingest.md):
SipHash-2-4 of each string's UTF-8 bytes under pandas' default key, then pandas' 64-bit
mixing. The split of contexts into train and validation depends on these values, so they
must not change (a test compares with pandas).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.ingest.arrays import arrow, bools

_SIP_KEY = b"0123456789123456"  # pandas.core.util.hashing._default_hash_key
_U64 = np.uint64
# Low-bits masks of a little-endian uint64 holding the first n bytes of a string.
_BYTE_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [2**64 - 1], dtype=np.uint64)


def _rotl(x: np.ndarray, bits: int) -> np.ndarray:
    return (x << _U64(bits)) | (x >> _U64(64 - bits))


def _sip_rounds(v: list[np.ndarray], rounds: int) -> None:
    v0, v1, v2, v3 = v
    for _ in range(rounds):
        v0 += v1
        v1 = _rotl(v1, 13)
        v1 ^= v0
        v0 = _rotl(v0, 32)
        v2 += v3
        v3 = _rotl(v3, 16)
        v3 ^= v2
        v0 += v3
        v3 = _rotl(v3, 21)
        v3 ^= v0
        v2 += v1
        v1 = _rotl(v1, 17)
        v1 ^= v2
        v2 = _rotl(v2, 32)
    v[:] = [v0, v1, v2, v3]


def _siphash(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """SipHash-2-4 of the byte strings at `starts` (`words`: a uint64 read at every offset)."""
    k0 = _U64(int.from_bytes(_SIP_KEY[:8], "little"))
    k1 = _U64(int.from_bytes(_SIP_KEY[8:], "little"))
    n = len(starts)
    v = [
        np.full(n, k0 ^ _U64(0x736F6D6570736575)),
        np.full(n, k1 ^ _U64(0x646F72616E646F6D)),
        np.full(n, k0 ^ _U64(0x6C7967656E657261)),
        np.full(n, k1 ^ _U64(0x7465646279746573)),
    ]
    for block in range(int(lengths.max(initial=0)) // 8):  # full 8-byte blocks
        more = lengths >= 8 * (block + 1)  # the strings that have this block
        if more.all():
            m = words[starts + 8 * block]
            v[3] ^= m
            _sip_rounds(v, 2)
            v[0] ^= m
            continue
        sub = np.flatnonzero(more)
        m = words[starts[sub] + 8 * block]
        part = [x[sub] for x in v]
        part[3] ^= m
        _sip_rounds(part, 2)
        part[0] ^= m
        for x, p in zip(v, part, strict=True):
            x[sub] = p
    tail = lengths & 7
    last = words[starts + (lengths - tail)] & _BYTE_MASKS[tail]
    b = (lengths.astype(np.uint64) << _U64(56)) | last
    v[3] ^= b
    _sip_rounds(v, 2)
    v[0] ^= b
    v[2] ^= _U64(0xFF)
    _sip_rounds(v, 4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def hash_keys(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Stable 64-bit hashes of string keys (same on every run and machine); equal to
    `pandas.util.hash_array(keys, categorize=False)`."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if keys.null_count:
        raise ValueError("hash_keys: keys must not be null")
    keys = pc.cast(keys, pa.large_string())
    n = len(keys)
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64)[keys.offset : keys.offset + n + 1]
    raw = keys.buffers()[2]
    data = np.frombuffer(raw, dtype=np.uint8) if raw is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data[offsets[0] : offsets[-1]], np.zeros(8, dtype=np.uint8)])
    words = np.ndarray(shape=(len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    hashed = _siphash(words, offsets[:-1] - offsets[0], np.diff(offsets))
    # pandas' redistribution of the 64-bit values.
    hashed ^= hashed >> _U64(30)
    hashed *= _U64(0xBF58476D1CE4E5B9)
    hashed ^= hashed >> _U64(27)
    hashed *= _U64(0x94D049BB133111EB)
    hashed ^= hashed >> _U64(31)
    return hashed


def split_of(keys: pa.Array, valid_fraction: float) -> np.ndarray:
    """Deterministic train/valid assignment by context key (True = validation).

    A user context never straddles splits; the hash is stable across runs and machines.
    """
    heads, hashes = key_runs(keys)
    return np.repeat(in_valid_split(hashes, valid_fraction), np.diff(heads, append=len(keys)))


def in_valid_split(hashes: np.ndarray, valid_fraction: float) -> np.ndarray:
    """True where a context key's hash puts it in the validation split."""
    return (hashes % np.uint64(1_000_000)) < np.uint64(round(valid_fraction * 1_000_000))


def key_runs(keys: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """First row of each run of equal consecutive keys, and the key's hash.

    Impressions of one context are mostly consecutive: each run is hashed once."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if len(keys) < 2:
        return np.arange(len(keys)), hash_keys(keys)
    starts_run = np.ones(len(keys), dtype=bool)
    starts_run[1:] = bools(pc.not_equal(keys[1:], keys[:-1]))
    heads = np.flatnonzero(starts_run)
    return heads, hash_keys(pc.take(keys, arrow(heads)))


class SeenKeys:
    """Exact-duplicate detection over a whole file in 8 bytes per key (64-bit hashes).

    Keys live in a few sorted runs of growing size (merged like a binary counter), so checking
    a chunk costs a binary search per run. Two distinct keys share a hash with probability about
    n^2 / 2^65 (about 2e-4 for all 84M Ali-CCP impressions).
    """

    def __init__(self, max_runs: int = 8):
        self._runs: list[np.ndarray] = []
        self._max_runs = max_runs

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def check_and_add(self, hashes: np.ndarray) -> np.ndarray:
        """True where a key was seen before (earlier in the file or the same batch)."""
        if len(hashes) == 0:
            return np.zeros(0, dtype=bool)
        keys = np.sort(hashes)  # the usual case, no key seen before: no need for the order
        if not (keys[1:] == keys[:-1]).any() and not any(
            (run[np.minimum(np.searchsorted(run, keys), len(run) - 1)] == keys).any()
            for run in self._runs
        ):
            self._add(keys)
            return np.zeros(len(hashes), dtype=bool)
        order = np.argsort(hashes, kind="stable")  # a batch repeat's first occurrence first
        keys = hashes[order]
        dup = np.zeros(len(keys), dtype=bool)
        dup[1:] = keys[1:] == keys[:-1]
        for run in self._runs:  # sorted queries: numpy's binary search reuses its last bound
            pos = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            dup |= run[pos] == keys
        if not dup.all():
            self._add(keys[~dup])
        in_order = np.empty(len(hashes), dtype=bool)
        in_order[order] = dup
        return in_order

    def _add(self, run: np.ndarray) -> None:
        """Add a sorted run; merge the newest runs while the last is as large as the one
        before (so there are about log2(keys / batch) runs), or while there are too many.
        Merging two sorted runs is linear (timsort finds them)."""
        self._runs.append(run)
        while len(self._runs) > 1 and (
            len(self._runs[-2]) <= len(self._runs[-1]) or len(self._runs) > self._max_runs
        ):
            last, before = self._runs.pop(), self._runs.pop()
            self._runs.append(np.sort(np.concatenate([before, last]), kind="stable"))


class KnownKeys:
    """Exact membership of string keys in a fixed set, by 64-bit hash then string compare.

    `pc.is_in` rebuilds its hash table of the set on every call (slow for hundreds of
    thousands of contexts, see benchmarks/ingest.md); this sorts the set's hashes once."""

    def __init__(self, keys: pa.Array, hashes: np.ndarray):
        self._keys = keys
        self._order = np.argsort(hashes, kind="stable")
        self._sorted = hashes[self._order]

    def contains(self, keys: pa.Array, hashes: np.ndarray) -> np.ndarray:
        """True where keys[i] (whose hash is hashes[i]) is in the set."""
        if len(self._sorted) == 0 or len(keys) == 0:
            return np.zeros(len(keys), dtype=bool)
        pos = np.minimum(np.searchsorted(self._sorted, hashes), len(self._sorted) - 1)
        hit = self._sorted[pos] == hashes
        rows = np.flatnonzero(hit)
        if len(rows):  # the same hash is no proof: compare the strings
            candidates = pc.take(self._keys, arrow(self._order[pos[rows]]))
            same = pc.equal(pc.take(keys, arrow(rows)), candidates)
            hit[rows] = bools(same)
            unsure = rows[~hit[rows]]
            if len(unsure):  # another key of the set with the same hash (very rare)
                found = pc.is_in(pc.take(keys, arrow(unsure)), value_set=self._keys)
                hit[unsure] = bools(found)
        return hit
