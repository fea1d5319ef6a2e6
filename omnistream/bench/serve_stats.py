"""bench serve's statistics: per phase and per kind percentiles of TTFT, inter-chunk and
end-to-end latency, tokens/s, errors, the engine-side TTFT split; the HTTP overhead against
the targets, and the greedy answers both phases agree on.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from omnistream.bench.stats import mean, pct, ratio
from omnistream.bench.serve_workload import FOLLOWUP, KINDS, Sample

# for 3B on an H200 with 32 streaming clients (issue 9)
TARGET_TTFT_P50_DELTA_S, TARGET_TTFT_P99_RATIO, TARGET_TPS_RATIO = 0.003, 1.2, 0.9


# ---------------------------------------------------------------------------------- statistics
def _percentiles(prefix: str, xs: list[float]) -> dict[str, float | None]:
    return {f"{prefix}_p{q}_s": pct(xs, q) for q in (50, 90, 99)}


def _itl(samples: list[Sample]) -> list[float]:
    return [b - a for s in samples for a, b in zip(s.chunk_times, s.chunk_times[1:])]


def kind_order(kind: str) -> tuple[int, str]:
    """Rows in the order of KINDS, a session's follow-ups right after its first questions."""
    names = [*KINDS[:KINDS.index("session") + 1], FOLLOWUP, *KINDS[KINDS.index("session") + 1:]]
    return (names.index(kind) if kind in names else len(names), kind)


def _engine_split(samples: list[Sample]) -> dict[str, float | None]:
    """Medians of where the time to the first token went: in the engine (its TTFT counts from
    the request's arrival at the server / the in-process caller, media decoding included), the
    media decoding and queueing inside that, and the rest outside the engine."""
    timed = [s for s in samples if s.server.get("ttft_s") is not None and s.ttft_s is not None]
    return {"engine_ttft_p50_s": pct([s.server["ttft_s"] for s in timed], 50),
            "media_p50_s": pct([s.server.get("media_decode_s", 0) + s.server.get("preprocess_s", 0) for s in timed], 50),
            "queue_p50_s": pct([s.server["queue_s"] for s in timed if s.server.get("queue_s") is not None], 50),
            "outside_p50_s": pct([s.ttft_s - s.server["ttft_s"] for s in timed], 50),
            # HTTP only: the server's parts of "outside" (reading + parsing the request; handing
            # the first token to the socket); the rest is the connection and the client
            "receive_p50_s": pct([s.server["server_receive_s"] for s in timed if "server_receive_s" in s.server], 50),
            "send_p50_s": pct([s.server["server_send_s"] for s in timed if "server_send_s" in s.server], 50),
            # the connection's two ways (same host: the server's stamps are on this clock): the
            # client's send to the server's handler starting, the server's first chunk to its arrival
            "to_server_p50_s": pct([s.server["server_received_at"] - s.sent for s in timed
                                    if s.server.get("server_received_at") is not None], 50),
            "to_client_p50_s": pct([s.chunk_times[0] - s.server["server_first_sent_at"] for s in timed
                                    if s.server.get("server_first_sent_at") is not None and s.chunk_times], 50)}


def summarize(samples: list[Sample], start: float, end: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    ended = max((s.ended for s in ok), default=end)
    wall = ended - start
    tokens = sum(s.output_tokens for s in ok)
    itl = _itl(ok)
    by_kind = {}
    for kind in sorted({s.kind for s in samples}, key=kind_order):
        mine = [s for s in ok if s.kind == kind]
        by_kind[kind] = {"requests": sum(s.kind == kind for s in samples), "ok": len(mine),
                         "errors": dict(Counter(s.error for s in samples if s.kind == kind and s.error)),
                         **_percentiles("ttft", [s.ttft_s for s in mine]), "itl_p50_s": pct(_itl(mine), 50),
                         "e2e_p50_s": pct([s.e2e_s for s in mine], 50), "mean_output_tokens": mean([s.output_tokens for s in mine]),
                         "mean_cached_tokens": mean([s.cached_tokens for s in mine]), **_engine_split(mine)}
    return {
        "requests": len(samples), "ok": len(ok), "errors": dict(Counter(s.error for s in samples if s.error)),
        "errors_by_kind": {k: v["errors"] for k, v in by_kind.items() if v["errors"]},
        "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
        **_percentiles("ttft", [s.ttft_s for s in ok]), **_percentiles("itl", itl), **_percentiles("e2e", [s.e2e_s for s in ok]),
        "itl_samples": len(itl), "by_kind": by_kind, **_engine_split(ok),
    }


def overhead(http: dict, local: dict) -> dict[str, Any]:
    """HTTP against in-process: differences of medians, ratios of tails and of throughput."""
    delta = lambda k: None if http[k] is None or local[k] is None else http[k] - local[k]  # noqa: E731
    return {
        "ttft_p50_delta_s": delta("ttft_p50_s"), "ttft_p99_ratio": ratio(http["ttft_p99_s"], local["ttft_p99_s"]),
        "itl_p50_delta_s": delta("itl_p50_s"), "itl_p99_ratio": ratio(http["itl_p99_s"], local["itl_p99_s"]),
        "e2e_p50_delta_s": delta("e2e_p50_s"), "e2e_p99_ratio": ratio(http["e2e_p99_s"], local["e2e_p99_s"]),
        "tokens_per_s_ratio": ratio(http["tokens_per_s"], local["tokens_per_s"]),
        # the time outside the engine (client TTFT minus the engine's own), HTTP's median minus
        # in-process's: what the wire and the server add, whatever the engine's queueing did in
        # each phase (the TTFT p50 delta swings with the mix's order of arrival)
        "outside_p50_delta_s": delta("outside_p50_s"),
    }


def check_targets(o: dict) -> list[dict]:
    rows = [("TTFT p50 within 3 ms of in-process", "ttft_p50_delta_s", "<=", TARGET_TTFT_P50_DELTA_S),
            ("TTFT p99 within 1.2x of in-process", "ttft_p99_ratio", "<=", TARGET_TTFT_P99_RATIO),
            ("tokens/s within 10% of in-process", "tokens_per_s_ratio", ">=", TARGET_TPS_RATIO)]
    out = []
    for label, key, op, bound in rows:
        v = o[key]
        out.append({"target": label, "metric": key, "value": v, "bound": bound,
                    "ok": None if v is None else (v <= bound if op == "<=" else v >= bound)})
    return out


def equal_answers(http: list[Sample], local: list[Sample]) -> dict[str, Any]:
    """Greedy answers of both phases, question by question, where they are exact (not live
    `fast` answers: those depend on when the session's KV edits ran)."""
    theirs = {(s.index, s.turn): s for s in local}
    pairs = [(a, theirs[(a.index, a.turn)]) for a in http if (a.index, a.turn) in theirs]
    pairs = [(a, b) for a, b in pairs if a.error is None and b.error is None]
    exact = [(a, b) for a, b in pairs if a.exact and b.exact]
    by_kind = {}
    for kind in sorted({a.kind for a, _ in pairs}, key=kind_order):
        mine = [(a, b) for a, b in exact if a.kind == kind]
        by_kind[kind] = {"compared": len(mine), "equal": sum(a.text == b.text for a, b in mine),
                         "not_compared": sum(a.kind == kind for a, _ in pairs) - len(mine)}
    return {"compared": len(exact), "equal": sum(a.text == b.text for a, b in exact),
            "not_compared": len(pairs) - len(exact), "by_kind": by_kind}
