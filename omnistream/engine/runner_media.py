"""The model runner's media half: the temporal patches a step's chunks cover, encoded (with the
encoder cache, grouped up to max_vision_patches rows per forward), whole in the step or a block
at a time for a sliced encode-ahead (engine/encode_ahead.py), and the holds on encoder-cache
entries a request keeps until its prompt is computed.

ModelRunner (engine/model_runner.py) inherits this; the attributes used here are the runner's:
model, device, dtype, ahead, encoder_cache, vision_graphs, vision_offload, max_vision_patches,
last_encoded_tokens, vision_tokens_encoded, _cache_holds.
"""

from __future__ import annotations

import contextlib
from typing import Generator

import torch

from omnistream.cache.encoder_cache import VisionPlan, temporal_slice
from omnistream.engine.scheduler import ScheduledChunk
from omnistream.engine.vision_timing import VisionTiming
from omnistream.stepwise import drain

UPLOAD_ROWS = 2048  # pixel rows per host-to-device copy of a sliced encode (2.4 MB of uint8 at 448 px)


class RunnerMedia:
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
