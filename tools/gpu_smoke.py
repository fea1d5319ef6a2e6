"""GPU smoke: Triton decode kernel vs the torch path, then the engine on the 3B architecture."""
import sys, time, tempfile, torch, numpy as np
from pathlib import Path
from omnistream.layers.attention import AttentionMetadata
from omnistream.layers.paged_decode import torch_paged_decode
from omnistream.layers.triton_decode import triton_paged_decode

dev = torch.device("cuda")
torch.manual_seed(0)
for B, H, KVH, ctxs in [(1, 16, 2, [8300]), (3, 28, 4, [5, 700, 4097]), (8, 16, 2, [1, 17, 256, 257, 1000, 3000, 16, 9000])]:
    D, bs, nb = 128, 16, 4000
    k = torch.randn(nb + 1, bs, KVH, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    maxb = max((c + bs - 1) // bs for c in ctxs)
    perm = torch.randperm(nb, device=dev)
    tables = torch.full((B, maxb), nb, dtype=torch.int32, device=dev)
    off = 0
    for i, c in enumerate(ctxs):
        n = (c + bs - 1) // bs
        tables[i, :n] = perm[off:off + n].int(); off += n
    meta = AttentionMetadata(slot_mapping=torch.zeros(B, dtype=torch.long), query_lens=[1]*B, context_lens=ctxs, block_tables=[],
                             decode_block_tables=tables, decode_context_lens=torch.tensor(ctxs, dtype=torch.int32, device=dev))
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
    ref = torch_paged_decode(q.float(), k.float(), v.float(), meta, D**-0.5)
    out = triton_paged_decode(q, k, v, meta, D**-0.5).float()
    print(f"triton decode B={B} H={H} KVH={KVH}: rel err {((out-ref).norm()/ref.norm()).item():.2e}")

from omnistream.api import Engine, build_model
from omnistream.config import EngineConfig
from omnistream.models.hf_config import preset_config
from omnistream.models.demo import write_model_dir
from omnistream.tokenizer import Tokenizer
from omnistream.engine.sampling import SamplingParams

tokdir = write_model_dir(Path(tempfile.mkdtemp()) / "tok", preset_config("tiny"), dtype="float32")
mcfg = preset_config(sys.argv[1] if len(sys.argv) > 1 else "3b")
model = build_model(mcfg, dev, torch.bfloat16)
with torch.no_grad():
    for n, p in model.named_parameters():
        if p.dim() >= 2: p.normal_(0, 0.02)
        elif "norm" in n or "ln_q" in n: p.fill_(1.0)
        else: p.zero_()
cfg = EngineConfig(model=str(tokdir), device="cuda")
t0 = time.perf_counter()
eng = Engine(cfg, tokdir, model, Tokenizer(tokdir))
print(f"engine init (KV sizing + CUDA graph capture) {time.perf_counter()-t0:.1f}s, blocks {eng.llm.blocks.num_blocks}")
rng = np.random.default_rng(0)
base = rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)
frames = [np.roll(base, 5 * i, axis=1) for i in range(64)]
conv = [{"role": "user", "content": [{"type": "video", "video": {"frames": frames, "timestamps": [i / 2 for i in range(64)]}, "min_pixels": 448*448, "max_pixels": 448*448}, {"type": "text", "text": "Describe the video."}]}]
for i in range(3):
    [r] = eng.generate([conv], SamplingParams(max_new_tokens=64, ignore_eos=True))
    m = r.metrics
    print(f"run {i}: prompt {m['prompt_tokens']} vision {m['vision_encode_s']:.3f}s prefill {m['prefill_s']:.3f}s ttft {m['ttft_s']:.3f}s "
          f"(preprocess {m['preprocess_s']:.3f}s) decode {1000/m['decode_tokens_per_s']:.2f} ms/tok peak {m['peak_memory_bytes']/2**30:.1f} GiB")
