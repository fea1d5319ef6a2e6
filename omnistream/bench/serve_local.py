"""bench serve's in-process phase: the same work items, in the same schedule, sent to an engine
built here (engine.submit, sessions, live sessions), media decoded in threads as the server
does, timed into the same Samples.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable

from omnistream.bench.serve_workload import Sample, Spec, Workload, drive_live, fail_rest, run_schedule, samples_for
from omnistream.server.config import ServerConfig


# ---------------------------------------------------------------------------------- in-process
async def _read_answer(s: Sample, answer) -> None:
    """A PendingAnswer's deltas (timed), then its commit into the session's history."""
    async for delta in answer.handle:
        if delta.text:
            s.chunk_times.append(time.perf_counter())
            s.text += delta.text
    res = await asyncio.get_running_loop().run_in_executor(None, answer.finish)
    s.output_tokens, s.cached_tokens, s.server = len(res.token_ids), res.metrics.cached_tokens, res.metrics.as_dict()
    s.ended = time.perf_counter()


async def engine_request(engine, pool: ThreadPoolExecutor, spec: Spec, sampling) -> list[Sample]:
    [s] = samples_for(spec)
    s.sent = time.perf_counter()
    try:
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(pool, engine.request_for, spec.engine_messages, sampling)
        handle = engine.submit(request)
        async for delta in handle:
            if delta.text:
                s.chunk_times.append(time.perf_counter())
                s.text += delta.text
        res = handle.result()
        s.output_tokens, s.cached_tokens, s.server = len(res.token_ids), res.metrics.cached_tokens, res.metrics.as_dict()
    except Exception as e:  # noqa: BLE001
        s.error = type(e).__name__
    s.ended = time.perf_counter()
    return [s]


async def engine_session(engine, pool: ThreadPoolExecutor, spec: Spec, sampling) -> list[Sample]:
    """engine.session(), its image (decoded in the media pool), then Session.start per question
    (in the loop's default executor, as the server runs it), the answer read as it streams."""
    plan, samples = spec.session, samples_for(spec)
    loop = asyncio.get_running_loop()
    session = engine.session(system=plan.system)
    try:
        media = dict(plan.engine_media)
        await loop.run_in_executor(pool, lambda: session.add_image(media.pop("src"), **media))
        for s, question in zip(samples, plan.questions):
            s.sent = time.perf_counter()
            try:
                answer = await loop.run_in_executor(None, session.start, question, sampling)
                await _read_answer(s, answer)
            except Exception as e:  # noqa: BLE001
                s.error, s.ended = type(e).__name__, time.perf_counter()
    except Exception as e:  # noqa: BLE001
        fail_rest(samples, type(e).__name__)
    finally:
        await loop.run_in_executor(None, session.close)
    return samples


async def engine_live(engine, pool: ThreadPoolExecutor, spec: Spec, max_tokens: int, max_image_pixels: int) -> list[Sample]:
    """engine.live_session() with the socket's settings; each frame's JPEG decoded in the media
    pool then add_frame, in order; LiveSession.start per question (before the next frames are
    added, as the server's intake does), its answer streaming in its own task."""
    from omnistream.engine.sampling import SamplingParams
    from omnistream.media.frame_memory import FrameMemoryConfig
    from omnistream.server.realtime_events import decode_frame

    plan, samples = spec.live, samples_for(spec)
    loop = asyncio.get_running_loop()
    sampling = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_tokens)  # what response.create gives
    live = await loop.run_in_executor(None, lambda: engine.live_session(
        memory=FrameMemoryConfig(), policy=plan.policy, max_pixels=plan.pixels, min_pixels=plan.pixels))
    tasks: list[asyncio.Task] = []

    async def add_frame(i: int) -> None:
        await loop.run_in_executor(pool, lambda: live.add_frame(decode_frame(plan.frames[i], max_image_pixels),
                                                                plan.timestamp_ms(i) / 1000.0))

    async def ask(k: int, done: asyncio.Event) -> None:
        s = samples[k]

        async def stream(answer) -> None:
            try:
                await _read_answer(s, answer)
            except Exception as e:  # noqa: BLE001
                s.error, s.ended = type(e).__name__, time.perf_counter()
            finally:
                done.set()

        try:
            answer = await loop.run_in_executor(None, live.start, plan.questions[k], sampling)
        except Exception as e:  # noqa: BLE001
            s.error, s.ended = type(e).__name__, time.perf_counter()
            done.set()
            return
        tasks.append(loop.create_task(stream(answer)))

    try:
        await drive_live(plan, samples, add_frame, ask)
    except Exception as e:  # noqa: BLE001
        fail_rest(samples, type(e).__name__)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.run_in_executor(None, live.close)
    return samples


async def engine_phase(engine, w: Workload, sampling) -> tuple[list[Sample], float, float]:
    # as many media decodes at once as the server runs (ServerConfig.media_decode_threads): the same work, the same way
    config = ServerConfig()
    with ThreadPoolExecutor(max_workers=config.media_decode_threads, thread_name_prefix="bench-media") as pool:
        def send(spec: Spec) -> Awaitable[list[Sample]]:
            if spec.session is not None:
                return engine_session(engine, pool, spec, sampling)
            if spec.live is not None:
                return engine_live(engine, pool, spec, sampling.max_new_tokens, config.max_image_pixels)
            return engine_request(engine, pool, spec, sampling)

        return await run_schedule(send, w)
