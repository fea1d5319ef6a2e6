"""bench serve's HTTP phase: each work item sent to `omnistream serve` as a client would
(streaming chat completions through aiohttp, sessions over their routes, live streams over
/v1/realtime with the `websockets` client), timed into its Samples.

The client is aiohttp, not httpx: with 32 streaming clients on the H200 host, httpx took 50-90 ms
(median) from a request's send to the server's handler starting while the server's event loop
lagged under 3 ms at p99 (its pool's bookkeeping on one event loop; httpx issue #3215), which the
report counted as the server's overhead. A request's JSON is serialised before its clock starts
(as the in-process phase hands its already-built messages over).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Awaitable

from omnistream.bench.serve_workload import Sample, Spec, Workload, drive_live, fail_rest, run_schedule, samples_for

JSON = {"Content-Type": "application/json"}


# ---------------------------------------------------------------------------------- HTTP clients
def _chat_payload(model: str, messages: list[dict], max_tokens: int) -> dict:
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def _stream_chat(client, payload: dict, s: Sample, headers: dict | None = None) -> Sample:
    body = json.dumps(payload).encode()
    s.sent = time.perf_counter()
    try:
        async with client.post("/v1/chat/completions", data=body, headers={**JSON, **(headers or {})}) as r:
            if r.status != 200:
                await r.read()
                s.error = str(r.status)
                s.ended = time.perf_counter()
                return s
            async for raw in r.content:  # one SSE line at a time
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                _take_chunk(s, json.loads(data))
    except Exception as e:  # noqa: BLE001 - counted, the run goes on
        s.error = type(e).__name__
    s.ended = time.perf_counter()
    return s


def _take_chunk(s: Sample, chunk: dict) -> None:
    if "error" in chunk:  # an error after the first byte (the status was 200 by then)
        s.error = str((chunk["error"] or {}).get("code") or "stream_error")
        return
    usage = chunk.get("usage")
    if chunk.get("metrics"):
        s.server = chunk["metrics"]
    if usage:
        s.output_tokens = usage.get("completion_tokens", 0)
        s.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            s.chunk_times.append(time.perf_counter())
            s.text += content


async def http_request(client, model: str, spec: Spec, max_tokens: int) -> list[Sample]:
    [s] = samples_for(spec)
    return [await _stream_chat(client, _chat_payload(model, spec.openai_messages, max_tokens), s)]


async def http_session(client, model: str, spec: Spec, max_tokens: int) -> list[Sample]:
    """POST /v1/sessions, its media, then each question with X-Session-Id (streaming); deleted at the end."""
    plan, samples = spec.session, samples_for(spec)
    try:
        async with client.post("/v1/sessions", json={"system": plan.system}) as r:
            if r.status != 200:
                return fail_rest(samples, f"open:{r.status}")
            sid = (await r.json())["id"]
        try:
            async with client.post(f"/v1/sessions/{sid}/media", json=plan.http_media) as r:
                if r.status != 200:
                    return fail_rest(samples, f"media:{r.status}")
            for s, question in zip(samples, plan.questions):
                payload = _chat_payload(model, [{"role": "user", "content": question}], max_tokens)
                await _stream_chat(client, payload, s, headers={"X-Session-Id": sid})
        finally:
            async with client.delete(f"/v1/sessions/{sid}"):
                pass
    except Exception as e:  # noqa: BLE001
        return fail_rest(samples, type(e).__name__)
    return samples


def _question_events(text: str, max_tokens: int) -> list[dict]:
    return [{"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                         "content": [{"type": "input_text", "text": text}]}},
            {"type": "response.create", "response": {"max_output_tokens": max_tokens, "temperature": 0}}]


async def http_live(url: str, model: str, spec: Spec, max_tokens: int) -> list[Sample]:
    """One /v1/realtime socket: session.update (frame size, policy), the live script; a reader
    task times each answer's deltas and ends it at response.done (or its error)."""
    from websockets.asyncio.client import connect

    plan, samples = spec.live, samples_for(spec)
    waiting: dict[int, asyncio.Event] = {}
    current = [0]  # the question being answered

    async def read(ws) -> None:
        async for message in ws:
            event = json.loads(message)
            if current[0] >= len(samples):
                continue  # after the last answer (a late error event): nothing to time
            kind, s = event.get("type"), samples[current[0]]
            if kind == "response.output_text.delta":
                s.chunk_times.append(time.perf_counter())
                s.text += event["delta"]
            elif kind == "error":
                s.error = s.error or str(event["error"].get("code"))  # a bad frame or question: counted
            elif kind == "response.done":
                resp = event["response"]
                s.ended = time.perf_counter()
                usage = resp.get("usage") or {}
                s.output_tokens = usage.get("output_tokens", 0)
                s.cached_tokens = (usage.get("input_token_details") or {}).get("cached_tokens") or 0
                if resp.get("status") not in ("completed", "incomplete"):
                    s.error = s.error or f"done:{resp.get('status')}"
                elif resp.get("output_text") != s.text:
                    s.error = s.error or "deltas_differ"
                current[0] += 1
                waiting.pop(current[0] - 1).set()

    try:
        async with connect(url.replace("http://", "ws://") + f"/v1/realtime?model={model}", max_size=None) as ws:
            first = json.loads(await ws.recv())
            if first.get("type") != "session.created":
                return fail_rest(samples, f"first:{first.get('type')}")
            await ws.send(json.dumps({"type": "session.update", "session": {
                "max_pixels": plan.pixels, "min_pixels": plan.pixels, "policy": plan.policy}}))
            updated = json.loads(await ws.recv())
            if updated.get("type") != "session.updated":
                return fail_rest(samples, f"update:{(updated.get('error') or {}).get('code', updated.get('type'))}")
            reader = asyncio.get_running_loop().create_task(read(ws))

            async def add_frame(i: int) -> None:
                await ws.send(json.dumps({"type": "input_image_buffer.append", "image": base64.b64encode(plan.frames[i]).decode(),
                                          "timestamp_ms": plan.timestamp_ms(i)}))

            async def ask(k: int, done: asyncio.Event) -> None:
                waiting[k] = done
                for event in _question_events(plan.questions[k], max_tokens):
                    await ws.send(json.dumps(event))

            try:
                script = asyncio.get_running_loop().create_task(drive_live(plan, samples, add_frame, ask))
                await asyncio.wait([script, reader], return_when=asyncio.FIRST_COMPLETED)
                if not script.done():  # the socket ended before the answers
                    script.cancel()
                    return fail_rest(samples, "socket_closed")
                script.result()
            finally:
                reader.cancel()
    except Exception as e:  # noqa: BLE001
        return fail_rest(samples, type(e).__name__)
    return samples


async def http_phase(url: str, model: str, w: Workload, max_tokens: int) -> tuple[list[Sample], float, float]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=len(w.specs) + 8)
    timeout = aiohttp.ClientTimeout(total=600.0)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as client:
        def send(spec: Spec) -> Awaitable[list[Sample]]:
            if spec.session is not None:
                return http_session(client, model, spec, max_tokens)
            if spec.live is not None:
                return http_live(url, model, spec, max_tokens)
            return http_request(client, model, spec, max_tokens)

        return await run_schedule(send, w)
