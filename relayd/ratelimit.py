"""Per-address bounds: token buckets for rates, slot counts for handshakes in flight.

A source address is keyed as a whole IPv4 address, or as its /64 for IPv6:
one subscriber gets at least a /64 (RFC 6177), so keying whole IPv6
addresses would let one client present 2**64 of them.

Keys whose bucket has refilled completely carry no information and are
pruned, so an attacker cycling addresses cannot grow the table without
bound beyond `max_keys` (past which new keys are refused outright: failing
closed under a flood is the safe side for a console gateway). No I/O.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from .throttle import TokenBucket


def address_key(peer: str) -> str:
    """The key per-address limits count `peer` under: the address, or its /64 for IPv6.

    Anything that is not an IP address (a unix-socket peer, ``-``) is its own key.
    """
    if ":" not in peer:  # IPv4 (or not an address at all): the whole string
        return peer
    try:
        address = ipaddress.IPv6Address(peer)
    except ValueError:
        return peer
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"


class KeyedLimiter:
    """Allow `burst` events at once and `rate` per second after, per source address.

    Keys go through `address_key`, so an IPv6 /64 counts as one address.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until one more event is allowed for `key` (0 when allowed now)."""
        bucket = self._buckets.get(address_key(key))
        if bucket is None:
            return 0.0 if len(self._buckets) < self.max_keys else 1.0
        available = bucket.available(now)
        return 0.0 if available >= 1 else (1 - available) / self.rate

    def hit(self, key: str, now: float) -> None:
        """Record one event for `key`."""
        key = address_key(key)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self.prune(now)
                if len(self._buckets) >= self.max_keys:
                    return
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now=now)
        bucket.reserve(1, now)

    def prune(self, now: float) -> None:
        """Drop keys whose bucket is full again."""
        full = [k for k, b in self._buckets.items() if b.available(now) >= self.burst]
        for k in full:
            del self._buckets[k]


class HandshakeSlots:
    """Connections between accept and the end of their TLS handshake, in all and per key.

    A connection takes a slot at accept, keyed by its source (`address_key`);
    one from a trusted proxy takes an unkeyed slot first (its real source is
    in the PROXY header still to be read) and is `assign`-ed a key once that is
    known. The caps are passed per call so a reload applies at once; 0 means
    no cap. Only keys with a slot held are stored, so the table is bounded by
    the global cap.
    """

    def __init__(self) -> None:
        self.total = 0
        self._per_key: Counter[str] = Counter()

    def held(self, key: str) -> int:
        """Slots held by `key` now."""
        return self._per_key[key]

    def enter(self, key: str | None, *, max_total: int, max_per_key: int) -> bool:
        """Take a slot for a new connection (`key` None: not known yet); False if over a cap."""
        if max_total and self.total >= max_total:
            return False
        if key is not None and not self._take(key, max_per_key):
            return False
        self.total += 1
        return True

    def assign(self, key: str, *, max_per_key: int) -> bool:
        """Give an unkeyed slot its key; False (the slot still unkeyed) if `key` is full."""
        return self._take(key, max_per_key)

    def leave(self, key: str | None) -> None:
        """Give a slot back (`key` as it was entered or assigned)."""
        self.total -= 1
        if key is not None:
            self._per_key[key] -= 1
            if self._per_key[key] <= 0:
                del self._per_key[key]

    def _take(self, key: str, max_per_key: int) -> bool:
        if max_per_key and self._per_key[key] >= max_per_key:
            return False
        self._per_key[key] += 1
        return True
