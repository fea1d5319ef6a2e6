"""The replicas the routers of this process route to now, per Serve application, and which of
them report draining: written by SessionAffinityRouter.update_replicas (Serve's controller
pushes every change of the running set and of their routing stats), read by ops.Fanout to
reach every replica and by drain.py to know when the routers have seen a drain.

It lives in its own module because Serve pickles the router's module *by value* into every
process that routes (RequestRouterConfig): state kept there would be a copy per unpickling, not
one per process. The router reaches this module through its import, which pickles by name.
"""

from __future__ import annotations

import threading

_known: dict[str, tuple[str, ...]] = {}
_draining: dict[str, frozenset[str]] = {}
_lock = threading.Lock()  # routers run on Serve's router event loop thread, readers elsewhere


def publish(app_name: str, names: tuple[str, ...], draining: frozenset[str] = frozenset()) -> None:
    with _lock:
        _known[app_name], _draining[app_name] = names, draining


def known(app_name: str) -> tuple[str, ...]:
    with _lock:
        return _known.get(app_name, ())


def draining(app_name: str) -> frozenset[str]:
    with _lock:
        return _draining.get(app_name, frozenset())
