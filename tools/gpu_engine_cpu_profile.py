"""Where the engine loop's CPU goes under bench serve's in-process workload (3B, random weights):
the workload once to warm up, then again with cProfile running inside the loop thread.
Usage: python3 tools/gpu_engine_cpu_profile.py [clients]"""

import asyncio
import cProfile
import io
import pstats
import sys
import time

from omnistream.bench.models import make_engine
from omnistream.bench.serve import _tokenizer_for
from omnistream.bench.serve_local import engine_phase
from omnistream.bench.serve_workload import make_workload
from omnistream.engine.sampling import SamplingParams

import os

clients = int(sys.argv[1]) if len(sys.argv) > 1 else 32
MODEL, DEVICE = os.environ.get("MODEL", "3b"), os.environ.get("DEVICE", "cuda")
opts = {"prompt_tokens": 256, "size": 448, "video_frames": 8, "session_turns": 3, "live_frames": 16, "live_fps": 4.0,
        "live_questions": 2, "live_policy": "exact"}
mix = {"text": 2.0, "image": 1.0, "video": 1.0}
eng = make_engine(MODEL, DEVICE, "auto", 0, max_num_seqs=64)
sp = SamplingParams(max_new_tokens=64, ignore_eos=True)
for seed, profiled in ((1, False), (2, True)):
    w = make_workload(_tokenizer_for(MODEL), mix, int(os.environ.get("N", 128)), clients, None, opts, seed)
    prof = cProfile.Profile()
    before = eng.stats()["engine"]
    if profiled:
        eng.core.call(lambda llm: prof.enable())
    t0 = time.perf_counter()
    samples, a, b = asyncio.run(engine_phase(eng, w, sp))
    wall = time.perf_counter() - t0
    if profiled:
        eng.core.call(lambda llm: prof.disable())
    after = eng.stats()["engine"]
    steps = after["steps"] - before["steps"]
    toks = sum(s.output_tokens for s in samples)
    print(f"run {seed} profiled={profiled}: wall {wall:.2f} s, {steps} steps, {after['rows'] - before['rows']} rows, "
          f"{wall / max(steps, 1) * 1000:.2f} ms/step, {toks / wall:.0f} tok/s")
    w.media_dir.cleanup()
s = io.StringIO()
st = pstats.Stats(prof, stream=s)
st.sort_stats("cumulative").print_stats(45)
st.sort_stats("tottime").print_stats(35)
print(s.getvalue())
eng.close()
