"""Spans of a block's bytes as Arrow arrays, without copying them out: strings, parsed
numbers, and the index of each field id among the known fields."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.ingest.arrays import arrow, strings


def offsets_type(size: int) -> tuple[type, pa.DataType]:
    """Offset dtype and string type able to address a block of `size` bytes."""
    return (np.int32, pa.string()) if size < 2**31 else (np.int64, pa.large_string())


def interleaved(buffer: pa.Buffer, starts: np.ndarray, ends: np.ndarray, valid=None) -> pa.Array:
    """A string array over the block whose even elements are the spans [starts, ends) and
    whose odd elements are the gaps between them (null, and so skipped by kernels, when
    `valid` is given: True, or a mask that makes an even element null where it is False).

    Spans must be ordered and non-overlapping; nothing is copied."""
    n = len(starts)
    dtype, string_type = offsets_type(buffer.size)
    offsets = np.empty(2 * n + 1, dtype=dtype)
    offsets[0:-1:2], offsets[1::2] = starts, ends
    offsets[-1] = ends[-1] if n else 0
    bitmap = None
    if valid is True or (valid is not None and valid.all()):  # even elements valid, odd null
        bitmap = pa.py_buffer(np.full((2 * n + 7) // 8, 0x55, dtype=np.uint8))
    elif valid is not None:
        mask = np.zeros(2 * n, dtype=bool)
        mask[0::2] = valid
        bitmap = pa.py_buffer(np.packbits(mask, bitorder="little"))
    cls = pa.StringArray if string_type == pa.string() else pa.LargeStringArray
    return cls.from_buffers(2 * n, pa.py_buffer(offsets), buffer, bitmap)


def spans(buffer: pa.Buffer, starts: np.ndarray, ends: np.ndarray) -> pa.StringArray:
    """Strings block[starts[i]:ends[i]] (copied) for ordered, non-overlapping spans."""
    if len(starts) == 0:
        return strings([])
    every_other = arrow(np.arange(0, 2 * len(starts), 2, dtype=np.int64))
    spans = pc.take(interleaved(buffer, starts, ends), every_other)
    return spans if spans.type == pa.string() else pc.cast(spans, pa.string())


_NUMPY_TYPES = {pa.int64(): np.int64, pa.float32(): np.float32}


def cast_spans(
    buffer: pa.Buffer, starts: np.ndarray, ends: np.ndarray, valid: np.ndarray, to: pa.DataType
) -> np.ndarray:
    """The spans parsed as `to` where `valid` (elsewhere 0), without copying them out.

    Raises:
        pa.ArrowInvalid: a valid span does not parse.
    """
    if len(starts) == 0:
        return np.zeros(0, dtype=_NUMPY_TYPES[to])
    parsed = pc.cast(interleaved(buffer, starts, ends, valid), to)
    values = np.frombuffer(parsed.buffers()[1], dtype=_NUMPY_TYPES[to])
    return values[parsed.offset : parsed.offset + 2 * len(starts) : 2]


# A field id of at most 7 bytes is identified by one uint64: its bytes and the 0x02 after it
# (little-endian; where the 0x02 sits gives the length, so "101" and "101\x00" differ). The
# first 8 bytes of a longer id hold no 0x02, so they match no known field.
_FIELD_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(1, 8)] + [2**64 - 1], dtype=np.uint64)
_HASH_BITS = 7  # 128 slots for the known fields


@functools.lru_cache
def _field_table(fields: tuple[str, ...]) -> tuple[np.uint64, np.ndarray, np.ndarray]:
    """A perfect hash of the fields' keys: multiplier, key of each slot, field of each slot
    (len(fields) in the empty slots, whose key matches nothing)."""
    raw = [f.encode() for f in fields]
    if any(len(r) > 7 for r in raw):
        raise ValueError(f"field ids longer than 7 bytes are not supported: {fields}")
    keys = np.array([int.from_bytes(r + b"\x02", "little") for r in raw], dtype=np.uint64)
    rng = np.random.default_rng(0)  # deterministic search for a collision-free multiplier
    while True:
        mult = np.uint64(rng.integers(0, 2**63, dtype=np.uint64) * 2 + 1)
        slots = (keys * mult) >> np.uint64(64 - _HASH_BITS)
        if len(np.unique(slots)) == len(keys):
            break
    slot_keys = np.zeros(1 << _HASH_BITS, dtype=np.uint64)  # 0: no key (all hold a 0x02)
    slot_fields = np.full(1 << _HASH_BITS, len(fields), dtype=np.uint8)
    slot_keys[slots], slot_fields[slots] = keys, np.arange(len(fields))
    return mult, slot_keys, slot_fields


def field_indices(
    data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, fields: tuple[str, ...]
) -> np.ndarray:
    """Index in `fields` of each field id block[starts:starts + lengths], each followed by its
    0x02 (len(fields) where unknown)."""
    mult, slot_keys, slot_fields = _field_table(fields)
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint8)
    if starts.max() + 8 > len(data):  # the window reads 8 bytes: pad the tail of the block
        data = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
    # An unaligned little-endian uint64 at every byte offset of the block.
    words = np.ndarray(shape=(len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    keys = words[starts]
    keys &= np.take(_FIELD_MASKS, lengths, mode="clip")
    slot = keys * mult
    slot >>= np.uint64(64 - _HASH_BITS)
    slot = slot.view(np.int64)
    found = np.take(slot_fields, slot)
    unknown = np.take(slot_keys, slot) != keys
    if unknown.any():
        found[unknown] = len(fields)
    return found


def unknown_fields(
    block: bytes | bytearray,
    starts: np.ndarray,
    ends: np.ndarray,
    field_index: np.ndarray,
    fields: tuple[str, ...],
) -> Counter:
    """Entries per field id not in `fields` (decoded once per distinct id)."""
    unknown = np.flatnonzero(field_index == len(fields))
    if len(unknown) == 0:
        return Counter()
    bounds = np.stack([starts[unknown], ends[unknown]], axis=1)
    texts = Counter(bytes(block[s:e]) for s, e in bounds.tolist())
    return Counter({text.decode("utf-8"): n for text, n in texts.items()})
