"""Model runner: turns a SchedulerOutput into one forward pass and sampled tokens.

Data flow of a step:
  SchedulerOutput (chunks) -> encode the temporal patches the chunks cover (one vision forward)
    -> ForwardBatch: flat token ids (N,), positions (3, N), media rows, cache slots, metadata
       (short chunks first: their tokens are rows of one paged row-kernel launch)
    -> decoder forward over the paged KV cache -> logits of the rows that sample -> tokens
       (+ per request: host logits, logprobs)

Steps of few tokens on the GPU replay a CUDA graph captured per row-count bucket.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Generator

import torch

from omnistream.cache.encoder_cache import VisionPlan, temporal_slice
from omnistream.engine.sampling import sample
from omnistream.engine.scheduler import ScheduledChunk, SchedulerOutput
from omnistream.engine.cuda_graphs import TILE_ROWS
from omnistream.engine.encode_ahead import EncodeAhead
from omnistream.engine.vision_timing import VisionTiming
from omnistream.layers.attention import AttentionMetadata, row_layout, row_tiles
from omnistream.models.interface import MultimodalLM
from omnistream.stepwise import drain

log = logging.getLogger(__name__)

# chunks of at most this many new tokens run as rows of the paged row kernel (one query token
# each); longer ones through flash SDPA, whose one pass over the context beats R row passes
ROW_MAX_QUERY = 128
UPLOAD_ROWS = 2048  # pixel rows per host-to-device copy of a sliced encode (2.4 MB of uint8 at 448 px)


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


class ModelRunner:
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

    # ---------------------------------------------------------------- media
    def encode_media(self, chunks: list[ScheduledChunk]) -> VisionTiming | None:
        """Encode (in one vision forward, split at max_vision_patches) the temporal patches
        that this step's chunks cover and that have no embeddings yet. A chunk over tokens
        [s, s + n) of a request needs, of each item it overlaps, only the patches holding those
        tokens: a long video is encoded a few patches per step, as its prompt is computed
        (lossless: the tower never attends across temporal patches; images are one patch).
        Per request, req.mm_embeds[j] is then a list of per-patch (tpp, hidden) tensors (None:
        not encoded yet), freed once the prompt is computed. Returns the encode's timing (None:
        nothing to encode), read when the step is (collect)."""
        self._sweep_holds()
        todo = []  # (request, item index, first patch, temporal slice to encode)
        for c in chunks:
            todo += self._missing_patches(c)
        if not todo:
            return None
        side = self.ahead is not None and self.ahead.stream is not None
        with self.ahead.on_side_stream() if self.ahead is not None else contextlib.nullcontext():  # encode_ahead.py: Safety
            timing = VisionTiming.start(self.device)
            encoded_patches = self.run_vision_patches([sub for *_, sub in todo])
            timing.stop([(req, n) for (req, *_), n in zip(todo, self.last_encoded_tokens)])
        if side:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.ahead.stream)
            for p in encoded_patches:
                for t in p:
                    t.record_stream(main)
        for (req, j, k0, _), patches in zip(todo, encoded_patches):
            req.mm_embeds[j][k0 : k0 + len(patches)] = patches
        return timing

    def _missing_patches(self, c: ScheduledChunk) -> list[tuple]:
        """Runs of consecutive temporal patches that chunk c covers and that are not encoded
        -> [(request, item index, first patch, temporal slice)]. An item's embeddings list is
        made (and its cache entries acquired) when a chunk first reaches it."""
        req, s, e = c.request, c.start, c.start + c.num_tokens
        todo = []
        for j, (off, item) in enumerate(req.media):
            if off >= e or off + item.num_tokens <= s:
                continue
            if req.mm_embeds[j] is None:
                req.mm_embeds[j] = [None] * item.grid_thw[0]
                self._hold(req, item)
            patches, tpp = req.mm_embeds[j], item.tokens_per_temporal_patch
            k, k_end = (max(s, off) - off) // tpp, (min(e, off + item.num_tokens) - off - 1) // tpp + 1
            while k < k_end:
                if patches[k] is not None:
                    k += 1
                    continue
                k1 = k + 1
                while k1 < k_end and patches[k1] is None:
                    k1 += 1
                todo.append((req, j, k, temporal_slice(item, k, k1)))
                k = k1
        return todo

    def _hold(self, req, item) -> None:
        """A request references its items' cache entries until its prompt is computed, so its
        own inserts (and others') never evict the patches it still needs."""
        if self.encoder_cache is not None and item.patch_hashes:
            self.encoder_cache.acquire(item.patch_hashes)
            self._cache_holds.setdefault(id(req), (req, []))[1].extend(item.patch_hashes)

    def release(self, req) -> None:
        """The request's prompt is computed, or it ended: its media embeddings are dropped (a
        preempted request recomputing its prompt encodes again, or hits the encoder cache) and
        its encoder-cache entries are no longer held for it."""
        if req.media:
            req.mm_embeds = [None] * len(req.media)
        held = self._cache_holds.pop(id(req), None)
        if held is not None and self.encoder_cache is not None:
            self.encoder_cache.release(held[1])

    def _sweep_holds(self) -> None:
        """Releases the requests that ended (or finished their prompt) without `release`."""
        for req, _ in list(self._cache_holds.values()):
            if req.finished or req.num_computed_tokens >= req.prompt_len:
                self.release(req)

    @torch.inference_mode()
    def run_vision(self, items) -> list[torch.Tensor]:
        """-> per item (num_tokens, hidden)."""
        return [p[0] if len(p) == 1 else torch.cat(p) for p in self.run_vision_patches(items)]

    @torch.inference_mode()
    def run_vision_patches(self, items) -> list[list[torch.Tensor]]:
        """-> per item, per temporal patch (tokens_per_temporal_patch, hidden)."""
        if self.vision_offload is None:
            return self._run_vision(items)
        with self.vision_offload.on_device():
            return self._run_vision(items)

    def _run_vision(self, items) -> list[list[torch.Tensor]]:
        patches, self.last_encoded_tokens = drain(self.vision_steps(items, sliced=False))
        return patches

    def vision_steps(self, items, sliced: bool = True) -> Generator[None, None, tuple[list[list[torch.Tensor]], list[int]]]:
        """run_vision_patches as a generator: with `sliced`, it yields after every encoder block
        (engine/encode_ahead.py spreads a clip over decode steps; eager, no vision graphs) ->
        (per item, per temporal patch embeddings; tokens encoded per item). The caller runs it
        under inference mode, with the tower on the device (no vision offload).

        Items are grouped up to max_vision_patches patches per forward (lossless: attention
        never crosses items or temporal slices). With an encoder cache, only the temporal
        patches it misses are encoded (runs of consecutive missing patches become sub-items)
        and the new ones are inserted."""
        plan = VisionPlan(self.encoder_cache, items) if self.encoder_cache is not None else None
        todo = plan.to_encode if plan is not None else items
        out: list[torch.Tensor | None] = [None] * len(todo)
        # one forward per encoder (a video with its sound alternates video and audio pieces
        # every 2 s: grouping only neighbours cost one forward per piece), in item order within it
        by_encoder: dict[int, list[int]] = {}
        for i, item in enumerate(todo):
            by_encoder.setdefault(id(self.model.media_encoder(item.kind)), []).append(i)
        for indices in by_encoder.values():
            group, count = [], 0
            for i in indices:
                n = todo[i].pixel_values.shape[0]
                if group and count + n > self.max_vision_patches:
                    yield from self._encode_group(todo, group, out, sliced)
                    group, count = [], 0
                group.append(i)
                count += n
            yield from self._encode_group(todo, group, out, sliced)
        encoded = plan.encoded_tokens if plan is not None else [it.num_tokens for it in items]
        self.vision_tokens_encoded += sum(encoded)
        if plan is not None:
            return plan.finish_patches(out), encoded
        return [list(e.split(it.tokens_per_temporal_patch)) for e, it in zip(out, items)], encoded

    def _encode_group(self, todo: list, indices: list[int], out: list, sliced: bool) -> Generator[None, None, None]:
        """Items todo[i] (i in indices, one encoder) in one forward -> out[i]."""
        for i, emb in zip(indices, (yield from self._vision_group([todo[i] for i in indices], sliced))):
            out[i] = emb

    def _vision_group(self, items, sliced: bool) -> Generator[None, None, list[torch.Tensor]]:
        grids, kind = [it.grid_thw for it in items], items[0].kind
        emb = None
        if sliced:
            pixels = yield from self._device_pixels_steps([it.pixel_values for it in items])
            steps = self.model.encode_media_steps(pixels, grids, kind)
            del pixels  # held by the tower's generator until its patch embedding, not for its life
            emb = yield from steps
        else:
            pixels = self._device_pixels([it.pixel_values for it in items])
            graphed = self.vision_graphs is not None and self.vision_graphs.visual is self.model.media_encoder(kind)
            if graphed and self.vision_offload is None:  # offload moves the weights
                emb = self.vision_graphs.run(pixels, grids)
            if emb is None:
                emb = self.model.encode_media(pixels, grids, kind)
        return list(emb.split([it.num_tokens for it in items]))

    def _device_pixels_steps(self, rows: list[torch.Tensor]) -> Generator[None, None, torch.Tensor]:
        """_device_pixels for a sliced encode: rows of one dtype go to the device UPLOAD_ROWS at a
        time, one piece per yield, straight into one device tensor (a 16-patch group's 19 MB of
        uint8 copied from pageable memory in one piece held the engine loop ~15 ms in its step:
        H200, 3B); mixed dtypes at once."""
        if len({r.dtype for r in rows}) != 1:
            return self._device_pixels(rows)
        out = torch.empty((sum(r.shape[0] for r in rows), rows[0].shape[1]), dtype=rows[0].dtype, device=self.device)
        at = 0
        for r in rows:
            for a in range(0, r.shape[0], UPLOAD_ROWS):
                piece = r[a : a + UPLOAD_ROWS]
                out[at : at + piece.shape[0]].copy_(piece, non_blocking=True)
                at += piece.shape[0]
                yield
        return self.model.prepare_pixels(out, self.dtype)

    def _device_pixels(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Host rows of one encoder's items ((P_i, row) uint8 raw or float normalised) -> (P, row)
        prepared on the device. Copied as they are and normalised / cast there: the host never
        touches the pixels twice. Rows of one dtype are concatenated on the host (one copy);
        mixed ones are prepared apart, since torch.cat would promote raw uint8 rows to float
        values that nothing normalises."""
        def prepare(x: torch.Tensor) -> torch.Tensor:
            return self.model.prepare_pixels(x.to(self.device, non_blocking=True), self.dtype)

        if len({r.dtype for r in rows}) == 1:
            return prepare(rows[0] if len(rows) == 1 else torch.cat(rows))
        return torch.cat([prepare(r) for r in rows])

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
