"""The replicas the routers of this process route to now, per Serve application: written by
SessionAffinityRouter.update_replicas (Serve's controller pushes every change of the running
set), read by ops.Fanout to reach every replica.

It lives in its own module because Serve pickles the router's module *by value* into every
process that routes (RequestRouterConfig): state kept there would be a copy per unpickling, not
one per process. The router reaches this module through its import, which pickles by name.
"""

from __future__ import annotations

import threading

_known: dict[str, tuple[str, ...]] = {}
_lock = threading.Lock()  # routers run on Serve's router event loop thread, readers elsewhere


def publish(app_name: str, names: tuple[str, ...]) -> None:
    with _lock:
        _known[app_name] = names


def known(app_name: str) -> tuple[str, ...]:
    with _lock:
        return _known.get(app_name, ())
