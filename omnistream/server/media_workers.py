"""Images and videos decoded in worker processes, off the server's interpreter lock.

Decoding threads share the server's interpreter lock with its event loop (HTTP, SSE chunks)
and, in a thread-engine server, with the engine loop. PyAV and PIL release it while they decode,
but sampling, resizing, patchifying and hashing a clip hold it in many short stretches: with 32
streaming clients on the H200 host, a request's media took 230 ms to prepare in the server
against 81 ms for the same bytes in a quiet process, and the event loop took 39 ms to read an
image request's body (bench serve, engine in its own process). Worker processes do that work
on their own interpreters; the server keeps reading the source (base64, a verified local path),
the media cache and every limit's check that needs no decoding.

Measured (H200 host, bench serve, 32 clients, engine in its own process): with 8 workers the
media share of an image request's TTFT went from 41 to 200 ms and a video's from 231 to 239 ms,
tokens/s from 0.97x to 0.87x of in-process. So it is opt-in (ServerConfig.media_decode_processes
= 0 by default). The cause is not known yet: images (0.6 MB of rows) lost far more than videos
(4.8 MB), which speaks against the pipe that carries results back (pickled, unpickled by the
pool's management thread in the server); the one call queue that 16 waiting threads feed, or
the workers' own start (spawned beside the engine process's), are the next suspects. Measure
with tools/thread_cpu.py on the server and a per-stage timing in _decode before changing it.

A worker that dies on a file (a decoder crash on crafted bytes) fails that request with a
MediaError and the pool is started again: the server goes on. Workers are spawned (never forked
from a server with threads), import what decoding needs once, and never touch CUDA (rows are not
pinned there; the engine pins them).

    workers = MediaWorkers(processor, config, processes=8)
    items = workers.decode("video", source, options)   # blocks the calling thread, not the GIL
    workers.close()
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from omnistream.errors import MediaError
from omnistream.media.item import MediaItem
from omnistream.media.processor import MediaProcessor
from omnistream.server.media_decode import MediaDecoder

log = logging.getLogger(__name__)

AUTO_MIN_CPUS = 8  # below this many cores, auto decodes in threads (workers would compete for them)
AUTO_MAX_PROCESSES = 8


def auto_processes(configured: int | None) -> int:
    """ServerConfig.media_decode_processes: None (auto) -> half the cores, at most 8, on a
    machine of 8 cores or more; else 0 (threads)."""
    if configured is not None:
        return configured
    cpus = os.cpu_count() or 1
    return min(AUTO_MAX_PROCESSES, cpus // 2) if cpus >= AUTO_MIN_CPUS else 0


class MediaWorkers:
    def __init__(self, processor: MediaProcessor, config, processes: int) -> None:
        self._args = (processor.config, processor.model_key, config)
        self.processes = processes
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=self._args)
        for _ in range(self.processes):  # every worker imports now, not at the first request
            pool.submit(_ready)
        return pool

    def decode(self, kind: str, src, opts) -> list[MediaItem]:
        """The items of one image or video part (no audio track), decoded in a worker; raises
        what decoding raised there (MediaError, TooLarge, ...)."""
        pool = self._pool
        try:
            return pool.submit(_decode, kind, src, opts).result()
        except BrokenProcessPool:
            self._restart(pool)
            raise MediaError(f"the decoder stopped on {src.label} (a crash on its bytes)") from None

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                log.warning("a media worker died: starting the pool again")
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._start()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------- in the worker
_DECODER = None


def _init_worker(media_config, model_key, server_config) -> None:
    global _DECODER
    processor = MediaProcessor(media_config, model_key=model_key, pin_memory=False)
    _DECODER = MediaDecoder(processor, server_config)  # the same checks and decoding as the threads'


def _ready() -> bool:
    return True


def _decode(kind: str, src, opts) -> list[MediaItem]:
    if kind == "image":
        return [_DECODER.image(src, opts)]
    return _DECODER.video(src, opts)
