"""CUDA graphs for steps of few tokens (the gpt-fast / nano-vllm recipe, extended).

An eager step launches ~1400 kernels whatever its size: ~50 ms of host time on an H100 machine,
more than the GPU needs for a few hundred tokens. Replaying a captured graph removes it. The
graph computes R independent rows, each one token with its own position, cache slot, block
table and context length. A decode is one row; a short chunk (a follow-up question over a
cached conversation, a history re-prefill, one live video patch) is several rows of one
sequence, row i seeing the context up to itself: every row's K/V is written before attention
reads, so causality holds. Media rows (vision embeddings) run in it too: the graph embeds the
token ids and takes the rows marked as media from a static embedding buffer instead. Buckets of
up to LOGITS_ROWS rows (decode batches) also run the LM head inside; larger ones (chunks, which
sample one row) run it outside on the sampled rows only.
One graph per row-count bucket, all sharing static buffers; padding rows write into a scratch
block that no sequence owns.
"""

from __future__ import annotations

import numpy as np
import torch

from omnistream.engine.graph_limits import FULL
from omnistream.engine.scheduler import SchedulerOutput
from omnistream.layers.attention import AttentionMetadata, row_tiles
from omnistream.layers.fused import compiled_kernels

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
MAX_ROWS = FULL.rows  # the default size; larger steps run eagerly: their GPU time hides the launch cost
LOGITS_ROWS = 64  # buckets up to this size compute every row's logits inside the graph
TILE_ROWS = 8  # rows of one chunk per tile of the row kernel (layers/triton_decode.TILE_ROWS)


class DecodeGraphs:
    def __init__(self, runner, max_rows: int, max_blocks: int, scratch_block: int, use_graphs: bool = True) -> None:
        self.runner = runner
        self.use_graphs = use_graphs  # False: run the same row batches eagerly (CPU tests)
        self.model = runner.model
        self.max_blocks = max_blocks
        self.scratch = scratch_block
        self.buckets = [b for b in BUCKETS if b <= max_rows] or [1]
        n, dev = self.buckets[-1], runner.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.media = torch.zeros(n, self.model.hidden_size, dtype=runner.dtype, device=dev)  # media rows' embeddings
        self.is_media = torch.zeros(n, 1, dtype=torch.bool, device=dev)
        self._media_set = False  # is_media holds True rows from the last step
        self.positions = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), scratch_block * runner.block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        # buckets above LOGITS_ROWS hold short chunks (more rows than max_num_seqs decodes):
        # their rows reach the row kernel as tiles, runs of one sequence sharing a pass over its
        # context (first row, count); padding rows are tiles of their own
        self.tiles = torch.zeros(2, n, dtype=torch.int32, device=dev)
        self.hidden = None  # (n, hidden) output of the last replay
        self.logits = None  # (LOGITS_ROWS, vocab) output of the last replay of a small bucket
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> hidden (b, hidden), logits (b, vocab) when b <= LOGITS_ROWS else None."""
        meta = AttentionMetadata(  # every token a row: no sequence takes the reference path
            slot_mapping=self.slots[:b], query_lens=[1] * b, context_lens=[1] * b, block_tables=[],
            row_block_tables=self.tables[:b], row_context_lens=self.lens[:b], num_row_seqs=b,
            row_tiles=self.tiles[:, :b] if b > LOGITS_ROWS else None,
        )
        x = self.model.model.embed_tokens(self.input_ids[:b])
        x = torch.where(self.is_media[:b], self.media[:b], x)
        hidden = self.model(x, self.positions[:, :b], self.runner.kv_caches, meta)
        return hidden, (self.model.compute_logits(hidden) if b <= LOGITS_ROWS else None)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.use_graphs:
            self.graphs = {b: None for b in self.buckets}
            return
        with compiled_kernels():
            self._capture()

    def _capture(self) -> None:
        self.hidden = torch.empty_like(self.media)
        self.logits = torch.empty(min(LOGITS_ROWS, self.buckets[-1]), self.model.vocab_size,
                                  dtype=self.media.dtype, device=self.media.device)

        def step(b: int) -> None:
            hidden, logits = self._forward(b)
            self.hidden[:b] = hidden
            if logits is not None:
                self.logits[:b] = logits

        for b in reversed(self.buckets):  # largest first so smaller graphs reuse its pool
            for _ in range(2):  # warm up (Triton compile, cuBLAS handles) outside the graph
                step(b)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                step(b)
            self.pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize()

    def can_run(self, out: SchedulerOutput) -> bool:
        if not self.graphs or out.num_tokens > self.buckets[-1]:
            return False
        return all(len(c.request.block_table) <= self.max_blocks for c in out.chunks)

    def run(self, out: SchedulerOutput, prev: tuple[torch.Tensor, list] | None = None):
        """-> (logits of the rows that sample, their chunks). prev: (tokens (S,) on the device,
        their chunks) of the step before, whose tokens are the inputs of the pending rows."""
        rows = out.num_tokens
        g = next(x for x in self.buckets if x >= rows)
        ids, pos, slots, lens, tables, last_rows, sampling = self._host_rows(out, g)
        dev = self.media.device
        self.input_ids[:g].copy_(torch.from_numpy(ids), non_blocking=True)
        if prev is not None:
            self._pending_inputs(out, *prev)
        mm_rows, mm_embeds = self.runner.media_rows(out.chunks)
        if mm_rows is not None:
            mask = torch.zeros(g, 1, dtype=torch.bool)
            mask[mm_rows] = True
            self.is_media[:g].copy_(mask, non_blocking=True)
            if g < len(self.is_media):
                self.is_media[g:].zero_()
            self.media.index_copy_(0, mm_rows.to(dev, non_blocking=True), mm_embeds.to(self.media.dtype))
            self._media_set = True
        elif self._media_set:  # text only: clear the mask once
            self.is_media.zero_()
            self._media_set = False
        self.positions[:, :g].copy_(torch.from_numpy(pos), non_blocking=True)
        self.slots[:g].copy_(torch.from_numpy(slots), non_blocking=True)
        self.lens[:g].copy_(torch.from_numpy(lens), non_blocking=True)
        # only the columns some row uses: a row reads its table up to its length, and the
        # padding rows (length 1) only column 0
        self.tables[:g, : tables.shape[1]].copy_(torch.from_numpy(tables), non_blocking=True)
        if g > LOGITS_ROWS:
            self.tiles[:, :g].copy_(torch.from_numpy(_tiles(out, g)), non_blocking=True)
        if self.use_graphs:
            self.graphs[g].replay()
            hidden, logits = self.hidden, (self.logits if g <= LOGITS_ROWS else None)
        else:
            hidden, logits = self._forward(g)
        if not last_rows:
            return None, []
        if logits is not None:  # computed in the graph
            return _rows(logits, last_rows), sampling
        return self.model.compute_logits(_rows(hidden, last_rows)), sampling

    def _pending_inputs(self, out: SchedulerOutput, tokens: torch.Tensor, chunks: list) -> None:
        """input_ids of the pending rows <- the previous step's tokens, on the device (stream
        order: after that step's sampling). A pending chunk is one row; its token is the one
        its request sampled in the previous step."""
        where = {id(c.request): i for i, c in enumerate(chunks)}
        src, dst = [], []
        row = 0
        for c in out.chunks:
            if c.pending:
                src.append(where[id(c.request)])
                dst.append(row)
            row += c.num_tokens
        if not src:
            return
        if src == dst == list(range(len(src))):
            self.input_ids[: len(src)].copy_(tokens[: len(src)])
            return
        idx = torch.tensor([src, dst], dtype=torch.long).to(tokens.device, non_blocking=True)
        self.input_ids.index_copy_(0, idx[1], tokens.index_select(0, idx[0]))

    def _host_rows(self, out: SchedulerOutput, g: int):
        """The step's rows as host arrays padded to bucket g: ids (g,), positions (3, g), slots
        (g,), lengths (g,) int32, tables (g, widest table) int32; plus the rows that sample and
        their chunks. Decode rows take a scalar path (no tensor ops: ~10 us each otherwise)."""
        bs, scratch = self.runner.block_size, self.scratch
        ids = np.zeros(g, np.int64)
        pos = np.zeros((3, g), np.int64)
        slots = np.full(g, scratch * bs, np.int64)
        lens = np.ones(g, np.int32)
        tables = np.full((g, max(len(c.request.block_table) for c in out.chunks)), scratch, np.int32)
        last_rows, sampling, row = [], [], 0
        for c in out.chunks:
            r, s, n = c.request, c.start, c.num_tokens
            bt = r.block_table
            if n == 1 and s >= r.prompt_len:  # a decode: position continues after the prompt
                ids[row] = 0 if c.pending else r.token_ids[s]  # pending: filled on the device
                pos[:, row] = r.next_pos + s - r.prompt_len
                slots[row] = bt[s // bs] * bs + s % bs
                lens[row] = s + 1
                tables[row, : len(bt)] = bt
            else:
                table = np.asarray(bt, np.int64)
                idx = np.arange(s, s + n)
                ids[row : row + n] = r.token_ids[s : s + n]
                pos[:, row : row + n] = r.positions_for(s, s + n).numpy()
                slots[row : row + n] = table[idx // bs] * bs + idx % bs
                lens[row : row + n] = idx + 1
                tables[row : row + n, : len(bt)] = table
            row += n
            if c.samples:
                last_rows.append(row - 1)
                sampling.append(c)
        return ids, pos, slots, lens, tables, last_rows, sampling


def _tiles(out: SchedulerOutput, g: int) -> np.ndarray:
    """(2, g) int32 tiles of a step padded to g rows: each chunk's rows in runs of at most
    TILE_ROWS (attention.row_tiles), then one tile per padding row; unused tiles count 0."""
    real = row_tiles([c.num_tokens for c in out.chunks], TILE_ROWS).numpy()
    rows = out.num_tokens
    tiles = np.zeros((2, g), np.int32)
    t = real.shape[1]
    tiles[:, :t] = real
    tiles[0, t : t + g - rows] = np.arange(rows, g)
    tiles[1, t : t + g - rows] = 1
    return tiles


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows], as a view where possible: an index tensor is a host-to-device copy, which waits
    for the replay, so the work after it could not be queued behind the graph."""
    if rows == list(range(len(rows))):
        return x[: len(rows)]  # a decode batch: every row samples
    if len(rows) == 1:
        return x[rows[0] : rows[0] + 1]  # one chunk: its last row
    return x[torch.tensor(rows, device=x.device)]
