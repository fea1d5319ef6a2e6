"""Images and videos decoded in worker processes (server/media_workers.py): the same items as
the threads make (pixels, grid, content hashes), the same errors with the same statuses, and a
worker that dies fails its request only: the pool starts again and the next request works."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from omnistream.errors import MediaError
from omnistream.media.processor import MediaProcessor
from omnistream.media.samples import write_sample_video
from omnistream.server.config import ServerConfig
from omnistream.server.errors import APIError
from omnistream.server.media_parts import MediaResolver
from omnistream.server.media_workers import auto_processes
from omnistream.server.openai_protocol import MediaOptions
from tests.test_server_errors import png_header


def _url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _png(seed: int, side: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side + 28, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def resolvers(tmp_path_factory):
    processor = MediaProcessor(model_key="test-model", pin_memory=False)
    config = ServerConfig()
    procs = MediaResolver(processor, config, cache_bytes=0, processes=2)
    threads = MediaResolver(processor, config, cache_bytes=0, processes=0)
    clip = write_sample_video(tmp_path_factory.mktemp("workers") / "clip.mp4", seconds=2.0, width=160, height=120)
    yield procs, threads, clip
    procs.close()
    threads.close()


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.kind == y.kind and x.grid_thw == y.grid_thw and x.patch_hashes == y.patch_hashes
        assert torch.equal(x.pixel_values, y.pixel_values)


def test_workers_make_the_items_threads_make(resolvers):
    procs, threads, clip = resolvers
    assert procs.workers is not None and threads.workers is None
    image = _url(_png(1), "image/png")
    _same(procs._load("image", image, MediaOptions(), None)[0], threads._load("image", image, MediaOptions(), None)[0])
    video = _url(clip.read_bytes(), "video/mp4")
    opts = MediaOptions(nframes=4, max_pixels=112 * 112)
    got = procs._load("video", video, opts, None)[0]
    _same(got, threads._load("video", video, opts, None)[0])
    assert got[0].kind == "video" and got[0].grid_thw[0] == 2


@pytest.mark.parametrize("data, mime, status", [
    (b"this is a text file, not a picture", "image/png", 400),
    (png_header(50_000, 50_000), "image/png", 413),
])
def test_bad_images_fail_as_in_threads(resolvers, data, mime, status):
    procs, threads, _ = resolvers
    for r in (procs, threads):
        with pytest.raises((APIError, MediaError)) as e:
            r._load("image", _url(data, mime), MediaOptions(), None)
        assert getattr(e.value, "status", 400) == status


def test_truncated_video_is_a_media_error(resolvers):
    procs, _, clip = resolvers
    with pytest.raises(MediaError):
        procs._load("video", _url(clip.read_bytes()[:2000], "video/mp4"), MediaOptions(), None)


def test_a_dead_worker_fails_one_request_and_the_pool_comes_back(resolvers):
    procs, _, _ = resolvers
    procs.workers._pool.submit(os._exit, 3)  # a decoder crash, as crafted bytes could cause
    with pytest.raises(MediaError, match="decoder stopped"):
        for seed in range(20):  # the crash reaches whichever request the broken pool serves next
            procs._load("image", _url(_png(100 + seed), "image/png"), MediaOptions(), None)
    items, _, _ = procs._load("image", _url(_png(7), "image/png"), MediaOptions(), None)
    assert items[0].kind == "image"


def test_auto_uses_processes_only_on_large_machines(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert auto_processes(None) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert auto_processes(None) == 8 and auto_processes(0) == 0 and auto_processes(3) == 3
