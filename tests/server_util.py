"""Serve an ASGI app on loopback from a background thread, for tests.

    with serve(build_app(engine, config)) as base_url:     # "http://127.0.0.1:<free port>"
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x")

The real uvicorn server (HTTP parsing, disconnects, WebSockets) on port 0 (the OS picks a free
port); leaving the block stops it and joins its thread. Module-scoped fixtures keep one server
per test module.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn


@contextmanager
def serve(app, *, timeout_s: float = 30.0, **uvicorn_options) -> Iterator[str]:
    options = {"log_level": "warning", "access_log": False, "lifespan": "on", **uvicorn_options}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, **options))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
