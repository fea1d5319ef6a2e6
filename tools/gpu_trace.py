"""Top CUDA kernels of one 3B video request (vision + prefill + 8 decode steps)."""
import torch
from torch.profiler import profile, ProfilerActivity
from omnistream.bench.models import make_engine
from omnistream.bench.workload import video_question
from omnistream.engine.sampling import SamplingParams

eng = make_engine("3b", "cuda", "auto", kv_cache_tokens=20000)
sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
for s in range(2):
    [r] = eng.generate(video_question(64, 448, seed=s), sp)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.metrics.items()})
conv = video_question(64, 448, seed=9)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    [r] = eng.generate(conv, sp)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
# demo preset under CUDA graphs: finite logits?
eng2 = make_engine("demo", "cuda", "auto", kv_cache_tokens=20000)
[r] = eng2.generate(video_question(8, 112, seed=1), SamplingParams(max_new_tokens=16, ignore_eos=True))
print("demo tokens", r.token_ids)
