"""Model runner: turns a SchedulerOutput into one forward pass and sampled tokens.

Data flow of a step:
  SchedulerOutput (chunks) -> encode media the chunks need (one vision forward)
    -> ForwardBatch: flat token ids (N,), positions (3, N), media rows, cache slots, metadata
    -> decoder forward over the paged KV cache -> logits of the rows that sample -> tokens

Pure-decode steps on the GPU replay a CUDA graph captured per batch-size bucket.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from omnistream.cache.encoder_cache import VisionPlan
from omnistream.engine.sampling import sample
from omnistream.engine.scheduler import ScheduledChunk, SchedulerOutput
from omnistream.layers.attention import AttentionMetadata
from omnistream.models.interface import MultimodalLM

log = logging.getLogger(__name__)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (N,) long
    positions: torch.Tensor  # (3, N) long
    mm_rows: torch.Tensor | None  # (M,) rows of the batch holding media embeddings
    mm_embeds: torch.Tensor | None  # (M, hidden)
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # (S,) rows whose logits are sampled
    sample_chunks: list[ScheduledChunk]  # the chunk of each sampled row


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
        self.decode_backend = None
        if device.type == "cuda":
            from omnistream.layers.triton_decode import triton_paged_decode

            self.set_decode_backend(triton_paged_decode)

    def set_decode_backend(self, fn) -> None:
        """Kernel for steps where every sequence adds one token (None: the reference path)."""
        self.decode_backend = fn
        for layer in self.model.model.layers:
            layer.self_attn.decode_backend = fn

    def enable_cuda_graphs(self, max_context: int, max_rows: int | None = None, use_graphs: bool = True) -> None:
        """Row-batch steps (decodes, chunks of up to max_rows tokens) through DecodeGraphs;
        use_graphs=False runs the same path without capture (how the CPU tests check it)."""
        from omnistream.engine.cuda_graphs import MAX_ROWS, DecodeGraphs

        max_blocks = min(self.scratch_block, (max_context + self.block_size - 1) // self.block_size)
        self.graphs = DecodeGraphs(self, max_rows or MAX_ROWS, max_blocks, self.scratch_block, use_graphs)
        self.graphs.capture()
        if use_graphs:
            from omnistream.engine.vision_graphs import VisionGraphs

            self.vision_graphs = VisionGraphs(self.model.media_encoder("video"))

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

    def release(self, req) -> None:
        """A request ended: its encoder-cache entries are no longer held for it."""
        held = self._cache_holds.pop(id(req), None)
        if held is not None and self.encoder_cache is not None:
            self.encoder_cache.release(held[1])

    @staticmethod
    def kv_bytes_per_token(model: MultimodalLM, dtype: torch.dtype) -> int:
        return model.kv_spec.bytes_per_token(dtype)

    # ---------------------------------------------------------------- media
    def encode_media(self, chunks: list[ScheduledChunk]) -> None:
        """Encode (in one vision forward, split at max_vision_patches) every media item that
        this step's chunks overlap and that has no embeddings yet."""
        self.last_vision_s = 0.0
        cache = self.encoder_cache
        if cache is not None:  # a request references its cache entries until its prompt is computed
            for key, (req, keys) in list(self._cache_holds.items()):
                if req.finished or req.num_computed_tokens >= req.prompt_len:
                    cache.release(keys)
                    del self._cache_holds[key]
        todo = []
        for c in chunks:
            req = c.request
            for j, (off, item) in enumerate(req.media):
                if req.mm_embeds[j] is None and off < c.start + c.num_tokens and off + item.num_tokens > c.start:
                    todo.append((req, j, item))
        if not todo:
            return
        if cache is not None:
            for req, _, item in todo:
                if item.patch_hashes:
                    cache.acquire(item.patch_hashes)
                    self._cache_holds.setdefault(id(req), (req, []))[1].extend(item.patch_hashes)
        t0 = self._now()
        embeds = self.run_vision([item for _, _, item in todo])
        encoded = self.last_encoded_tokens
        total = sum(encoded)
        elapsed = self._now() - t0 if total else 0.0  # only real encoding counts as vision time
        self.last_vision_s = elapsed
        for (req, j, item), e, n in zip(todo, embeds, encoded):
            req.mm_embeds[j] = e
            if total:
                req.metrics.vision_encode_s += elapsed * n / total

    @torch.inference_mode()
    def run_vision(self, items) -> list[torch.Tensor]:
        if self.vision_offload is None:
            return self._run_vision(items)
        with self.vision_offload.on_device():
            return self._run_vision(items)

    def _run_vision(self, items) -> list[torch.Tensor]:
        """-> per item (num_tokens, hidden). Items are grouped up to max_vision_patches patches
        per forward (lossless: attention never crosses items or temporal slices). With an
        encoder cache, only the temporal patches it misses are encoded (runs of consecutive
        missing patches become sub-items) and the new ones are inserted."""
        plan = VisionPlan(self.encoder_cache, items) if self.encoder_cache is not None else None
        out, group, count = [], [], 0
        for item in plan.to_encode if plan is not None else items:
            n = item.pixel_values.shape[0]
            if group and count + n > self.max_vision_patches:
                out += self._vision_group(group)
                group, count = [], 0
            group.append(item)
            count += n
        if group:
            out += self._vision_group(group)
        self.last_encoded_tokens = plan.encoded_tokens if plan is not None else [it.num_tokens for it in items]
        self.vision_tokens_encoded += sum(self.last_encoded_tokens)
        return plan.finish(out) if plan is not None else out

    def _vision_group(self, items) -> list[torch.Tensor]:
        rows = [it.pixel_values for it in items]
        pixels = rows[0] if len(rows) == 1 else torch.cat(rows)  # (P, 1176) float32 or uint8 on the host
        # copy as they are, normalise (raw uint8 rows) and cast on the device: the host never
        # touches the pixels twice
        pixels = self.model.prepare_pixels(pixels.to(self.device, non_blocking=True), self.dtype)
        grids = [it.grid_thw for it in items]
        emb = None
        if self.vision_graphs is not None and self.vision_offload is None:  # offload moves the weights
            emb = self.vision_graphs.run(pixels, grids)
        if emb is None:
            emb = self.model.encode_media(pixels, grids)
        return list(emb.split([it.num_tokens for it in items]))

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
                    embeds.append(req.mm_embeds[j][lo - off : hi - off])
            row += n
        if not rows:
            return None, None
        return torch.cat(rows), (embeds[0] if len(embeds) == 1 else torch.cat(embeds))

    def prepare(self, out: SchedulerOutput) -> ForwardBatch:
        ids, pos, slots, tables = [], [], [], []
        qlens, ctxs, sample_rows, sample_chunks = [], [], [], []
        row = 0
        bs = self.block_size
        for c in out.chunks:
            req, s, n = c.request, c.start, c.num_tokens
            ids.extend(req.token_ids[s : s + n])
            pos.append(req.positions_for(s, s + n))
            table = torch.tensor(req.block_table, dtype=torch.long)
            idx = torch.arange(s, s + n)
            slots.append(table[idx // bs] * bs + idx % bs)
            tables.append(table)
            qlens.append(n)
            ctxs.append(s + n)
            row += n
            if c.samples:
                sample_rows.append(row - 1)
                sample_chunks.append(c)
        dev = self.device
        mm_rows, mm_embeds = self.media_rows(out.chunks)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev),
            query_lens=qlens,
            context_lens=ctxs,
            block_tables=[t.to(dev) for t in tables],
        )
        if self.decode_backend is not None and all(n == 1 for n in qlens):
            width = max(len(t) for t in tables)
            padded = torch.full((len(tables), width), self.scratch_block, dtype=torch.int32)
            for i, t in enumerate(tables):
                padded[i, : len(t)] = t
            meta.decode_block_tables = padded.to(dev)
            meta.decode_context_lens = torch.tensor(ctxs, dtype=torch.int32, device=dev)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.cat(pos, dim=1).to(dev),
            mm_rows=None if mm_rows is None else mm_rows.to(dev),
            mm_embeds=mm_embeds,
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
            sample_chunks=sample_chunks,
        )

    # ---------------------------------------------------------------- step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[tuple[ScheduledChunk, int]]:
        """Runs one step; returns (chunk, sampled token) for every chunk that samples."""
        self.encode_media(out.chunks)
        if self.graphs is not None and self.graphs.can_run(out):
            logits, chunks = self.graphs.run(out)
        else:
            batch = self.prepare(out)
            embeds = self.model.embed(batch.input_ids, batch.mm_rows, batch.mm_embeds)
            hidden = self.model(embeds, batch.positions, self.kv_caches, batch.meta)
            logits = self.model.compute_logits(hidden[batch.sample_rows])
            chunks = batch.sample_chunks
        if not chunks:
            return []
        logits = logits.float()
        reqs = [c.request for c in chunks]
        for r, row in zip(reqs, logits):
            if self.keep_logits or r.want_logits:
                r.logits = (r.logits or []) + [row.cpu()]
        tokens = sample(logits, [r.sampling for r in reqs], [r.generator for r in reqs])
        self._record_logprobs(reqs, logits, tokens)
        return list(zip(chunks, tokens))

    @staticmethod
    def _record_logprobs(reqs, logits: torch.Tensor, tokens: list[int]) -> None:
        """For the rows that ask: the sampled token's logprob and the top-k alternatives, from
        the raw logits (before temperature / top-p), one log_softmax over those rows."""
        rows = [i for i, r in enumerate(reqs) if r.top_logprobs is not None]
        if not rows:
            return
        lp = torch.log_softmax(logits[rows], dim=-1)  # (R, vocab) float32
        k = max(reqs[i].top_logprobs for i in rows)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows], device=lp.device)[:, None])[:, 0]
        chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
        for j, i in enumerate(rows):
            n = reqs[i].top_logprobs
            reqs[i].logprobs.append((chosen[j], list(zip(top_i[j][:n], top_v[j][:n]))))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
