"""The held-out split: which samples (and cameras) training never sees, by a stable hash of
what a sample is. Pure functions of names (no torch), shared by the loader and the decoder."""
from __future__ import annotations

import hashlib
import re


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little")


_INPUT_HASH = re.compile(r"_[0-9a-f]{10}$")


def split_name(key: str) -> str:
    """What the held-out split hashes: the sample key without its input-id hash (dataprep.samples.make.
    sample_key appends a hash of the source URL), i.e. capture name + frame, or the photo's name.
    The split then depends on what a sample is, not on where its source lived: the same captures
    built from another directory or bucket hold out the same frames."""
    return _INPUT_HASH.sub("", key) or key


def _split_hash(name: str) -> int:
    return _key_hash(split_name(name))


def held_out(key: str, fraction: float) -> bool:
    """Holdout by split-name hash (sha1, never Python's salted hash()): stable across versions,
    source locations, ranks, workers, processes and runs."""
    return fraction > 0 and _split_hash(key) / 2.0 ** 64 < fraction


def holdout_set(keys: list[str], fraction: float) -> set[str]:
    """The held-out keys (or camera ids) of a set: `held_out` by hash, except that a fraction > 0
    of two or more always holds out at least one and keeps at least one (the smallest / largest
    hash: what a slightly larger / smaller fraction would pick). A pure function of the keys, so
    training and evaluation agree without sharing state."""
    held = {k for k in keys if held_out(k, fraction)}
    if fraction > 0 and len(keys) >= 2:
        order = sorted(keys, key=lambda k: (_split_hash(k), k))
        if not held:
            held = {order[0]}
        elif len(held) == len(keys):
            held.discard(order[-1])
    return held
