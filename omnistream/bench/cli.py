"""Registers `omnistream profile` and `omnistream bench ...` (filled in by bench modules).

Bench modules are imported only when their command runs (they pull in transformers)."""

from __future__ import annotations

import argparse
import importlib

from omnistream.entrypoints.options import at_least
from omnistream.models.qwen2_5_vl_presets import PRESETS

SESSION_BENCHES = ("multiturn", "repeat", "shared")


_positive = at_least(int, 1)


def _add_workload_args(p: argparse.ArgumentParser, add_model_args, frames: int, size: int, new_tokens: int) -> None:
    add_model_args(p)
    p.add_argument("--model-config", choices=sorted(PRESETS), default=None,
                   help="random-weight model of this architecture, built on the device (wins over --model)")
    p.add_argument("--frames", type=_positive, default=frames, help="frames of the generated video (2 fps)")
    p.add_argument("--size", type=_positive, default=size, help="frame side in px (multiple of 28; frames are not resized)")
    p.add_argument("--new-tokens", type=int, default=new_tokens, help="greedy tokens to generate (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the clip")
    p.add_argument("--json", default=None, help="write all raw numbers and the environment to this file")


def _add_weight_quant(p: argparse.ArgumentParser, help_text: str) -> None:
    from omnistream.layers.quant import WEIGHT_QUANT_MODES

    p.add_argument("--weight-quant", choices=WEIGHT_QUANT_MODES, default=None, help=help_text)


def _run(name: str):
    def run(args) -> int:
        if args.new_tokens < 2:
            raise SystemExit("error: --new-tokens must be >= 2 (decode time needs two tokens)")
        if name == "accuracy":
            from omnistream.bench.accuracy import run_accuracy

            run_accuracy(args)
            return 0
        if name == "latency":
            from omnistream.bench.latency import cmd_latency

            return cmd_latency(args)
        if name in SESSION_BENCHES:  # multiturn.py, repeat.py, shared.py: cmd_<name>(args)
            module = importlib.import_module(f"omnistream.bench.{name}")
            return getattr(module, f"cmd_{name}")(args)
        from omnistream.bench.profile import cmd_profile

        return cmd_profile(args)

    return run


def add_bench_commands(sub, add_model_args) -> None:
    prof = sub.add_parser("profile", help="stage breakdown of one video question on our engine")
    _add_workload_args(prof, add_model_args, frames=64, size=448, new_tokens=32)
    prof.add_argument("--trace", default=None, help="also export a torch.profiler Chrome trace here")
    prof.set_defaults(func=_run("profile"))

    bench = sub.add_parser("bench", help="benchmarks: omnistream vs transformers on the same inputs")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True, metavar="BENCHMARK")
    lat = bsub.add_parser("latency", help="vision encode, TTFT, decode ms/token, peak memory vs transformers")
    _add_workload_args(lat, add_model_args, frames=64, size=448, new_tokens=64)
    lat.add_argument("--repeats", type=_positive, default=3, help="measured requests per system (median)")
    lat.add_argument("--tuned", choices=("auto", "on", "off"), default="auto",
                     help="transformers with static cache + torch.compile (auto: on CUDA only)")
    lat.set_defaults(func=_run("latency"))
    acc = bsub.add_parser("accuracy", help="engine (bf16) vs transformers float32, against transformers' own bf16 error")
    _add_workload_args(acc, add_model_args, frames=16, size=448, new_tokens=64)
    _add_weight_quant(acc, "also an engine with 8-bit LLM weights (layers/quant.py): its error and agreement beside bf16's")
    acc.set_defaults(func=_run("accuracy"))
    _add_session_benches(bsub, add_model_args)
    _add_stream_bench(bsub, add_model_args)
    _add_concurrency_bench(bsub, add_model_args)
    _add_serve_bench(bsub, add_model_args)
    _add_audio_bench(bsub, add_model_args)


def _stream(args) -> int:
    from omnistream.bench.stream import cmd_stream_bench

    return cmd_stream_bench(args)


def _add_stream_bench(bsub, add_model_args) -> None:
    """W4 (stream): live sessions, ingest rate and TTFT vs stream length, vs the seed's re-encoding."""
    st = bsub.add_parser("stream", help="W4: live camera: ingest frames/s, TTFT and memory vs stream length, vs re-encoding with transformers")
    add_model_args(st)
    st.add_argument("--model-config", choices=sorted(PRESETS), default=None,
                    help="random-weight model of this architecture, built on the device (wins over --model)")
    st.add_argument("--size", type=_positive, default=448, help="frame side in px (multiple of 28)")
    st.add_argument("--minutes", default="1,10,60", help="stream lengths (cumulative, one session), comma separated")
    st.add_argument("--fps", type=float, default=2.0, help="simulated camera frames per second")
    st.add_argument("--new-tokens", type=_positive, default=8, help="greedy tokens per answer")
    st.add_argument("--seed", type=int, default=0, help="seed of the weights and the camera")
    st.add_argument("--json", default=None, help="write all raw numbers and the environment to this file")
    st.set_defaults(func=_stream)


def _add_session_benches(bsub, add_model_args) -> None:
    """W1 (multiturn), E4 (repeat), W2 (shared): sessions and caches vs transformers recomputing."""
    mt = bsub.add_parser("multiturn", help="W1: one clip, N questions in one session; per-turn TTFT and vision work vs transformers")
    _add_workload_args(mt, add_model_args, frames=64, size=448, new_tokens=16)
    mt.add_argument("--turns", type=_positive, default=10, help="questions in the conversation")
    mt.add_argument("--memory-budget-gib", type=float, default=None,
                    help="run the engine alone under this GPU memory budget (transformers not run)")
    mt.add_argument("--offload-vision", action="store_true", help="keep the vision tower in host memory between encodes")
    mt.add_argument("--repeats", type=_positive, default=1,
                    help="engine conversations on different clips; per-turn TTFT is their median")
    _add_weight_quant(mt, "the engine with 8-bit LLM weights (small-GPU mode, lossy; layers/quant.py)")
    mt.set_defaults(func=_run("multiturn"))
    rep = bsub.add_parser("repeat", help="E4: the same video question twice (generate and fresh sessions) vs transformers")
    _add_workload_args(rep, add_model_args, frames=64, size=448, new_tokens=16)
    rep.set_defaults(func=_run("repeat"))
    sh = bsub.add_parser("shared", help="W2: N sessions on one clip, each with its own question, vs transformers")
    _add_workload_args(sh, add_model_args, frames=64, size=448, new_tokens=16)
    sh.add_argument("--sessions", type=_positive, default=8, help="sessions, one after another")
    sh.set_defaults(func=_run("shared"))


def _concurrency(args) -> int:
    from omnistream.bench.concurrency import cmd_concurrency

    return cmd_concurrency(args)


def _add_concurrency_bench(bsub, add_model_args) -> None:
    """W3 (concurrency): N clients at once, each its own session, vs transformers one at a time."""
    from omnistream.entrypoints.options import add_engine_args

    cc = bsub.add_parser("concurrency", help="W3: N concurrent sessions: tok/s, TTFT/ITL percentiles, batch size vs the decode floor; "
                                             "transformers one request at a time; encoder interference")
    add_model_args(cc)
    cc.add_argument("--model-config", choices=sorted(PRESETS), default=None,
                    help="random-weight model of this architecture, built on the device (wins over --model)")
    cc.add_argument("--clients", default="1,8,32,64", help="concurrent clients per configuration, comma separated")
    cc.add_argument("--mix", default="text", help="workloads, comma separated, one configuration each: text, video8, video64 "
                                                  "(a+b: the clients of one configuration alternate between a and b)")
    cc.add_argument("--size", type=_positive, default=448, help="clip frame side in px (multiple of 28)")
    cc.add_argument("--context-tokens", type=_positive, default=1024, help="cached text context of each text client (tokens)")
    cc.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per answer, EOS ignored (>= 2)")
    cc.add_argument("--arrival", choices=("burst", "poisson"), default="burst", help="all questions at once, or Poisson arrivals at --rate")
    cc.add_argument("--rate", type=float, default=None, help="requests/s of --arrival poisson")
    cc.add_argument("--baseline-requests", type=int, default=4,
                    help="transformers requests (one at a time) per mix, on the largest configuration's requests; 0: no baseline")
    cc.add_argument("--interference-clients", type=int, default=16,
                    help="text streams of the encoder-interference measurement; 0: skip it")
    cc.add_argument("--interference-tokens", type=_positive, default=128, help="tokens of each interference text answer")
    cc.add_argument("--interference-frames", type=_positive, default=64, help="frames of the interference clip")
    cc.add_argument("--interference-only", action="store_true", help="run only the encoder-interference measurement")
    cc.add_argument("--warmup-clients", type=_positive, default=4, help="clients of the untimed warm-up run of each mix")
    cc.add_argument("--seed", type=int, default=0, help="seed of the weights, contexts and clips")
    cc.add_argument("--json", default=None, help="write all raw numbers and the environment to this file")
    add_engine_args(cc, {"kv_cache_tokens": "enough for the largest configuration, a quarter to spare",
                         "max_num_seqs": "every client of the largest configuration, at least 64"})
    cc.set_defaults(func=_concurrency)


def _serve(args) -> int:
    from omnistream.bench.serve import cmd_bench_serve

    return cmd_bench_serve(args)


def _add_serve_bench(bsub, add_model_args) -> None:
    """The server on loopback under streaming load, against the same requests in-process."""
    from omnistream.entrypoints.options import add_engine_args

    sv = bsub.add_parser("serve", help="omnistream serve on loopback under streaming chat load (text, images, videos): "
                                       "tok/s, TTFT/ITL/E2E percentiles, errors, HTTP overhead vs the same requests in-process")
    add_model_args(sv)
    sv.add_argument("--model-config", choices=sorted(PRESETS), default=None,
                    help="random-weight model of this architecture, built on the device (wins over --model)")
    sv.add_argument("--clients", type=_positive, default=8, help="concurrent streaming clients, each sending its requests back to back (default: 8)")
    sv.add_argument("--rate", type=float, default=None, help="instead: Poisson arrivals at this many requests/s (open loop)")
    sv.add_argument("--requests", type=_positive, default=None, help="work items in all, a session or live stream counting once (default: 4 per client)")
    sv.add_argument("--mix", default="text=2,image=1,video=1",
                    help="work kinds and weights: text, image, video, session, live (KIND=WEIGHT, comma separated; default: text=2,image=1,video=1)")
    sv.add_argument("--new-tokens", type=_positive, default=64, help="max_tokens of each request (greedy) (default: 64)")
    sv.add_argument("--prompt-tokens", type=_positive, default=256, help="tokens of each text request's prompt (about) (default: 256)")
    sv.add_argument("--size", type=_positive, default=448, help="side of the images and video frames, px (default: 448)")
    sv.add_argument("--video-frames", type=_positive, default=8, help="frames of each video (2 fps) (default: 8)")
    sv.add_argument("--session-turns", type=_positive, default=3, help="questions per session (the first, then follow-ups) (default: 3)")
    sv.add_argument("--live-frames", type=_positive, default=16, help="JPEG frames per live stream (default: 16)")
    sv.add_argument("--live-fps", type=float, default=4.0, help="frames per second a live stream sends (default: 4.0)")
    sv.add_argument("--live-questions", type=_positive, default=2, help="questions per live stream (one after each share of frames) (default: 2)")
    sv.add_argument("--live-policy", choices=("exact", "fast"), default="exact", help="live KV policy (fast answers are not compared) (default: exact)")
    sv.add_argument("--seed", type=int, default=0, help="seed of the weights and the workload (default: 0)")
    sv.add_argument("--json", default=None, help="write the summaries, targets, environment and every request's record to this file")
    sv.add_argument("--serve-args", default="", help="more flags for the server it starts, e.g. '--replicas 2 --replica-gpus 0.5'")
    add_engine_args(sv, shown={"engine_process": "on, as serve runs it, in both phases"})
    sv.set_defaults(func=_serve)


def _audio(args) -> int:
    from omnistream.bench.audio import cmd_audio

    return cmd_audio(args)


def _add_audio_bench(bsub, add_model_args) -> None:
    """E5, E6: audio questions (features, audio encoder, TTFT) and W1 over a clip with sound,
    vs transformers' processor (padded to 300 s, truncated) and model, on a Qwen2.5-Omni thinker."""
    from omnistream.models.qwen2_5_omni_config import OMNI_PRESETS

    au = bsub.add_parser("audio", help="Qwen2.5-Omni: feature shape/padding/time, audio encoder time and TTFT per clip length, "
                                       "the VAD's tokens saved, and W1 over a clip with sound, vs transformers")
    add_model_args(au)
    au.add_argument("--model-config", choices=sorted(OMNI_PRESETS), default=None,
                    help="random-weight Qwen2.5-Omni thinker of this size, built on the device (wins over --model)")
    au.add_argument("--clips", default="2,10,60,300,600", help="clip lengths in seconds, comma separated")
    au.add_argument("--new-tokens", type=_positive, default=16, help="greedy tokens per answer")
    au.add_argument("--turns", type=int, default=10, help="questions of the W1 conversation over a clip with sound (0: skip W1)")
    au.add_argument("--w1-seconds", type=float, default=60.0, help="length of the W1 clip (mp4 with an audio track)")
    au.add_argument("--w1-size", type=_positive, default=224, help="W1 frame side in px (multiple of 28)")
    au.add_argument("--no-vad", action="store_true", help="skip the lossy VAD runs (silero-vad)")
    au.add_argument("--seed", type=int, default=0, help="seed of the weights and the clips")
    au.add_argument("--json", default=None, help="write all raw numbers and the environment to this file")
    au.set_defaults(func=_audio)
