"""Prefix affinity for stateless requests: a request goes to a replica that recently served its
prompt prefix (its KV is then likely in that replica's prefix cache) unless that replica is
much busier than the least busy one. Pure logic (no Ray): prefix_keys.py names the prefixes,
the router (router.py) feeds this what Serve and the replicas report.

    replica   RecentPrefixes: the prefix keys of the requests it served lately (an LRU of
              PREFIXES_REPORTED), packed into its routing stats (`prefixes`, report.py)
    router    PrefixLedger: per replica, the keys of its last report plus the keys this router
              placed there since (a request placed moments ago is in no report yet; its keys
              count until two newer reports have come, the second surely includes them)
    ranking   rank_stateless: the replicas holding the deepest of the request's keys first,
              if their load is within the slack of the least busy replica's: at most
              max(least + SLACK_REQUESTS, SLACK_RATIO * least); then the others, least
              loaded first

A replica's load is its requests in flight as it counts them itself (Serve's count, asked of
each replica when the request is routed: every proxy's requests, live sockets included), or,
from a replica that does not answer in time, its engine queue as it last reported it
(`stateless_load`). Not the router's own queue-length cache: in Ray 2.60 it counts a proxied
HTTP request as done within milliseconds of sending it (seen: a streamed answer still running
seconds later, the cache at 0 throughout, while the replica's own count said 1), so it sees an
idle cluster under any HTTP load.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

PREFIXES_REPORTED = 4096  # keys per replica report: 32 KiB packed (8 bytes each), once a second
SLACK_REQUESTS = 4  # a holder may have this many more requests in flight than the least busy replica ...
SLACK_RATIO = 2.0  # ... or up to this many times as many, whichever is more
KEY_HEX = 16  # prefix_keys.KEY_BYTES in hex


# ---------------------------------------------------------------------------------- replica side
class RecentPrefixes:
    """The prefix keys this replica served lately, most recent last (thread-safe: the app's
    middleware adds, record_routing_stats packs)."""

    def __init__(self, capacity: int = PREFIXES_REPORTED) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._keys[key] = None
                self._keys.move_to_end(key)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def packed(self) -> bytes:
        with self._lock:
            return pack_keys(self._keys)


def pack_keys(keys: Iterable[str]) -> bytes:
    """Hex keys -> their bytes, concatenated (what a routing report carries)."""
    return bytes.fromhex("".join(keys))


def unpack_keys(blob: bytes) -> frozenset[str]:
    text = blob.hex()
    return frozenset(text[i:i + KEY_HEX] for i in range(0, len(text), KEY_HEX))


# ---------------------------------------------------------------------------------- router side
@dataclass
class PrefixLedger:
    """What each replica holds, as one router knows it (see the module docstring)."""

    _reported: dict[str, tuple[Any, frozenset[str]]] = field(default_factory=dict)  # replica -> (report id, keys)
    _placed: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)  # replica -> (since its last report, before)

    def observe_report(self, replica: str, stats: Mapping[str, Any] | None) -> None:
        s = stats or {}
        last = self._reported.get(replica)
        if last is not None and last[0] == s.get("report"):
            return
        self._reported[replica] = (s.get("report"), unpack_keys(s.get("prefixes") or b""))
        current, _ = self._placed.get(replica, (set(), set()))
        self._placed[replica] = (set(), current)  # the report before last's placements drop out

    def record(self, replica: str, keys: Iterable[str]) -> None:
        """A request with these keys goes to `replica` (a re-routed request may leave its keys
        on the replica chosen first too, until two reports have come: a hint, no more)."""
        self._placed.setdefault(replica, (set(), set()))[0].update(keys)

    def depth(self, replica: str, keys: Sequence[str]) -> int:
        """1 + the index of the deepest of `keys` that `replica` holds; 0 if it holds none."""
        reported = self._reported.get(replica, (None, frozenset()))[1]
        current, before = self._placed.get(replica, (set(), set()))
        for i in range(len(keys) - 1, -1, -1):
            if keys[i] in reported or keys[i] in current or keys[i] in before:
                return i + 1
        return 0

    def forget_others(self, alive: Iterable[str]) -> None:
        keep = set(alive)
        for table in (self._reported, self._placed):
            for name in [n for n in table if n not in keep]:
                del table[name]


# ---------------------------------------------------------------------------------- ranking
@dataclass(frozen=True)
class StatelessCandidate:
    name: str
    load: int  # requests in flight (stateless_load)
    depth: int = 0  # PrefixLedger.depth of the request's keys


def stateless_load(in_flight: int | None, stats: Mapping[str, Any] | None) -> int:
    """A replica's requests in flight: its own count (`in_flight`), else, when it did not
    answer, the engine queue of its last report (running + waiting)."""
    return in_flight if in_flight is not None else int((stats or {}).get("queued", 0))


def within_slack(load: int, least: int) -> bool:
    """Whether a replica holding the prefix is not much busier than the least busy one."""
    return load <= max(least + SLACK_REQUESTS, SLACK_RATIO * least)


def rank_stateless(keys: Sequence[str], candidates: Iterable[StatelessCandidate]) -> list[str]:
    """Replica names, best first, for a stateless request with prefix `keys` (shallowest first)."""
    pool = list(candidates)
    if not pool:
        return []
    least = min(c.load for c in pool)
    tie = keys[0] if keys else ""
    warm = sorted((c for c in pool if c.depth > 0 and within_slack(c.load, least)),
                  key=lambda c: (-c.depth, c.load, rendezvous(tie, c.name)))
    chosen = {c.name for c in warm}
    rest = sorted((c for c in pool if c.name not in chosen), key=lambda c: (c.load, rendezvous(tie, c.name)))
    return [c.name for c in warm + rest]


def rendezvous(key: str, replica: str) -> bytes:
    """The tie-break weight of `replica` for `key` (lowest first): the same on every router."""
    return hashlib.blake2b(f"{key}|{replica}".encode(), digest_size=8).digest()
