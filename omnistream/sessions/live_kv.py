"""A live session's own KV sequence, edited in place: the KV policy `fast`.

Token order in the KV is the context of policy `exact` (live.py):

    [ system + video turn start ][ patch ][ patch ] ... [ patch ][ video end + history ... ]
                                                                 ^ video_end: new patches go here

Edits move K/V between cache slots (one GPU copy per edit, no recompute):
  remove(patch): the patch's slots are closed up; later tokens move left keeping the K/V they
      were computed with (they had seen the patch) and their positions (RoPE is applied before
      K is cached, so a cached K carries its position).
  insert(patches): later tokens move right; the new patches are computed into the gap, seeing
      the prefix and the older patches but not the history after the gap. Their M-RoPE
      positions follow the same rule as the first video block: t = s + floor((ts - t0) * tps),
      h = s + row, w = s + col, with s and t0 of the block as first built.
Questions append at the end (positions after the largest so far) and see everything.

What this gives up against `exact` (the divergence `omnistream bench stream` measures): tokens
after an evicted patch keep K/V computed while it was visible, and the history never sees
patches that arrived after it. What it buys: adding or evicting a patch costs one patch of
compute, whatever the length of the context.

The blocks belong to the engine: this object keeps the sequence's token ids, positions and
patch spans, and asks the engine loop to edit the KV (named operations of engine/ops.py:
open_gap, close_gap, release_owned on the sequence owned by `owner`; requests with an OwnedKV
that compute into it). Operations and requests run in the loop in the order they are sent.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from omnistream.engine.protocol import EngineRequest, OwnedKV, RequestOutput
from omnistream.engine.sampling import SamplingParams
from omnistream.media.item import MediaItem

if TYPE_CHECKING:
    from omnistream.entrypoints.api import Engine

_ONE = SamplingParams(max_new_tokens=1, ignore_eos=True)  # a forward that only fills the KV


class LiveKV:
    def __init__(self, engine: "Engine", owner: str, tenant: str | None = None) -> None:
        self.engine = engine
        self.owner = owner  # the engine's name of the sequence (the session id)
        self.tenant = tenant
        self.ids: list[int] = []  # token ids in KV order; ids[:computed] have K/V
        self.pos = torch.zeros(3, 0, dtype=torch.long)  # (3, len(ids)) positions
        self.computed = 0
        self.next_pos = 0  # position of the next appended text token
        self.spans: dict[int, list[int]] = {}  # patch id -> [first token, tokens], time order
        self.video_end = 0  # token index after the last patch
        self.video_start = 0  # s: M-RoPE position of the video block's first token
        self.t0 = 0.0  # time of the block's first patch when built (temporal origin)
        self.model = engine.model  # positions follow the model's rule (interface.media_positions)
        self.tokens_per_second = engine.model.tokens_per_second
        self.video_token_id = engine.tokenizer.video_token_id
        self.edit_vision_s = 0.0  # cumulative vision / prefill seconds of build + insert
        self.edit_prefill_s = 0.0

    @property
    def blocks(self) -> list[int]:
        """The sequence's block table now (a copy, read by the loop)."""
        return self.engine.core.run_op("owned_blocks", self.owner)

    @property
    def built(self) -> bool:
        return bool(self.ids)

    @property
    def visual_tokens(self) -> int:
        return sum(n for _, n in self.spans.values())

    # ------------------------------------------------------------------ building
    def build(self, ids: list[int], video: tuple[int, MediaItem], patch_ids: list[int]) -> None:
        """Computes system + the video turn exactly (one ordinary forward), keeping its KV."""
        off, item = video
        positions, next_pos = self.model.positions(len(ids), [video])
        self._run(ids, [video], OwnedKV(self.owner, 0, positions, next_pos), _ONE)
        self.ids, self.pos = list(ids), positions
        self.computed, self.next_pos = len(ids), next_pos
        per = item.tokens_per_temporal_patch
        self.spans = {pid: [off + k * per, per] for k, pid in enumerate(patch_ids)}
        self.video_end = off + item.num_tokens
        self.video_start = int(positions[1, off])  # h row of the first video token is s + 0
        self.t0 = item.patch_times[0] if item.patch_times else 0.0

    # ------------------------------------------------------------------ edits
    def remove(self, patch_id: int) -> None:
        """Drop one patch's K/V; later tokens keep theirs (closed up, positions kept)."""
        a, n = self.spans.pop(patch_id)
        self.engine.core.run_op("close_gap", self.owner, a, n, self.computed)
        del self.ids[a : a + n]
        self.pos = torch.cat([self.pos[:, :a], self.pos[:, a + n :]], dim=1)
        self.computed -= n
        self.video_end -= n
        for span in self.spans.values():
            if span[0] > a:
                span[0] -= n

    def insert(self, patches: list[tuple[int, MediaItem]]) -> None:
        """Adds new patches (each a 1-patch video item, newer than every patch held) at the end
        of the video block and computes them; the history after them moves, unchanged."""
        if not patches:
            return
        newest = max(self.spans, default=-1)
        if any(pid <= newest for pid, _ in patches):
            raise ValueError("live KV: patches must be inserted in time order, after the newest held")
        a = self.video_end
        n = sum(item.num_tokens for _, item in patches)
        owner = self.owner
        self.engine.core.run_op("open_gap", owner, a, n, self.computed)  # BudgetError when the pool is full
        new_pos = torch.cat([self._patch_positions(item) for _, item in patches], dim=1)
        self.ids[a:a] = [self.video_token_id] * n
        self.pos = torch.cat([self.pos[:, :a], new_pos, self.pos[:, a:]], dim=1)
        for span in self.spans.values():
            if span[0] >= a:
                span[0] += n
        media, cursor = [], a
        for pid, item in patches:
            self.spans[pid] = [cursor, item.num_tokens]
            media.append((cursor, item))
            cursor += item.num_tokens
        self.video_end += n
        self._run(self.ids[: a + n], media, OwnedKV(owner, a, self.pos[:, : a + n], 0), _ONE)
        self.computed += n
        self.next_pos = max(self.next_pos, int(new_pos.max()) + 1)

    def _patch_positions(self, item: MediaItem) -> torch.Tensor:
        """(3, item.num_tokens): the block's rule with its original start and temporal origin."""
        pos = self.model.media_positions(item, self.video_start)  # t row = s here
        pos[0] += math.floor((item.patch_times[0] - self.t0) * self.tokens_per_second)
        return pos

    # ------------------------------------------------------------------ questions
    def ask(self, question_ids: list[int], end_of_turn, sampling: SamplingParams, *, return_logits: bool = False,
            logprobs: int | None = None, arrival: float | None = None) -> RequestOutput:
        """Appends a question (template tokens of the user turn + assistant header) and answers;
        the answer and `end_of_turn(answer)` tokens join the sequence."""
        handle, append = self.start_ask(question_ids, end_of_turn, sampling, return_logits=return_logits,
                                        logprobs=logprobs, arrival=arrival)
        return append(handle.result())

    def start_ask(self, question_ids: list[int], end_of_turn, sampling: SamplingParams, *, return_logits: bool = False,
                  logprobs: int | None = None, arrival: float | None = None):
        """ask() without waiting: (handle, append); append(result) joins question and answer to
        the sequence. An answer never appended (aborted) leaves the sequence as it was: its
        tokens past `computed` are overwritten by the next request."""
        q = len(question_ids)
        prompt = self.ids + list(question_ids)
        qpos = torch.arange(self.next_pos, self.next_pos + q).expand(3, -1)
        kv = OwnedKV(self.owner, self.computed, torch.cat([self.pos, qpos], dim=1), self.next_pos + q)
        handle = self.engine.submit(EngineRequest(prompt, [], sampling, cache_salt=self.tenant, kv=kv,
                                                  return_logits=return_logits, logprobs=logprobs, arrival=arrival))

        def append(res: RequestOutput) -> RequestOutput:
            tail = res.token_ids + end_of_turn(res.token_ids)
            self.ids = prompt + tail
            start = self.next_pos + q
            self.pos = torch.cat([self.pos, qpos, torch.arange(start, start + len(tail)).expand(3, -1)], dim=1)
            self.next_pos = start + len(tail)
            self.computed = len(prompt) + max(0, len(res.token_ids) - 1)  # the last sampled token is not in the KV
            return res

        return handle, append

    def close(self) -> None:
        try:
            self.engine.core.run_op("release_owned", self.owner)
        except Exception:  # noqa: BLE001 - the engine is closed: nothing to release
            pass
        self.ids, self.spans, self.computed = [], {}, 0

    # ------------------------------------------------------------------ internals
    def _run(self, ids, media, kv: OwnedKV, sampling: SamplingParams, *, return_logits: bool = False,
             logprobs: int | None = None, arrival: float | None = None) -> RequestOutput:
        res = self.engine.submit(EngineRequest(ids, media, sampling, cache_salt=self.tenant, kv=kv,
                                               return_logits=return_logits, logprobs=logprobs, arrival=arrival)).result()
        if media:  # build / insert: the work a later question may be charged with
            self.edit_vision_s += res.metrics.vision_encode_s
            self.edit_prefill_s += res.metrics.prefill_s
        return res
