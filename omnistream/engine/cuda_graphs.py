"""CUDA graphs for pure-decode steps (the gpt-fast / nano-vllm recipe).

A decode step at batch 1 launches hundreds of small kernels; replaying a captured graph removes
the CPU launch cost. One graph per batch-size bucket, all sharing static input buffers. Rows
beyond the real batch write their K/V into a scratch block that no sequence owns.
"""

from __future__ import annotations

import torch

from omnistream.engine.scheduler import SchedulerOutput
from omnistream.layers.attention import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_blocks: int, scratch_block: int) -> None:
        self.runner = runner
        self.model = runner.model
        self.max_blocks = max_blocks
        self.scratch = scratch_block
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        n, dev = self.buckets[-1], runner.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), scratch_block * runner.block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.logits = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:b], query_lens=[1] * b, context_lens=[1] * b, block_tables=[],
            decode_block_tables=self.tables[:b], decode_context_lens=self.lens[:b],
        )
        embeds = self.model.embed(self.input_ids[:b], None, None)
        hidden = self.model(embeds, self.positions[:, :b], self.runner.kv_caches, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        self.logits = torch.empty(self.buckets[-1], self.model.cfg.text.vocab_size, device=self.runner.device, dtype=self.runner.dtype)
        for b in reversed(self.buckets):  # largest first so smaller graphs reuse its pool
            for _ in range(2):  # warm up (Triton compile, cuBLAS handles) outside the graph
                self.logits[:b] = self._forward(b)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.logits[:b] = self._forward(b)
            self.pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize()

    def can_run(self, out: SchedulerOutput) -> bool:
        if not self.graphs or len(out.chunks) > self.buckets[-1]:
            return False
        for c in out.chunks:
            r = c.request
            if c.num_tokens != 1 or not c.samples or c.start < r.prompt_len or len(r.block_table) > self.max_blocks:
                return False
        return True

    def run(self, out: SchedulerOutput) -> torch.Tensor:
        b = len(out.chunks)
        g = next(x for x in self.buckets if x >= b)
        bs = self.runner.block_size
        ids, pos, slots, lens = [], [], [], []
        tables = torch.full((g, self.max_blocks), self.scratch, dtype=torch.int32)
        for i, c in enumerate(out.chunks):
            r, t = c.request, c.start
            ids.append(r.token_ids[t])
            pos.append(r.next_pos + t - r.prompt_len)
            slots.append(r.block_table[t // bs] * bs + t % bs)
            lens.append(t + 1)
            tables[i, : len(r.block_table)] = torch.tensor(r.block_table, dtype=torch.int32)
        pad = g - b
        self.input_ids[:g].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:, :g].copy_(torch.tensor(pos + [0] * pad).expand(3, -1), non_blocking=True)
        self.slots[:g].copy_(torch.tensor(slots + [self.scratch * bs] * pad), non_blocking=True)
        self.lens[:g].copy_(torch.tensor(lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        self.tables[:g].copy_(tables, non_blocking=True)
        self.graphs[g].replay()
        return self.logits[:b]
