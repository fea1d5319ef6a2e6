"""Prefix affinity of stateless requests, without Ray: the keys of a chat completion
(prefix_keys.py), the proxy middleware that puts them into a header and replays the body
(prefix_ingress.py), what a replica reports and a router remembers, and the ranking
(prefix_affinity.py). tests/test_cluster.py checks it on a running cluster."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest

from omnistream.cluster.placement import PREFIX_HEADER, Kind, route_of_scope
from omnistream.cluster.prefix_affinity import (
    SLACK_REQUESTS,
    PrefixLedger,
    RecentPrefixes,
    StatelessCandidate,
    pack_keys,
    rank_stateless,
    stateless_load,
    unpack_keys,
    within_slack,
)
from omnistream.cluster.prefix_ingress import PrefixKeyMiddleware
from omnistream.cluster.prefix_keys import MAX_KEYS, MIN_PREFIX_CHARS, elide_media, prefix_keys

SYSTEM = "You are a careful assistant who looks at pictures. " * 12  # > MIN_PREFIX_CHARS
IMAGE = "data:image/png;base64," + base64.b64encode(os.urandom(300_000)).decode()


def chat(*messages, model: str = "demo-model", **fields) -> bytes:
    return json.dumps({"messages": list(messages), "model": model, "max_tokens": 4, **fields}).encode()


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def image(url: str = IMAGE) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# ---------------------------------------------------------------------------------- keys
def test_questions_about_one_image_share_its_key():
    a = prefix_keys(chat(user(image(), "What is in it?")))
    b = prefix_keys(chat(user(image(), "What colour is it?"), max_tokens=99, temperature=1))
    assert len(a) == len(b) == 2 and a[0] == b[0] and a[1] != b[1]  # the image's prefix, then the question's
    other = IMAGE[:-10] + ("A" if IMAGE[-10] != "A" else "B") + IMAGE[-9:]  # one byte differs, near the end
    assert prefix_keys(chat(user(image(other), "What is in it?")))[0] != a[0]
    assert prefix_keys(chat(user(image(), "What is in it?"), model="other"))[0] != a[0]
    # another API key is another tenant (its KV is salted apart): no key in common
    assert not set(prefix_keys(chat(user(image(), "What is in it?")), "Bearer other")) & set(a)
    assert prefix_keys(chat(user(image(), "What is in it?")), "Bearer k") == prefix_keys(
        chat(user(image(), "What is in it?")), "Bearer k")


def test_short_prompts_have_no_key_and_long_system_prompts_do():
    assert prefix_keys(chat(user("hello"))) == ()  # cheap to prefill, and it would send everything to one replica
    assert prefix_keys(chat({"role": "system", "content": "Be brief."}, user("hello"))) == ()
    a = prefix_keys(chat({"role": "system", "content": SYSTEM}, user("hello")))
    b = prefix_keys(chat({"role": "system", "content": SYSTEM}, user("bye")))
    assert a[0] == b[0] and a[-1] != b[-1]
    assert len(SYSTEM) >= MIN_PREFIX_CHARS
    for bad in (b"", b"{", b"[]", b'{"messages": "x"}', b'{"messages": [1]}', b"\xff\xfe"):
        assert prefix_keys(bad) == (), bad


def test_a_growing_conversation_shares_the_previous_requests_deepest_key():
    history = [{"role": "system", "content": SYSTEM}, user(image(), "Describe it.")]
    first = prefix_keys(chat(*history))
    for turn in range(6):  # a stateless client re-sends everything each turn
        history += [{"role": "assistant", "content": f"answer {turn}"}, user(f"question {turn}")]
        keys = prefix_keys(chat(*history))
        assert len(keys) <= MAX_KEYS and keys[0] == first[0]  # the coarsest: the system prompt
        assert first[-1] in keys  # the previous request's whole prompt is a prefix of this one
        first = keys


def test_media_is_hashed_in_the_raw_body_not_parsed():
    audio = base64.b64encode(os.urandom(5000)).decode()
    text = 'he said \\"data:' + "x" * 400 + '\\" twice'  # an escaped quote: not a data string, left as is
    body = chat(user(image(), {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                     {"type": "text", "text": json.loads(f'"{text}"')}))
    small = elide_media(body)
    assert len(small) < 1000
    parsed = json.loads(small)  # still the same JSON, only the long data strings differ
    parts = parsed["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("#") and parts[1]["input_audio"]["data"].startswith("#")
    assert parts[2]["text"] == json.loads(body)["messages"][0]["content"][2]["text"]
    assert parsed["model"] == "demo-model" and elide_media(b'{"data": "short"}') == b'{"data": "short"}'


# ---------------------------------------------------------------------------------- proxy middleware
def through_proxy(body_chunks: list[bytes], path: str = "/v1/chat/completions", headers=(), limit=None):
    """(the scope the proxy got, the messages it received) of a request through PrefixKeyMiddleware."""
    seen = {}
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
                for i, c in enumerate(body_chunks)] + [{"type": "http.disconnect"}]

    async def receive():
        return incoming.pop(0)

    async def proxy(scope, receive, send):
        seen["scope"], seen["messages"] = scope, []
        while True:
            msg = await receive()
            seen["messages"].append(msg)
            if msg["type"] == "http.disconnect":
                return

    kw = {"max_body_bytes": limit} if limit else {}
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "",
             "headers": [(b"authorization", b"Bearer k"), *headers]}
    asyncio.run(PrefixKeyMiddleware(proxy, **kw)(scope, receive, None))
    return seen["scope"], seen["messages"]


def test_the_proxy_adds_the_keys_and_replays_the_body_intact():
    body = chat({"role": "system", "content": SYSTEM}, user(image(), "What is in it?"))
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    scope, messages = through_proxy(chunks, headers=[(PREFIX_HEADER, b"0123456789abcdef")])  # a client's own: dropped
    assert [m.get("body") for m in messages[:-1]] == chunks and messages[-1] == {"type": "http.disconnect"}
    assert [m["more_body"] for m in messages[:-1]] == [True] * (len(chunks) - 1) + [False]
    route = route_of_scope(scope)
    assert route.kind is Kind.STATELESS and route.prefix_keys == prefix_keys(body, "Bearer k")
    assert sum(k == PREFIX_HEADER for k, _ in scope["headers"]) == 1
    # a body over the limit: no key, relayed as it came; other routes and sessions: no reading, no key
    scope, messages = through_proxy(chunks, limit=100_000)
    assert route_of_scope(scope).prefix_keys == () and b"".join(m.get("body", b"") for m in messages) == body
    for path, headers in (("/v1/models", ()), ("/v1/chat/completions", [(b"x-session-id", b"s-r1-00ff")])):
        scope, messages = through_proxy(chunks, path=path, headers=headers)
        assert route_of_scope(scope).prefix_keys == () and b"".join(m.get("body", b"") for m in messages) == body


# ---------------------------------------------------------------------------------- reports, ledger, ranking
def test_a_replica_reports_its_recent_prefixes_bounded():
    recent = RecentPrefixes(capacity=3)
    recent.add(["%016x" % i for i in range(5)])
    recent.add(["%016x" % 2])  # served again: the most recent now
    assert unpack_keys(recent.packed()) == {"%016x" % i for i in (2, 3, 4)}
    assert len(pack_keys(["%016x" % i for i in range(4096)])) == 8 * 4096  # what one report carries at most


def test_the_ledger_counts_placed_keys_until_two_newer_reports():
    ledger = PrefixLedger()
    keys = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc")
    ledger.observe_report("r1", {"report": 1, "prefixes": pack_keys(keys[:1])})
    assert (ledger.depth("r1", keys), ledger.depth("r2", keys)) == (1, 0)
    ledger.record("r2", keys[:2])  # placed by this router, in no report yet
    assert ledger.depth("r2", keys) == 2
    ledger.observe_report("r2", {"report": 7, "prefixes": b""})  # a report that may predate the request
    ledger.observe_report("r2", {"report": 7, "prefixes": b""})  # the same report again: nothing changes
    assert ledger.depth("r2", keys) == 2
    ledger.observe_report("r2", {"report": 8, "prefixes": pack_keys(keys[:2])})  # includes them now
    assert ledger.depth("r2", keys) == 2
    ledger.observe_report("r2", {"report": 9, "prefixes": b""})  # evicted on the replica: forgotten here too
    assert ledger.depth("r2", keys) == 0
    ledger.forget_others(["r2"])
    assert ledger.depth("r1", keys) == 0


def test_stateless_ranking():
    keys = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb")
    # the replica holding the deepest key first, even somewhat busier
    assert rank_stateless(keys, [StatelessCandidate("a", 0), StatelessCandidate("b", 3, depth=1)]) == ["b", "a"]
    assert rank_stateless(keys, [StatelessCandidate("a", 1, depth=1), StatelessCandidate("b", 2, depth=2),
                                 StatelessCandidate("c", 0)]) == ["b", "a", "c"]
    # much busier than the least busy replica: the least busy first
    assert rank_stateless(keys, [StatelessCandidate("a", 0), StatelessCandidate("b", SLACK_REQUESTS + 1, depth=2)]) == [
        "a", "b"]
    assert within_slack(SLACK_REQUESTS, 0) and not within_slack(SLACK_REQUESTS + 1, 0)
    assert within_slack(20, 10) and not within_slack(21, 10)  # at most twice the least busy's, when that is more
    # nobody holds it: least in flight first; equal loads: a rendezvous hash of the prefix decides, so
    # different prefixes spread and every router sends one prefix to the same replica
    assert rank_stateless(keys, [StatelessCandidate("a", 2), StatelessCandidate("b", 1)]) == ["b", "a"]
    idle = [StatelessCandidate(n, 0) for n in ("r1", "r2", "r3")]
    firsts = [rank_stateless(("%016x" % i,), idle)[0] for i in range(60)]
    assert set(firsts) == {"r1", "r2", "r3"} and min(firsts.count(n) for n in ("r1", "r2", "r3")) >= 8
    assert firsts == [rank_stateless(("%016x" % i,), list(reversed(idle)))[0] for i in range(60)]
    assert rank_stateless(keys, []) == []


def test_stateless_load_is_the_replicas_own_count_else_its_reported_queue():
    assert stateless_load(7, {"queued": 3}) == 7 and stateless_load(0, {"queued": 3}) == 0
    assert stateless_load(None, {"queued": 3}) == 3  # it did not answer: its last report
    assert stateless_load(None, None) == 0


@pytest.mark.parametrize("value, keys", [
    (b"0123456789abcdef,fedcba9876543210", ("0123456789abcdef", "fedcba9876543210")),
    (b"0123456789abcdef, nothex!, ABCDEF0123456789", ("0123456789abcdef",)),
    (b"", ()),
])
def test_routes_read_the_prefix_header(value, keys):
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "",
             "headers": [(PREFIX_HEADER, value)]}
    assert route_of_scope(scope).prefix_keys == keys
    scope["headers"].append((b"x-session-id", b"s-r1-00ff"))  # a session's request goes to its replica: no keys
    assert route_of_scope(scope).kind is Kind.SESSION and route_of_scope(scope).prefix_keys == ()
