"""Messages between an engine process and its front-end: pickle over a pipe, tensors aside.

    wire = Wire(conn, shm_prefix="omnistream-123-0-p")
    wire.send(("add", request))          # any thread (one lock around the write)
    kind, *rest = wire.recv()            # one reader thread

CPU tensors up to SHM_MIN_BYTES travel inline as bytes (positions, logits rows). Larger ones
(media rows: an 8-frame 448x448 clip is 4.8 MB) are copied once into a file of /dev/shm and
only its name travels; the receiver maps the file (no copy) and unlinks it at once, so the
mapping lives exactly as long as the tensor. Moving them through the pipe instead would cost
a read and a copy per 64 KB chunk, each taking the receiver's interpreter lock: in the engine
process, time the loop does not launch steps. A file whose message never arrived (the
receiver died) is removed by `remove_leftovers` (the front-end calls it for both directions).
"""

from __future__ import annotations

import copyreg
import glob
import io
import itertools
import logging
import os
import pickle
import queue
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

SHM_MIN_BYTES = 64 << 10
_SHM_DIR = "/dev/shm"


class Wire:
    def __init__(self, conn: Connection, shm_prefix: str) -> None:
        self.conn = conn
        self.shm_prefix = shm_prefix  # files of tensors this end sends: <dir>/<prefix>-<n>
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._shm = os.path.isdir(_SHM_DIR) and os.access(_SHM_DIR, os.W_OK)

    def send(self, obj: Any) -> None:
        """Pickles (off the lock: big tensors are copied out here) and writes one message.
        Raises OSError / EOFError when the other end is gone."""
        data = self.encode(obj)
        with self._lock:
            self.conn.send_bytes(data)

    def write(self, data: bytes) -> None:
        """Writes one message encoded by encode()."""
        with self._lock:
            self.conn.send_bytes(data)

    def recv(self) -> Any:
        """The next message (blocks; EOFError when the other end closed or died)."""
        return pickle.loads(self.conn.recv_bytes())

    def encode(self, obj: Any) -> bytes:
        buf = io.BytesIO()
        p = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        p.dispatch_table = copyreg.dispatch_table.copy()
        p.dispatch_table[torch.Tensor] = self._reduce_tensor
        p.dump(obj)
        return buf.getvalue()

    def _reduce_tensor(self, t: torch.Tensor):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        flat = t.contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        if nbytes == 0:
            return _empty_tensor, (t.dtype, tuple(t.shape))
        raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
        if self._shm and nbytes >= SHM_MIN_BYTES:
            path = f"{_SHM_DIR}/{self.shm_prefix}-{next(self._names)}"
            dst = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            dst.copy_(raw)
            del dst  # unmapped here; the file stays until the receiver maps and unlinks it
            return _shm_tensor, (path, t.dtype, tuple(t.shape), nbytes)
        return _inline_tensor, (raw.numpy().tobytes(), t.dtype, tuple(t.shape))


class OrderedSender:
    """Messages in the order they are posted, the heavy ones encoded off the caller's thread.

    Copying a clip's rows into shared memory takes milliseconds (4.8 MB: 1-10 ms, page faults
    included): in a server's event loop that is every other client's time. A heavy message
    (`post(..., heavy=True)`) is encoded and written by a sender thread; a light one is written
    at once by the caller, unless heavy ones are still pending, then it queues behind them. One
    lock orders the writes, so what is posted later is never written earlier."""

    def __init__(self, wire: Wire, name: str) -> None:
        self.wire = wire
        self._order = threading.Lock()  # held while a message is written, and to count pending
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # posted to the thread, not yet written
        self._broken = False  # a write failed: the other end is gone (its reader notices too)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, msg: Any, heavy: bool = False, on_error: Callable[[Exception], None] | None = None) -> None:
        """Sends `msg`; a message that cannot be encoded calls on_error(e) (else it is logged).
        A broken pipe is not an error here: the reader of the other end's messages sees it."""
        with self._order:
            if heavy or self._pending:
                self._pending += 1
                self._queue.put((msg, on_error))
                return
            data = self._encode(msg, on_error)
            if data is not None:
                self._write(data)

    def stop(self, timeout: float) -> None:
        """After every message posted so far is written: the thread ends."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            msg, on_error = item
            data = self._encode(msg, on_error)
            with self._order:
                self._pending -= 1
                if data is not None:
                    self._write(data)

    def _encode(self, msg: Any, on_error: Callable[[Exception], None] | None) -> bytes | None:
        try:
            return self.wire.encode(msg)
        except Exception as e:  # noqa: BLE001 - that message fails, the others go on
            if on_error is None:
                log.exception("a message could not be encoded")
            else:
                on_error(e)
            return None

    def _write(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            self.wire.write(data)
        except (OSError, EOFError, ValueError):
            self._broken = True


def _empty_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _from_bytes(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return raw.to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


def _inline_tensor(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return _from_bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8), dtype, shape)


def _shm_tensor(path: str, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
    raw = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    os.unlink(path)  # the mapping stays valid; the memory goes with the last tensor using it
    return _from_bytes(raw, dtype, shape)


def remove_leftovers(prefix: str) -> int:
    """Removes the tensor files of `prefix` whose messages were never read; how many."""
    n = 0
    for path in glob.glob(f"{_SHM_DIR}/{glob.escape(prefix)}-*"):
        try:
            os.unlink(path)
            n += 1
        except FileNotFoundError:
            pass
    return n
