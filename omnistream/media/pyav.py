"""PyAV, imported on first use: decoding files needs it, frame lists and images do not (the
GPU machine has no PyAV, and its benchmarks feed generated frames)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

from omnistream.errors import MediaError


class _LazyModule:
    def __init__(self, name: str) -> None:
        self._name = name
        self._module = None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


av = _LazyModule("av")


def decoded_frames(container, stream) -> Iterator:
    """A stream's decoded frames (video or audio) in order; corrupt packets are skipped, a
    demuxer error (a truncated file) ends the stream."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError:
            return
        try:
            frames = packet.decode()
        except av.FFmpegError:
            continue
        yield from frames


def check_media_file(path: Path, kind: str) -> Path:
    """A readable, non-empty file, else a MediaError that says which (kind: "video", "audio")."""
    if path.is_dir():  # "not found" would send the user looking for a file that is there
        raise MediaError(f"{path} is a directory, not a media file")
    if not path.is_file():
        raise MediaError(f"{kind} file not found: {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"{kind} file is empty: {path}")
    return path
