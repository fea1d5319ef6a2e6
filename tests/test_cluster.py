"""omnistream serve --replicas: two demo-model replicas under Ray Serve on a local Ray cluster
that this module starts on 127.0.0.1 and stops (no Ray process left behind), with Serve's HTTP
proxy on 127.0.0.1 and a free port. Sessions spread over both replicas and every later request
of a session lands on its replica; answers equal the single-process server's; a restarted
proxy (a new router) keeps the placement; a drained replica takes no new sessions or stateless
requests while its sessions and running requests go on; a killed replica's sessions get 410
session_lost (its live socket an `error` event naming the session, then close 1011) while the
other's go on, new sessions are served and Serve replaces the replica. Stateless requests go
where their prompt prefix was served (and find it cached), different prefixes spread.

The first tests need no Ray: they check the placement logic (placement.py), the drain status
and the proxy's lost-socket middleware (ingress.py) on their own (tests/test_cluster_prefix.py
does the same for prefix affinity).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import socket
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import websocket
from PIL import Image

from omnistream.cluster.placement import (
    REPLICA_HEADER,
    Kind,
    PlacementLedger,
    ReplicaLoad,
    rank_for_sessions,
    replica_of,
    route_of_key,
    route_of_scope,
    session_id_prefix,
    target_key,
)
from omnistream.cluster.drain import drain_status
from omnistream.cluster.ingress import LostSocketMiddleware
from omnistream.server.config import ServerConfig

KEY = "cluster-key"
SYSTEM = "You look at pictures."
HAVE_RAY = importlib.util.find_spec("ray") is not None  # not imported: local.py sets Ray's env first


# ---------------------------------------------------------------------------------- placement (no Ray)
def scope(path: str, method: str = "GET", kind: str = "http", session: str | None = None) -> dict:
    headers = [(b"x-session-id", session.encode())] if session else []
    return {"type": kind, "path": path, "method": method, "headers": headers, "root_path": ""}


def test_session_ids_name_their_replica():
    prefix = session_id_prefix("k3x9q2ab")
    assert prefix == "s-k3x9q2ab-"
    assert replica_of(prefix + "5f0c1d2e3a4b") == "k3x9q2ab"
    for not_ours in ("s-5f0c1d2e3a4b", "sess_0123", "", None, "s-a-b-c", "s-k3x9q2ab-XYZ"):
        assert replica_of(not_ours) is None, not_ours
    with pytest.raises(ValueError):
        session_id_prefix("a-b")  # a dash would make the id ambiguous


def test_routes_of_requests():
    sid = "s-k3x9q2ab-5f0c1d2e3a4b"
    assert route_of_scope(scope("/v1/sessions", "POST")).kind is Kind.OPEN
    assert route_of_scope(scope("/v1/realtime", kind="websocket")).kind is Kind.OPEN
    for path, method in ((f"/v1/sessions/{sid}", "GET"), (f"/v1/sessions/{sid}", "DELETE"),
                         (f"/v1/sessions/{sid}/media", "POST"), (f"/v1/sessions/{sid}/fork", "POST")):
        r = route_of_scope(scope(path, method))
        assert (r.kind, r.replica, r.session_id) == (Kind.SESSION, "k3x9q2ab", sid), path
    chat = route_of_scope(scope("/v1/chat/completions", "POST", session=sid))
    assert (chat.kind, chat.replica) == (Kind.SESSION, "k3x9q2ab")
    assert route_of_scope(scope("/v1/chat/completions", "POST")).kind is Kind.STATELESS
    assert route_of_scope(scope("/v1/sessions", "GET")).kind is Kind.STATELESS
    assert route_of_scope(scope("/metrics")).kind is Kind.STATELESS
    foreign = route_of_scope(scope("/v1/chat/completions", "POST", session="my-own-id"))
    assert (foreign.kind, foreign.replica) == (Kind.SESSION, None)  # names no replica: any one answers 404
    assert route_of_key(target_key("k3x9q2ab")).replica == "k3x9q2ab"
    assert route_of_key(target_key("k3x9q2ab")).kind is Kind.TARGET


def test_sessions_go_to_the_least_loaded_replica():
    stats = {"max_sessions": 10, "kv_total": 100}
    a = ReplicaLoad.from_stats("a", {**stats, "sessions": 3, "kv_used": 10})
    b = ReplicaLoad.from_stats("b", {**stats, "sessions": 3, "kv_used": 60})  # same sessions, more KV
    c = ReplicaLoad.from_stats("c", {**stats, "sessions": 1, "kv_used": 10})
    assert rank_for_sessions([a, b, c]) == ["c", "a", "b"]
    # placements since the last report count as sessions
    assert rank_for_sessions([a, ReplicaLoad.from_stats("c", {**stats, "sessions": 1, "kv_used": 10}, placed=3)]) == ["a", "c"]


def test_ledger_counts_placements_until_the_next_report():
    ledger = PlacementLedger()
    ledger.observe_report("a", 1)
    ledger.record("a", "req-1")
    ledger.record("a", "req-1")  # the same request routed again counts once
    ledger.record("a", "req-2")
    assert ledger.placed("a") == 2
    ledger.record("b", "req-2")  # re-routed elsewhere: moves
    assert (ledger.placed("a"), ledger.placed("b")) == (1, 1)
    ledger.observe_report("a", 1)  # the same report again: nothing new in it
    assert ledger.placed("a") == 1
    ledger.observe_report("a", 2)  # a new report includes the placements
    assert ledger.placed("a") == 0
    ledger.forget_others(["a"])
    assert ledger.placed("b") == 0


def test_drain_status():
    assert drain_status(False, 3, 1) == "running"
    assert drain_status(True, 1, 0) == "draining" and drain_status(True, 0, 1) == "draining"
    assert drain_status(True, 0, 0) == "drained"  # nothing left on it: it can go


def relay(replica_app, client: list[dict]) -> list[dict]:
    """What the client gets of a /v1/realtime socket through LostSocketMiddleware."""
    sent, incoming = [], list(client)

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)

    async def send(msg):
        sent.append(msg)

    asyncio.run(LostSocketMiddleware(replica_app)(scope("/v1/realtime", kind="websocket"), receive, send))
    return sent


def dying_replica(then: str):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept", "headers": [(REPLICA_HEADER.encode(), b"k3x9q2ab")]})
        await send({"type": "websocket.send", "text": json.dumps({"type": "session.created",
                                                                  "session": {"id": "s-k3x9q2ab-00ff"}})})
        if then == "dies":
            raise RuntimeError("ActorDiedError")  # what the proxy's relay raises (or it returns: "drops")
        if then == "closes":
            await send({"type": "websocket.close", "code": 1000})
        if then == "client_left":
            assert (await receive())["type"] == "websocket.disconnect"
    return app


def test_proxy_tells_a_live_socket_its_replica_died():
    for then in ("dies", "drops"):
        sent = relay(dying_replica(then), [{"type": "websocket.connect"}])
        *_, event, close = sent
        err = json.loads(event["text"])["error"]
        assert err["code"] == "session_lost" and "s-k3x9q2ab-00ff" in err["message"] and "k3x9q2ab" in err["message"]
        assert (close["type"], close["code"], close["reason"]) == ("websocket.close", 1011, "session_lost")
    # a socket the replica closed, or the client left, gets nothing more
    assert relay(dying_replica("closes"), [{"type": "websocket.connect"}])[-1] == {"type": "websocket.close", "code": 1000}
    left = relay(dying_replica("client_left"), [{"type": "websocket.connect"}, {"type": "websocket.disconnect"}])
    assert [m["type"] for m in left] == ["websocket.accept", "websocket.send"]


# ---------------------------------------------------------------------------------- the cluster
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """(url, LocalRay): 2 replicas of the demo model, 1 CPU each, on a loopback Ray cluster."""
    if not HAVE_RAY:
        pytest.skip("Ray Serve is not installed (pip install 'omnistream[cluster]')")
    # the controller replaces a dead proxy after its health checks fail: check every second
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", "1")
    from omnistream.cluster.local import LocalRay, node_address, start_serve

    local = LocalRay(num_cpus=2, object_store_memory=256 << 20)  # small: nothing big travels through it
    with local:
        from ray import serve

        from omnistream.cluster.deploy import application
        from omnistream.cluster.spec import APP_NAME, ClusterSpec, ReplicaSpec

        assert node_address() == "127.0.0.1"
        assert any(n.startswith("session_") for n in os.listdir(local.temp_dir))  # its own folder, not /tmp/ray
        port = free_port()
        start_serve("127.0.0.1", port)
        spec = ReplicaSpec(model="demo", server=ServerConfig(api_key=KEY))
        serve.run(application(spec, ClusterSpec(replicas=2, replica_cpus=1, port=port, health_check_period_s=1)),
                  name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}", local
    assert local.pids == set(), f"Ray processes left behind: {sorted(local.pids)}"
    assert not os.path.exists(local.temp_dir), "the cluster's session folder was left behind"


@pytest.fixture(scope="module")
def single():
    """The single-process server of the same model and config (the reference answers)."""
    from omnistream.entrypoints.api import Engine
    from omnistream.server.app import build_app
    from tests.server_util import serve

    engine = Engine.from_pretrained("demo")
    try:
        with serve(build_app(engine, ServerConfig(api_key=KEY))) as url:
            yield url
    finally:
        engine.close()


def http(url: str, key: str | None = KEY) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)


def oa(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def new_session(url: str) -> tuple[str, str]:
    """(session id, the replica that answered)."""
    r = http(url).post("/v1/sessions", json={"system": SYSTEM})
    assert r.status_code == 200, r.text
    return r.json()["id"], r.headers[REPLICA_HEADER]


def turn(url: str, sid: str, content, max_tokens: int = 4) -> httpx.Response:
    body = {"model": "demo-model", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    return http(url).post("/v1/chat/completions", json=body, headers={"X-Session-Id": sid})


def replicas(url: str) -> dict[str, dict]:
    r = http(url).get("/v1/replicas")
    assert r.status_code == 200, r.text
    return {d["replica"]: d for d in r.json()["data"]}


def png_part(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}


@pytest.fixture(scope="module")
def spread(cluster):
    """20 sessions opened on the cluster: {session id: replica that opened it}."""
    url, _ = cluster
    return dict(new_session(url) for _ in range(20))


def test_sessions_spread_and_every_follow_up_lands_on_its_replica(cluster, spread):
    url, _ = cluster
    for sid, replica in spread.items():
        assert replica_of(sid) == replica  # the id names the replica that holds it
    per_replica = {r: sum(1 for v in spread.values() if v == r) for r in set(spread.values())}
    assert len(per_replica) == 2 and min(per_replica.values()) >= 7, per_replica

    def follow_ups(sid: str) -> list[str]:
        served = []
        for i in range(2):
            r = turn(url, sid, f"question {i}")
            assert r.status_code == 200, r.text
            served.append(r.headers[REPLICA_HEADER])
        r = http(url).get(f"/v1/sessions/{sid}")
        assert r.status_code == 200 and r.json()["turns"] == 2, r.text
        return served + [r.headers[REPLICA_HEADER]]

    with ThreadPoolExecutor(8) as pool:
        served = dict(zip(spread, pool.map(follow_ups, spread)))
    for sid, where in served.items():
        assert where == [spread[sid]] * 3, (sid, where)
    # and the replicas say so: each lists its own sessions, each served 3 times there
    listed = replicas(url)
    assert set(listed) == set(per_replica)
    for name, entry in listed.items():
        mine = {s["id"]: s["requests"] for s in entry["sessions"] if s["id"] in spread}
        assert set(mine) == {sid for sid, r in spread.items() if r == name}
        assert set(mine.values()) == {3}, mine
        assert entry["open_sessions"] >= len(mine) and entry["kv_blocks_total"] > 0


def test_answers_equal_the_single_process_server(cluster, single):
    url, _ = cluster
    messages = [{"role": "user", "content": [png_part(1), {"type": "text", "text": "What is in the picture?"}]}]
    kw = dict(model="demo-model", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    want = oa(single).chat.completions.create(**kw).choices[0].message.content
    assert oa(url).chat.completions.create(**kw).choices[0].message.content == want
    chunks = oa(url).chat.completions.create(stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    # a session: an image turn, then a text follow-up
    answers = {}
    for name, base in (("single", single), ("cluster", url)):
        r = http(base).post("/v1/sessions", json={"system": SYSTEM})
        sid = r.json()["id"]
        first = turn(base, sid, [png_part(2), {"type": "text", "text": "Describe it."}], max_tokens=6)
        second = turn(base, sid, "And the colours?", max_tokens=6)
        answers[name] = [x.json()["choices"][0]["message"]["content"] for x in (first, second)]
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the history stayed on its replica
    assert answers["cluster"] == answers["single"]


class LiveClient:
    """A /v1/realtime socket (websocket-client): frames, one question, its answer."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url.replace("http", "ws") + "/v1/realtime",
                                              header=[f"Authorization: Bearer {KEY}"], timeout=60)
        self.replica = (self.ws.getheaders() or {}).get(REPLICA_HEADER)
        created = json.loads(self.ws.recv())
        assert created["type"] == "session.created", created
        self.session_id = created["session"]["id"]

    def send(self, type_: str, **fields) -> None:
        self.ws.send(json.dumps({"type": type_, **fields}))

    def ask(self, frames: int, question: str) -> str:
        self.send("session.update", session={"max_pixels": 56 * 56, "star_size": 4, "stream_size": 4})
        for i in range(frames):
            part = png_part(10 + i)["image_url"]["url"].partition(",")[2]
            self.send("input_image_buffer.append", image=part, timestamp_ms=500 * i)
        self.send("conversation.item.create", item={"type": "message", "role": "user",
                                                    "content": [{"type": "input_text", "text": question}]})
        self.send("response.create", response={"max_output_tokens": 6})
        while True:
            ev = json.loads(self.ws.recv())
            assert ev["type"] != "error", ev
            if ev["type"] == "response.done":
                return ev["response"]["output_text"]

    def close(self) -> None:
        self.ws.close()


def test_live_socket_lives_on_one_replica_and_answers_as_the_single_server(cluster, single):
    url, _ = cluster
    ref = LiveClient(single)
    want = ref.ask(3, "What changed?")
    ref.close()
    live = LiveClient(url)
    try:
        assert live.ask(3, "What changed?") == want
        listed = replicas(url)
        assert live.replica in listed
        holders = [name for name, e in listed.items() if any(s["id"] == live.session_id for s in e["sessions"])]
        assert holders == [live.replica]
        assert listed[live.replica]["live_sessions"] == 1
    finally:
        live.close()


def test_metrics_are_aggregated_with_a_replica_label(cluster, spread):
    url, _ = cluster
    assert http(url, key=None).get("/metrics").status_code == 401  # the API key guards it, as on one server
    assert http(url, key=None).get("/v1/replicas").status_code == 401
    text = http(url).get("/metrics").text
    names = set(spread.values())
    for name in names:
        assert f'omnistream_open_sessions{{replica="{name}"}}' in text
        assert f'omnistream_kv_blocks_used{{replica="{name}"}}' in text
    assert 'omnistream_cluster_replicas{state="answered"} 2.0' in text


def test_unknown_sessions_are_404_and_sessions_of_a_gone_replica_410(cluster, spread):
    url, _ = cluster
    alive = next(iter(spread.values()))
    r = turn(url, f"s-{alive}-0123456789ab", "hello")  # a live replica's id it does not hold
    assert (r.status_code, r.json()["error"]["code"]) == (404, "session_not_found")
    assert http(url).get("/v1/sessions/not-a-cluster-id").status_code == 404
    gone = "s-gone0000-0123456789ab"
    for r in (turn(url, gone, "hello"), http(url).get(f"/v1/sessions/{gone}"), http(url).delete(f"/v1/sessions/{gone}")):
        assert r.status_code == 410, r.text
        err = r.json()["error"]
        assert err["code"] == "session_lost" and gone in err["message"] and "gone0000" in err["message"]


def test_serve_config_builder_takes_typed_args(cluster):
    """omnistream.cluster.deploy:build, the import_path of a Serve config file."""
    import pydantic

    from omnistream.cluster.deploy import build

    app = build({"model": "demo", "replicas": 3, "replica_gpus": 0.5, "server": {"max_sessions": 8},
                 "engine": {"kv_cache_tokens": 4096}, "sampling": {"temperature": 0.0}})
    deployment = app._bound_deployment  # what serve.run would deploy
    assert deployment.num_replicas == 3 and deployment.ray_actor_options["num_gpus"] == 0.5
    replica, spec = deployment.init_args
    assert replica.server.max_sessions == 8 and replica.engine_options == {"kv_cache_tokens": 4096}
    assert deployment.max_ongoing_requests == spec.ongoing_limit(replica.server)
    with pytest.raises(pydantic.ValidationError):
        build({"model": "demo", "replica": 2})  # a typo is refused, not ignored


# ---------------------------------------------------------------------------------- prefix affinity
LONG_SYSTEM = "You are a careful assistant who describes pictures in detail, colour by colour. " * 8


def stateless(url: str, messages: list[dict], max_tokens: int = 2, **fields) -> httpx.Response:
    """A chat completion without a session, sent as exactly the bytes `stateless_body` makes."""
    return http(url).post("/v1/chat/completions", content=stateless_body(messages, max_tokens, **fields),
                          headers={"Content-Type": "application/json"})


def stateless_body(messages: list[dict], max_tokens: int = 2, **fields) -> bytes:
    return json.dumps({"model": "demo-model", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, **fields}).encode()


def cached_tokens(r: httpx.Response) -> int:
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def reported_prefixes(replica: str) -> frozenset[str]:
    """The prefix keys in `replica`'s routing stats (asked of it directly)."""
    from ray import serve

    from omnistream.cluster.prefix_affinity import unpack_keys
    from omnistream.cluster.spec import APP_NAME, DEPLOYMENT_NAME

    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    stats = handle.options(method_name="record_routing_stats", session_id=target_key(replica)).remote().result()
    return unpack_keys(stats["prefixes"])


def test_stateless_requests_go_where_their_prefix_is_cached(cluster, spread):
    """Questions about one image under one long system prompt all land on the replica that
    served it first, even while it is busier than the other (within the slack), and find the
    prefix there (cached tokens); that replica reports the prefix keys, the other does not."""
    from omnistream.cluster.prefix_keys import prefix_keys

    url, _ = cluster
    prefix = [{"role": "system", "content": LONG_SYSTEM}]

    def ask(question: str) -> list[dict]:
        return prefix + [{"role": "user", "content": [png_part(5), {"type": "text", "text": question}]}]

    first = stateless(url, ask("Describe it."))
    assert first.status_code == 200, first.text
    home = first.headers[REPLICA_HEADER]
    (other,) = set(spread.values()) - {home}
    # a long answer keeps `home` busier than `other` while the follow-ups are routed
    body = stateless_body(ask("Tell me a long story about it."), 400, stream=True)
    with http(url).stream("POST", "/v1/chat/completions", content=body,
                          headers={"Content-Type": "application/json"}) as busy:
        assert busy.headers[REPLICA_HEADER] == home
        lines = (line for line in busy.iter_lines() if line.startswith("data: "))
        next(lines)  # running there: `home` has a request in flight, `other` none
        for question in ("What colour is it?", "Is it square?", "How many shapes?"):
            r = stateless(url, ask(question))
            assert r.headers[REPLICA_HEADER] == home and cached_tokens(r) > 0, (question, r.headers[REPLICA_HEADER])
        assert next(lines) != "data: [DONE]"  # it was still running: `home` was the busier replica throughout
    keys = set(prefix_keys(stateless_body(ask("Is it square?")), f"Bearer {KEY}"))
    assert len(keys) == 3 and keys <= reported_prefixes(home), keys  # system prompt, image, whole question
    assert not keys & reported_prefixes(other)


def test_different_stateless_prefixes_spread_and_each_returns_to_its_replica(cluster):
    """Sixteen system prompts, sent at once: they spread over both replicas (least busy first);
    each one's next request goes back to the replica that served it, and finds it cached."""
    url, _ = cluster
    prompts = [f"Conversation {i}. " + LONG_SYSTEM for i in range(16)]

    def first(system: str) -> str:
        r = stateless(url, [{"role": "system", "content": system}, {"role": "user", "content": "Hello."}])
        assert r.status_code == 200, r.text
        return r.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(6) as pool:
        homes = list(pool.map(first, prompts))
    assert len(set(homes)) == 2, homes
    for system, home in zip(prompts, homes):
        r = stateless(url, [{"role": "system", "content": system}, {"role": "user", "content": "And again?"}])
        assert r.headers[REPLICA_HEADER] == home and cached_tokens(r) > 0, (system[:16], home, r.headers)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_a_draining_replica_takes_no_new_work_and_serves_its_sessions(cluster, spread):
    """POST /v1/replicas/{name}/drain: no new sessions, live sockets or stateless requests go to
    it; its sessions and a stream it is running go on; DELETE ends the drain."""
    url, _ = cluster
    drained, other = sorted(set(spread.values()))
    assert http(url, key=None).post(f"/v1/replicas/{drained}/drain").status_code == 401
    r = http(url).post("/v1/replicas/nosuchreplica/drain")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "replica_not_found")
    mine = [sid for sid, r in spread.items() if r == drained]
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "count"}], "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with http(url).stream("POST", "/v1/chat/completions", json=body, headers={"X-Session-Id": mine[0]}) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))  # running on the replica
        r = http(url).post(f"/v1/replicas/{drained}/drain")
        assert r.status_code == 200 and r.json()["status"] == "draining", r.text
        events = [first] + [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"  # the running request finished, all of it
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 24
    opened = []  # closed at the end: the later tests expect the spread's balance
    try:
        listed = replicas(url)
        assert listed[drained]["status"] == "draining" and listed[drained]["draining_since"]
        assert listed[other]["status"] == "running"
        for _ in range(6):  # new sessions, live sockets and stateless requests: all to the other
            sid, replica = new_session(url)
            opened.append(sid)
            assert replica == other
        live = LiveClient(url)
        assert live.replica == other
        live.close()
        stateless = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        for _ in range(4):
            r = http(url).post("/v1/chat/completions", json={**stateless, "max_tokens": 2})
            assert r.status_code == 200 and r.headers[REPLICA_HEADER] == other
        for sid in mine[1:4]:  # its sessions are served on, there
            r = turn(url, sid, "still here?")
            assert r.status_code == 200 and r.headers[REPLICA_HEADER] == drained, r.text
    finally:
        r = http(url).delete(f"/v1/replicas/{drained}/drain")
    assert r.status_code == 200 and r.json()["status"] == "running", r.text
    deadline = time.monotonic() + 10  # the listing asks every replica afresh (once in CI it got no answer)
    while (status := replicas(url)[drained]["status"]) != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == "running"
    sid, replica = new_session(url)  # the least loaded again (it has fewer sessions now)
    assert replica == drained
    for sid in opened + [sid]:
        assert http(url).delete(f"/v1/sessions/{sid}").status_code == 200


def read_until_close(ws, timeout_s: float) -> tuple[list[dict], int | None, str]:
    """The events a socket gets until its close frame: (events, close code, close reason)."""
    ws.settimeout(timeout_s)
    events = []
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return events, (int.from_bytes(data[:2], "big") if len(data) >= 2 else None), data[2:].decode()
        if opcode == websocket.ABNF.OPCODE_TEXT:
            events.append(json.loads(data))


def test_a_restarted_proxy_routes_every_session_to_its_replica(cluster, spread):
    """Serve's proxy (and the router in it) is killed and replaced by Serve's controller: the
    new router has seen no session, and still sends each to its replica."""
    import ray

    url, _ = cluster
    [proxy] = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_PROXY_ACTOR")]
    ray.kill(ray.get_actor(proxy["name"], namespace=proxy["namespace"]), no_restart=True)
    wait_for(lambda: http(url).get("/health").status_code == 200, 60, "the replaced proxy")
    sample = list(spread.items())[:6]
    for sid, replica in sample:
        r = turn(url, sid, "after the restart")
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == replica, (sid, r.status_code, r.text)


def test_a_killed_replica_loses_only_its_sessions(cluster, spread):
    """Runs last: one replica is killed; its sessions get 410 session_lost naming them, the
    other's go on, new sessions open on the survivor, Serve starts a replacement."""
    import ray

    url, _ = cluster
    victim, survivor = sorted(set(spread.values()))
    sockets = {}
    for _ in range(10):  # live sessions are placed by load too: until one lands on each replica
        live = LiveClient(url)
        if sockets.setdefault(live.replica, live) is not live:
            live.close()
        if len(sockets) == 2:
            break
    assert set(sockets) == {victim, survivor}
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + victim))
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    for _ in range(4):  # stateless requests right after the kill: none is lost (Serve retries a dead replica's)
        r = http(url).post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == survivor, r.text
    lost = [sid for sid, r in spread.items() if r == victim]
    kept = [sid for sid, r in spread.items() if r == survivor]
    for sid in lost:
        r = turn(url, sid, "still there?")
        assert r.status_code == 410, (sid, r.status_code, r.text)
        assert r.json()["error"]["code"] == "session_lost" and sid in r.json()["error"]["message"]
    for sid in kept:
        r = turn(url, sid, "still there?")
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == survivor, (sid, r.text)
    for _ in range(4):
        sid, replica = new_session(url)
        assert replica != victim and turn(url, sid, "new").status_code == 200
    # the live session on the killed replica is told it is lost, then its socket closes; the other's goes on
    events, code, reason = read_until_close(sockets[victim].ws, 20)
    err = events[-1]
    assert err["type"] == "error" and err["error"]["code"] == "session_lost", events
    assert sockets[victim].session_id in err["error"]["message"] and victim in err["error"]["message"]
    assert (code, reason) == (1011, "session_lost")
    assert sockets[survivor].ask(2, "anyone?")
    for live in sockets.values():
        live.close()
    # Serve replaces the replica; the listing shows the new one, not the dead one
    listed = wait_for(lambda: (lambda d: len(d) == 2 and all(e["status"] == "running" for e in d.values()) and d)(
        replicas(url)), 90, "the replacement replica")
    assert victim not in listed and survivor in listed
