"""The key order of qemu-img's JSON and of its nested human output.

qemu-img builds those from QEMU's QDict, a hash table of 512 buckets walked
in bucket order, so its keys come out in the order of their bucket numbers
(a later insertion first within one bucket). Putting our dicts in the same
order makes ``--output=json`` text, and the ``Format specific information``
lines, read the same as qemu-img's, for scripts that compare text.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

T = TypeVar("T")

_BUCKETS = 512


def _bucket(key: str) -> int:
    """The QDict bucket of ``key``: QEMU's string hash (a variant of the TDB
    hash: a length seed, each byte shifted by 5 bits more, mod 24, then one
    linear-congruential step), modulo the bucket count."""
    data = key.encode()
    h = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        h = (h + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * h + 12345) & 0xFFFFFFFF) % _BUCKETS


def qemu_order(value: T) -> T:
    """``value`` with every dict in it (lists walked too) in QDict order."""
    return cast(T, _ordered(value))


def _ordered(value: Any) -> Any:
    if isinstance(value, dict):
        items = list(value.items())[::-1]  # within a bucket the last inserted comes first
        items.sort(key=lambda kv: _bucket(kv[0]))
        return {k: _ordered(v) for k, v in items}
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value
