"""GrowthBook-compatible hashing and bucketing.

These functions reproduce the bucketing primitives of GrowthBook's Python SDK bit for bit, so
that a team moving its experiments from GrowthBook to RecMesh keeps every user in the bucket
they were in. ``tests/core/experiments/conformance/growthbook/cases.json`` (GrowthBook's shared SDK
test suite, spec 0.7.1) pins the behaviour.

Two GrowthBook details that are easy to get wrong are part of the contract:

* FNV-1a here folds in each *Unicode code point* of the string (``ord(ch)``), not the bytes of
  its UTF-8 encoding. For ASCII the two are the same; for other text only the code-point form
  matches GrowthBook.
* A bucket range is half-open, ``[start, end)``: a hash equal to ``end`` falls outside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

BucketRange = tuple[float, float]
"""A half-open interval ``[start, end)`` of hash values, both within ``[0, 1]``."""

Namespace = tuple[str, float, float]
"""``(namespace_id, start, end)``: the slice ``[start, end)`` of a namespace's hash space."""

HashVersion = Literal[1, 2]
"""The hash algorithms GrowthBook defines; any other version number hashes to ``None``."""

_FNV32_OFFSET_BASIS = 0x811C9DC5
_FNV32_PRIME = 0x01000193
_UINT32_MASK = 0xFFFFFFFF

# GrowthBook keeps weights whose sum lies within this band and replaces any other set by equal
# weights; the band tolerates rounded percentages such as three times 0.333.
WEIGHT_SUM_MIN = 0.99
WEIGHT_SUM_MAX = 1.01


def fnv1a32(text: str) -> int:
    """32-bit FNV-1a over the code points of ``text``.

    Args:
        text: any string; each code point is XORed in whole, as GrowthBook does.

    Returns:
        The hash, an integer in ``[0, 2**32)``.
    """
    value = _FNV32_OFFSET_BASIS
    for char in text:
        value = ((value ^ ord(char)) * _FNV32_PRIME) & _UINT32_MASK
    return value


@overload
def gb_hash(seed: str, value: str, version: HashVersion) -> float: ...


@overload
def gb_hash(seed: str, value: str, version: int) -> float | None: ...


def gb_hash(seed: str, value: str, version: int) -> float | None:
    """GrowthBook's deterministic hash of ``value`` under ``seed``, scaled into ``[0, 1)``.

    Version 1 is ``(fnv1a32(value + seed) % 1000) / 1000`` (three decimals of resolution).
    Version 2 is ``(fnv1a32(str(fnv1a32(seed + value))) % 10000) / 10000``; hashing the decimal
    string of a first hash removes the correlation version 1 shows between similar seeds.

    Args:
        seed: the experiment's seed (GrowthBook uses the experiment key when none is set).
        value: the value of the hash attribute, e.g. a user id.
        version: the hash version, 1 or 2.

    Returns:
        A float in ``[0, 1)``, or ``None`` when ``version`` is neither 1 nor 2.
    """
    if version == 1:
        return (fnv1a32(value + seed) % 1000) / 1000
    if version == 2:
        return (fnv1a32(str(fnv1a32(seed + value))) % 10000) / 10000
    return None


def get_equal_weights(num_variations: int) -> list[float]:
    """Weights that split traffic evenly.

    Args:
        num_variations: how many variations share the traffic.

    Returns:
        ``num_variations`` copies of ``1 / num_variations``, or ``[]`` when it is below 1.
    """
    if num_variations < 1:
        return []
    return [1 / num_variations] * num_variations


def get_bucket_ranges(
    num_variations: int,
    coverage: float = 1.0,
    weights: Sequence[float] | None = None,
) -> list[BucketRange]:
    """The hash range of each variation, GrowthBook style.

    Variation ``i`` owns the slice of ``[0, 1]`` that starts at the sum of the weights before
    it and is ``weights[i]`` wide; only the first ``coverage`` fraction of each slice is used,
    so lowering coverage shrinks every range from its end and never moves a user from one
    variation to another.

    Bad input is repaired, never rejected, exactly as GrowthBook does: ``coverage`` is clamped
    into ``[0, 1]``; ``weights`` is replaced by equal weights when it is ``None``, when its
    length differs from ``num_variations``, or when its sum lies outside
    ``[WEIGHT_SUM_MIN, WEIGHT_SUM_MAX]``. A sum inside that band is used as given, so the last
    range may end slightly before or after 1.

    Args:
        num_variations: number of variations.
        coverage: fraction of users to include, nominally in ``[0, 1]``.
        weights: traffic share of each variation, nominally summing to 1.

    Returns:
        One ``[start, end)`` range per variation, in variation order.
    """
    coverage = min(max(coverage, 0.0), 1.0)
    if (
        weights is None
        or len(weights) != num_variations
        or not WEIGHT_SUM_MIN <= sum(weights) <= WEIGHT_SUM_MAX
    ):
        weights = get_equal_weights(num_variations)
    ranges: list[BucketRange] = []
    start = 0.0
    for weight in weights:
        ranges.append((start, start + coverage * weight))
        start += weight
    return ranges


def choose_variation(n: float, ranges: Sequence[BucketRange]) -> int:
    """The variation whose range holds the hash ``n``.

    Args:
        n: a hash value from :func:`gb_hash`.
        ranges: bucket ranges from :func:`get_bucket_ranges`.

    Returns:
        The index of the first range with ``start <= n < end``, or -1 when none holds ``n``
        (the user is outside the experiment's coverage).
    """
    for index, (start, end) in enumerate(ranges):
        if start <= n < end:
            return index
    return -1


def in_namespace(hash_value: str, namespace: Namespace) -> bool:
    """Whether a user falls in an experiment's slice of a namespace.

    Experiments that share a namespace id and take disjoint slices of it are mutually
    exclusive: the namespace hash (version 1, seed ``"__" + namespace_id``) does not depend on
    the experiment, so a user lands in at most one of the slices.

    Args:
        hash_value: the user's hash attribute value (GrowthBook passes the same value it
            buckets on, usually the user id).
        namespace: ``(namespace_id, start, end)``.

    Returns:
        True when the namespace hash lies in ``[start, end)``.
    """
    namespace_id, start, end = namespace
    return start <= gb_hash("__" + namespace_id, hash_value, 1) < end
