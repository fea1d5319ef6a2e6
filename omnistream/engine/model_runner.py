"""Model runner: turns a SchedulerOutput into one forward pass and sampled tokens.

Data flow of a step:
  SchedulerOutput (chunks) -> encode the temporal patches the chunks cover (one vision forward)
    -> ForwardBatch: flat token ids (N,), positions (3, N), media rows, cache slots, metadata
       (short chunks first: their tokens are rows of one paged row-kernel launch)
    -> decoder forward over the paged KV cache -> logits of the rows that sample -> tokens
       (+ per request: host logits, logprobs)

Steps of few tokens on the GPU replay a CUDA graph captured per row-count bucket. Encoding the
media (per temporal patch, with the encoder cache; whole or a block at a time) is the runner's
other half, in engine/runner_media.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from omnistream.engine.sampling import sample
from omnistream.engine.scheduler import ScheduledChunk, SchedulerOutput
from omnistream.engine.cuda_graphs import TILE_ROWS
from omnistream.engine.encode_ahead import EncodeAhead
from omnistream.engine.runner_media import RunnerMedia
from omnistream.engine.vision_timing import VisionTiming
from omnistream.layers.attention import AttentionMetadata, row_layout, row_tiles
from omnistream.models.interface import MultimodalLM

log = logging.getLogger(__name__)

# chunks of at most this many new tokens run as rows of the paged row kernel (one query token
# each); longer ones through flash SDPA, whose one pass over the context beats R row passes
ROW_MAX_QUERY = 128


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (N,) long
    positions: torch.Tensor  # (3, N) long
    mm_rows: torch.Tensor | None  # (M,) rows of the batch holding media embeddings
    mm_embeds: torch.Tensor | None  # (M, hidden)
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # (S,) rows whose logits are sampled
    sample_chunks: list[ScheduledChunk]  # the chunk of each sampled row


@dataclass
class LaunchedStep:
    """A step queued on the device. `tokens` is known at once (host sampling), or `tokens_dev`
    (S,) stays on the device and its copy in pinned memory is ready when `event` is."""

    chunks: list[ScheduledChunk]  # the chunks that sample, in row order
    tokens: list[int] | None = None
    tokens_dev: torch.Tensor | None = None  # (S,) long on the device
    host: torch.Tensor | None = None  # (S,) long, pinned: the copy of tokens_dev
    event: torch.cuda.Event | None = None
    vision: VisionTiming | None = None  # the step's vision encoding, timed on the device

    @classmethod
    def on_device(cls, chunks: list[ScheduledChunk], tokens_dev: torch.Tensor) -> "LaunchedStep":
        if not tokens_dev.is_cuda:
            return cls(chunks=chunks, tokens_dev=tokens_dev)
        host = torch.empty(tokens_dev.shape, dtype=tokens_dev.dtype, pin_memory=True)
        host.copy_(tokens_dev, non_blocking=True)  # queued now: ahead of any later launch
        event = torch.cuda.Event()
        event.record()
        return cls(chunks=chunks, tokens_dev=tokens_dev, host=host, event=event)

    @property
    def chainable(self) -> bool:
        """Its tokens can feed the next step on the device (a greedy decode batch)."""
        return self.tokens_dev is not None

    def wait(self) -> list[int]:
        if self.tokens is None:
            if self.event is not None:
                self.event.synchronize()
                self.tokens = self.host.tolist()
            else:
                self.tokens = self.tokens_dev.tolist()
        return self.tokens


def _plain_decode(c: ScheduledChunk) -> bool:
    """A one-token decode of a greedy request that wants nothing but its token."""
    r = c.request
    return (c.num_tokens == 1 and c.start >= r.prompt_len and r.sampling.greedy and not r.want_logits
            and r.top_logprobs is None and r.forced is None and r.kv is None)


class ModelRunner(RunnerMedia):
    def __init__(self, model: MultimodalLM, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype, max_vision_patches: int = 65536) -> None:
        self.model = model
        self.device, self.dtype = device, dtype
        self.block_size = block_size
        self.max_vision_patches = max_vision_patches
        kv = model.kv_spec
        # one preallocated pool: (layers, 2, blocks + 1, block_size, kv_heads, head_dim); the
        # extra block is scratch space for the padding rows of CUDA-graph batches
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, block_size, kv.num_kv_heads, kv.head_dim)
        self.kv_pool = torch.zeros((kv.num_layers, 2) + shape, dtype=dtype, device=device)
        self.kv_caches = [(self.kv_pool[i, 0], self.kv_pool[i, 1]) for i in range(kv.num_layers)]
        self.keep_logits = False
        self.vision_offload = None  # VisionOffloader when the tower lives on the host while idle
        self.last_vision_s = 0.0  # vision time of the last step (kept out of prefill time)
        self.encoder_cache = None  # EncoderCache of vision embeddings per temporal patch; None: off
        self.last_encoded_tokens: list[int] = []  # per item of the last run_vision: tokens encoded
        self.vision_tokens_encoded = 0  # cumulative tokens the vision tower produced
        self._cache_holds: dict[int, tuple] = {}  # id(request) -> (request, encoder cache keys held)
        self.graphs = None  # DecodeGraphs, set by enable_cuda_graphs()
        self.vision_graphs = None  # VisionGraphs, set by enable_cuda_graphs() (capture needs CUDA)
        self.row_backend = None  # paged row kernel (layers/attention.RowBackend); None: reference path
        self.row_max_query = ROW_MAX_QUERY
        self.ahead: EncodeAhead | None = None  # media encoded ahead of their steps (enable_encode_ahead)
        self.main_stream: torch.cuda.Stream | None = None  # the engine loop's stream, with encode-ahead on CUDA
        if device.type == "cuda":
            from omnistream.layers.triton_decode import triton_paged_decode

            self.set_row_backend(triton_paged_decode)

    def set_row_backend(self, fn, max_query: int = ROW_MAX_QUERY) -> None:
        """Row kernel for the tokens of sequences of at most max_query new tokens (decodes and
        short chunks; see batch_order). None: the reference path for every sequence (the CPU
        default, which the exactness tests rely on)."""
        self.row_backend, self.row_max_query = fn, max_query
        for layer in self.model.model.layers:
            layer.self_attn.row_backend = fn

    set_decode_backend = set_row_backend  # the earlier name (decodes were the only rows)

    def enable_cuda_graphs(self, max_context: int, max_rows: int | None = None, use_graphs: bool = True,
                           vision_patches: int | None = None) -> None:
        """Row-batch steps (decodes, chunks of up to max_rows tokens) through DecodeGraphs, and
        recurring vision inputs of up to vision_patches patches through VisionGraphs (sizes:
        engine/graph_limits.py); use_graphs=False runs the row path without capture (how the
        CPU tests check it)."""
        from omnistream.engine.cuda_graphs import MAX_ROWS, DecodeGraphs

        max_blocks = min(self.scratch_block, (max_context + self.block_size - 1) // self.block_size)
        self.graphs = DecodeGraphs(self, max_rows or MAX_ROWS, max_blocks, self.scratch_block, use_graphs)
        self.graphs.capture()
        if use_graphs:
            from omnistream.engine.vision_graphs import VisionGraphs

            self.vision_graphs = VisionGraphs(self.model.media_encoder("video"), vision_patches)

    @torch.inference_mode()
    def move_kv(self, src: torch.Tensor, dst: torch.Tensor, chunk: int = 2048) -> None:
        """Copy the K/V of cache slots src (S,) to slots dst (S,), every layer, in place (live
        policy `fast` closing or opening a gap). Runs in chunks (bounded scratch); the order of
        chunks makes overlapping moves safe when every dst < src (left) or every dst > src."""
        flat = self.kv_pool.view(self.kv_pool.shape[0], 2, -1, *self.kv_pool.shape[-2:])  # (L, 2, slots, KVH, D)
        starts = list(range(0, len(src), chunk))
        if len(src) and int(dst[0]) > int(src[0]):
            starts.reverse()  # moving right: last chunk first
        for s in starts:
            d, f = dst[s : s + chunk].to(self.device), src[s : s + chunk].to(self.device)
            flat[:, :, d] = flat[:, :, f]

    def enable_encode_ahead(self, max_tokens: int, slice_rows: int | None = None) -> EncodeAhead:
        """Media encoded before their steps (engine/encode_ahead.py). On CUDA the vision tower
        gets a low-priority stream of its own and the engine loop a high-priority one (the loop
        thread makes it current: enter_loop_thread); sliced (slice_rows), a few blocks per step
        on the engine's stream."""
        side = None
        if self.device.type == "cuda" and slice_rows is None:
            # out-of-range priorities map to the nearest valid one: the lowest, the highest
            side = torch.cuda.Stream(self.device, priority=100)
            self.main_stream = torch.cuda.Stream(self.device, priority=-100)
        self.ahead = EncodeAhead(self, side, max_tokens, slice_rows)
        return self.ahead

    def enter_loop_thread(self) -> None:
        """Called once by the thread that runs every step: its GPU work goes to main_stream."""
        if self.main_stream is not None:
            torch.cuda.synchronize(self.device)  # what the constructing thread queued is done
            torch.cuda.set_stream(self.main_stream)

    @staticmethod
    def kv_bytes_per_token(model: MultimodalLM, dtype: torch.dtype) -> int:
        return model.kv_spec.bytes_per_token(dtype)

    # ---------------------------------------------------------------- batch
    @staticmethod
    def media_rows(chunks: list[ScheduledChunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Rows of the flat batch (chunks in order) that hold media placeholders (M,) on the
        host, and their embeddings (M, hidden) on the device; (None, None) without media."""
        rows, embeds, row = [], [], 0
        for c in chunks:
            req, s, n = c.request, c.start, c.num_tokens
            for j, (off, item) in enumerate(req.media):
                lo, hi = max(off, s), min(off + item.num_tokens, s + n)
                if lo < hi:
                    rows.append(torch.arange(row + lo - s, row + hi - s))
                    embeds += _patch_rows(req.mm_embeds[j], item.tokens_per_temporal_patch, lo - off, hi - off)
            row += n
        if not rows:
            return None, None
        return torch.cat(rows), (embeds[0] if len(embeds) == 1 else torch.cat(embeds))

    def batch_order(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], int]:
        """-> (chunks in batch order, how many lead as rows). With a row backend the short
        chunks (query <= row_max_query: decodes, follow-up questions, live patches) lead and
        become rows of one kernel launch; the long ones follow, one flash SDPA call each
        (few per step, and their GPU time hides the loop). Without one: as scheduled, no rows."""
        if self.row_backend is None:
            return chunks, 0
        short = [c for c in chunks if c.num_tokens <= self.row_max_query]
        if len(short) == len(chunks):
            return chunks, len(chunks)
        return short + [c for c in chunks if c.num_tokens > self.row_max_query], len(short)

    def prepare(self, out: SchedulerOutput) -> ForwardBatch:
        chunks, num_row_seqs = self.batch_order(out.chunks)
        ids, pos, slots, qlens, ctxs, last_row = [], [], [], [], [], {}
        bs = self.block_size
        width = max(len(c.request.block_table) for c in chunks)
        tables = torch.full((len(chunks), width), self.scratch_block, dtype=torch.long)  # (B, W)
        for i, c in enumerate(chunks):
            req, s, n = c.request, c.start, c.num_tokens
            ids.extend(req.token_ids[s : s + n])
            pos.append(req.positions_for(s, s + n))
            table = torch.tensor(req.block_table, dtype=torch.long)
            tables[i, : len(table)] = table
            idx = torch.arange(s, s + n)
            slots.append(table[idx // bs] * bs + idx % bs)
            qlens.append(n)
            ctxs.append(s + n)
            last_row[id(c)] = len(ids) - 1
        dev = self.device
        mm_rows, mm_embeds = self.media_rows(chunks)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev),
            query_lens=qlens,
            context_lens=ctxs,
            block_tables=list(tables.to(dev).unbind(0)),  # one copy, per-sequence views
        )
        if num_row_seqs:
            starts = [c.start for c in chunks[:num_row_seqs]]
            row_tables, row_lens = row_layout(tables[:num_row_seqs], starts, qlens[:num_row_seqs])
            meta.row_block_tables, meta.row_context_lens = row_tables.to(dev), row_lens.to(dev)
            meta.num_row_seqs = num_row_seqs
            if len(row_lens) > num_row_seqs:  # some chunk has several rows: runs share a context pass
                meta.row_tiles = row_tiles(qlens[:num_row_seqs], TILE_ROWS).to(dev)
        sampled = [c for c in out.chunks if c.samples]  # in scheduled order, whatever the batch order
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.cat(pos, dim=1).to(dev),
            mm_rows=None if mm_rows is None else mm_rows.to(dev),
            mm_embeds=mm_embeds,
            meta=meta,
            sample_rows=torch.tensor([last_row[id(c)] for c in sampled], dtype=torch.long, device=dev),
            sample_chunks=sampled,
        )

    # ---------------------------------------------------------------- step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[tuple[ScheduledChunk, int]]:
        """Runs one step; returns (chunk, sampled token) for every chunk that samples."""
        return self.collect(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: "LaunchedStep | None" = None) -> "LaunchedStep":
        """Queues one step on the device. Greedy decode steps keep their tokens on the device
        (copied to pinned host memory behind an event), so the next step can be launched before
        they are read; others sample here. prev: the step whose device tokens are the inputs of
        this one's pending rows (ScheduledChunk.pending)."""
        if self.ahead is not None:
            self.ahead.sync_main_for(out.chunks)
        vision = self.encode_media(out.chunks)
        graphed = self.graphs is not None and self.graphs.can_run(out)
        if graphed:
            logits, chunks = self.graphs.run(out, None if prev is None else (prev.tokens_dev, prev.chunks))
        else:
            assert prev is None, "pending rows run only through the row-batch (graph) path"
            batch = self.prepare(out)
            embeds = self.model.embed(batch.input_ids, batch.mm_rows, batch.mm_embeds)
            hidden = self.model(embeds, batch.positions, self.kv_caches, batch.meta)
            logits = self.model.compute_logits(hidden[batch.sample_rows])
            chunks = batch.sample_chunks
        for c in out.chunks:  # a prompt computed in this step needs its media no more
            if c.request.media and c.start < c.request.prompt_len <= c.start + c.num_tokens:
                self.release(c.request)
        if not chunks:
            return LaunchedStep(chunks=[], tokens=[], vision=vision)
        logits = logits.float()  # (S, vocab)
        reqs = [c.request for c in chunks]
        if graphed and not self.keep_logits and all(_plain_decode(c) for c in chunks):
            step = LaunchedStep.on_device(chunks, logits.argmax(dim=-1))  # what sample() gives greedy rows
            step.vision = vision
            return step
        self._keep_logits(reqs, logits)
        tokens = sample(logits, [r.sampling for r in reqs], [r.generator for r in reqs])
        self._logprobs(reqs, logits, tokens)
        return LaunchedStep(chunks=chunks, tokens=tokens, vision=vision)

    def collect(self, step: "LaunchedStep") -> list[tuple[ScheduledChunk, int]]:
        """Waits for a launched step's tokens (only that step: later launches keep running);
        its vision time is then known (last_vision_s, and each request's share)."""
        tokens = step.wait()
        self.last_vision_s = step.vision.resolve() if step.vision is not None else 0.0
        return list(zip(step.chunks, tokens))

    def _keep_logits(self, reqs: list, logits: torch.Tensor) -> None:
        """req.logits += the sampled row (vocab,) on the host, for the requests that want them
        (req.want_logits, or every request while the runner-wide keep_logits is set)."""
        keep = [i for i, r in enumerate(reqs) if self.keep_logits or getattr(r, "want_logits", False)]
        if not keep:
            return
        host = logits[keep].cpu()  # one copy for the batch; each request keeps its own row
        for row, i in zip(host, keep):
            r = reqs[i]
            if r.logits is None:
                r.logits = []
            r.logits.append(row.clone())

    def _logprobs(self, reqs: list, logits: torch.Tensor, tokens: list[int]) -> None:
        """req.logprobs += (logprob of the sampled token, [(id, logprob)] top k, highest first)
        for requests with req.top_logprobs = k (None: none); from the float logits (S, vocab)
        before temperature / top-k / top-p. One log_softmax + topk over the rows that ask."""
        ask = [(i, r.top_logprobs) for i, r in enumerate(reqs) if getattr(r, "top_logprobs", None) is not None]
        if not ask:
            return
        rows = torch.tensor([i for i, _ in ask], device=logits.device)
        lp = torch.log_softmax(logits[rows], dim=-1)  # (A, vocab)
        chosen = lp.gather(1, torch.tensor([tokens[i] for i, _ in ask], device=lp.device)[:, None])[:, 0].tolist()
        kmax = min(max(k for _, k in ask), lp.shape[1])
        top = lp.topk(kmax, dim=-1)  # sorted, highest first; k = 0 gives empty rows
        top_lp, top_ids = top.values.tolist(), top.indices.tolist()
        for a, (i, k) in enumerate(ask):
            r = reqs[i]
            if getattr(r, "logprobs", None) is None:
                r.logprobs = []
            r.logprobs.append((chosen[a], list(zip(top_ids[a][:k], top_lp[a][:k]))))

    def _now(self) -> float:
        """The clock once this thread's stream has run what was queued (only that stream: the
        vision tower's side stream may keep encoding ahead meanwhile)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter()


def _patch_rows(patches: list[torch.Tensor], tpp: int, a: int, b: int) -> list[torch.Tensor]:
    """Rows [a, b) of an item whose embeddings are per temporal patch (tpp, hidden) tensors
    -> the slices (views) that cover them, in order."""
    return [patches[k][max(a, k * tpp) - k * tpp : min(b, (k + 1) * tpp) - k * tpp]
            for k in range(a // tpp, (b - 1) // tpp + 1)]
