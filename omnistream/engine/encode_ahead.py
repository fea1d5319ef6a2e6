"""Media encoded ahead of the steps that need it, on a side CUDA stream.

Without it, a step that reaches a request's media encodes the temporal patches its chunk
covers, in the step, on the one stream: while others decode, a step holds at most
`max_step_tokens_while_decoding` tokens, so a clip is encoded one 2-frame patch per step (a
1024-row vision forward runs at a third of the tower's efficiency at 32k rows) and every
running answer waits for it (H200, 3B: 16 streams went from 2.9 to 18.7 ms per token while a
64-frame clip was encoded; 32 concurrent 8-frame questions spent 1 s of vision in such steps).

Here the engine loop, before it schedules a step, launches the missing patches of the requests
that will need them (running prompts first, then the waiting queue in order), up to
`max_rows` pixel rows per forward, on a low-priority stream of their own; the decode and
prefill steps run on the engine's high-priority stream meanwhile (stream priorities let their
kernels take SMs first). A request's prompt is scheduled only up to its first media token whose
patch is not ready (Request.media_ready_until), so no step waits for the tower; a patch is
ready once the host has seen its group's event complete. Lossless: the same patches, encoded
by the same forward (the tower never attends across temporal patches or items), in larger
groups.

Measured (H200, 3B, this design as it stands; EngineConfig.encode_ahead is off by default): the
64-frame clip beside 16 streams had its vision at full-clip speed (105 ms instead of 283 ms in
one-patch steps, clip TTFT 490 instead of 648 ms), but the streams' inter-token p99 went from
23 to 58 ms; 32 concurrent 8-frame questions went from TTFT p99 1.9 s to 3.0 s. Likely causes,
not yet confirmed: the host launches a 16k-row eager forward (~600 kernels) and makes pageable
copies (several items' rows concatenated, the tower's index tables) inside the engine loop, so
no decode step is launched meanwhile; decode graphs captured at normal priority may not take
the main stream's priority; and under eager prefill steps at high priority the tower starves.
Correctness on the GPU (tools/gpu_encode_ahead_check.py against the in-step path, 4 clips + 4
texts at once): the demo architecture in float32 matched (logits within 8e-5, tokens equal); in
3B bf16 three clips were within bf16 noise (5.8e-2) but one clip's greedy tokens differed (max
row error 0.76: a divergence, or a fault; the first row's error was not recorded). Check that
before turning it on. What would make it pay: pinned, preallocated inputs and index tables (no host sync), the tower
in CUDA graphs per group size, and a policy that encodes ahead only while the main stream has
room (decodes), launching at most a few blocks per step.

Sliced (EngineConfig.vision_slice_rows): the same selection, but no side stream: the group's
forward runs on the engine's stream a few encoder blocks at a time (ModelRunner.vision_steps, a
generator that yields after every block), just before each decode step is launched, about
`vision_slice_rows` pixel rows x blocks per step for each request the group encodes for (the
pixels go up UPLOAD_ROWS rows per piece, the patch embedding is a piece of its own). A 64-frame
clip's tower then adds a bounded slice to every running answer's token instead of a 9 ms one-patch forward (H200, 3B, in-step
path) or a host-blocking launch of the whole clip. A step that carries more than
SLICE_MAX_PREFILL prompt tokens runs no blocks (both costs in one step would add up in every
running answer's inter-token time); while nothing decodes, the group in flight finishes at
once and the steps encode what they reach in one forward, as without encode-ahead. Lossless:
the same blocks over the same rows, in the same order; the group's hidden state (rows x width)
waits between steps. Its embeddings are ready for the step after its last block (same stream).
Measured (H200, 3B, bf16; results/h200-s7-*): the sliced embeddings equal the usual encode's
exactly (tools/gpu_slices_check.py); 16 text streams beside a 64-frame clip: inter-token p50
17.6 -> 4.3 ms, p99 21.5 -> 12.9 ms (what is left: the clip's 256-token chunks at up to 8k
context, 6 -> 9.7 ms steps; with 128-token chunks p99 8.0 ms), the clip's TTFT 634 -> 720 ms;
32 concurrent 8-frame questions: TTFT p99 1,665 -> 1,446 ms (1,605 in a second run).

Failures: a forward launched ahead that raises (a bad item, out of memory) is dropped and tried
once more; after a second failure its requests' media are left to the steps that reach them
(EncodeAhead.in_step), where the engine's isolation fails only a request whose media cannot be
encoded; the loop goes on. A sliced encode whose requests have all ended stops (ended()).

Safety: every vision forward of an engine with this on runs on the side stream (the in-step
path too, followed by a wait of the main stream), so encoder-cache hits and evictions are
ordered after the forwards that made them; embeddings made there and read on the main stream
are recorded on it (the allocator does not reuse their memory early); a step that still covers
a patch in flight waits for its group on the device.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Generator, Iterable

import torch

from omnistream.cache.encoder_cache import temporal_slice
from omnistream.engine.vision_timing import VisionTiming
from omnistream.stepwise import run_steps

log = logging.getLogger(__name__)

# sliced (see the module's note): a step with more prompt tokens than this runs no encoder
# blocks (the two together would add both costs to every running answer's token), unless it
# held the encode back this many steps in a row already
SLICE_MAX_PREFILL = 64
SLICE_MAX_SKIPS = 16
# a block of fewer rows than this costs about as much as one of this many (small forwards do
# not fill the GPU), when a step's share of blocks is counted
SLICE_MIN_ROWS = 4096


@dataclass(eq=False)
class _Group:
    """One vision forward launched ahead: its patches and the event that marks them done."""

    runs: list[tuple[object, int, int, int]]  # (request, item index, first patch, end patch)
    event: torch.cuda.Event | None  # None on the CPU (done at once)
    timing: VisionTiming
    keys: set[tuple[int, int, int]] = field(default_factory=set)  # (id(request), item, patch)
    recorded: bool = False  # its embeddings are recorded on the main stream
    # sliced: the forward's remaining blocks (ModelRunner.vision_steps; None once finished) and
    # its pixel rows (what a block costs)
    job: Generator | None = None
    rows: int = 0
    requests: int = 1  # distinct requests it encodes for

    def done(self) -> bool:
        return self.job is None and (self.event is None or self.event.query())


class EncodeAhead:
    def __init__(self, runner, stream: torch.cuda.Stream | None, max_tokens: int, slice_rows: int | None = None) -> None:
        self.runner = runner  # its max_vision_patches: pixel rows per forward launched ahead
        # media tokens encoded ahead and not yet computed, over all requests, at most (a long
        # video is encoded as its prompt advances, not all at once: its embeddings are held
        # until its chunks reach them)
        self.max_tokens = max_tokens
        self.stream = stream  # the side stream; None on the CPU or when sliced (the engine's stream)
        # sliced (see "Sliced" above): pixel rows x encoder blocks per decode step; None: off
        self.slice_rows = slice_rows
        self.inflight: list[_Group] = []
        self.pending: set[tuple[int, int, int]] = set()  # patches of groups in flight
        self.groups_launched = 0
        self.slices = 0  # steps that ran a piece of a sliced encode
        self._skipped = 0  # steps in a row that held back the sliced encode for their prefill
        # requests whose encode ahead failed twice: their steps encode their media themselves,
        # where a failing request fails alone (llm_engine's isolation), id -> request
        self.in_step: dict[int, object] = {}
        self._failed_once: dict[int, object] = {}  # requests whose encode ahead failed once (retried)
        self.failures = 0

    # ------------------------------------------------------------------ per step (engine loop)
    def step(self, requests: Iterable, start_of, decoding: bool = True) -> None:
        """Retires the groups that finished, launches the next one if none is in flight, and
        sets each request's media_ready_until. requests: running prompts then waiting ones, in
        the order they will be served; start_of(req): the token its next chunk starts at (for a
        waiting request, past the prefix the cache already holds). decoding: some answer is
        being decoded (sliced: otherwise nothing is held back, the steps encode what they reach)."""
        served = []
        for r in requests:
            if not r.media or r.finished:
                continue
            if id(r) in self.in_step:
                r.media_ready_until = None  # its steps encode its media
            else:
                served.append((r, start_of(r)))  # each start once: a waiting request's is a prefix-cache lookup
        self.poll()
        if self.slice_rows is not None and not decoding:
            self.advance(None)  # nobody waits for tokens: the encode in flight ends now, whole
            for r, _ in served:
                r.media_ready_until = None  # the steps encode in one forward what they reach
            return
        busy = self.inflight if self.slice_rows is None else [g for g in self.inflight if g.job is not None]
        if not busy:  # one forward at a time (sliced: one whose blocks still run)
            self._launch(served)
        for r, start in served:
            r.media_ready_until = self.ready_until(r, start)

    def ended(self, req) -> None:
        """The request ended (finished, aborted, failed): a sliced encode that served only ended
        requests stops here (its blocks would hold a share of every step, and keep its pixels and
        hidden state, for nobody); nothing is kept for it."""
        self.in_step.pop(id(req), None)
        self._failed_once.pop(id(req), None)
        for g in [g for g in self.inflight if g.job is not None and all(r.finished for r, *_ in g.runs)]:
            g.job.close()
            g.job = None
            self.inflight = [x for x in self.inflight if x is not g]
            self.pending -= g.keys

    def advance(self, prefill_tokens: int | None) -> None:
        """Sliced: runs the next blocks of the encode in flight on the engine's stream, just
        before a step is launched. prefill_tokens: the step's prompt tokens (a step with more
        than SLICE_MAX_PREFILL of them is left alone, at most SLICE_MAX_SKIPS steps in a row);
        None: the encode runs to its end now (nothing decodes)."""
        g = next((g for g in self.inflight if g.job is not None), None)
        if g is None:
            return
        blocks = 1 << 30
        if prefill_tokens is not None:
            if prefill_tokens > SLICE_MAX_PREFILL and self._skipped < SLICE_MAX_SKIPS:
                self._skipped += 1
                return
            # one share per request the group encodes for (each waits for its media as each
            # decode waits for its token: a burst of clips gets through as fast as one clip);
            # a block of a small group costs about what one of SLICE_MIN_ROWS rows does
            blocks = max(1, self.slice_rows * g.requests // max(g.rows, SLICE_MIN_ROWS))
        self._skipped = 0
        self.slices += 1
        if g.timing is None:
            g.timing = VisionTiming.start(self.runner.device)
        else:
            g.timing.resume()
        try:
            with torch.inference_mode():
                finished, value = run_steps(g.job, blocks)
        except Exception as e:  # noqa: BLE001 - the loop goes on; the steps encode them instead
            self._abandon(g, e)
            return
        if not finished:
            g.timing.pause()
            return
        g.job = None
        encoded, tokens = value
        g.timing.stop([(req, n) for (req, *_), n in zip(g.runs, tokens)])
        for (req, j, k0, k1), patches in zip(g.runs, encoded):
            if not req.finished and req.mm_embeds[j] is not None:  # else: ended or preempted meanwhile
                req.mm_embeds[j][k0:k1] = patches
        # ready now: every later step runs on the same stream, after these blocks
        self.pending -= g.keys
        if self.runner.device.type == "cuda":
            g.event = torch.cuda.Event()
            g.event.record()  # retired (its timing read) once the GPU is past it
        self.poll()

    def poll(self) -> None:
        while self.inflight and self.inflight[0].done():
            self._retire(self.inflight.pop(0))

    def wait(self) -> None:
        """Blocks until the oldest group in flight is done (the loop has nothing else to run)."""
        if self.inflight and self.inflight[0].job is not None:
            self.advance(None)
        if self.inflight and self.inflight[0].event is not None:
            self.inflight[0].event.synchronize()
        self.poll()

    def ready_until(self, req, start: int) -> int | None:
        """The first prompt token at or after `start` that is a media placeholder whose patch is
        not encoded and done; None when there is none."""
        for j, (off, item) in enumerate(req.media):
            if off + item.num_tokens <= start:
                continue
            tpp, patches = item.tokens_per_temporal_patch, req.mm_embeds[j]
            for k in range(max(0, start - off) // tpp, item.grid_thw[0]):
                if patches is None or patches[k] is None or (id(req), j, k) in self.pending:
                    return off + k * tpp
        return None

    def sync_main_for(self, chunks) -> None:
        """The main stream waits for the groups in flight whose patches these chunks read
        (normally none: the scheduler stops before them, but a prefix-cache eviction can move a
        request's start back over media launched ahead)."""
        if not self.pending:
            return
        ids = {id(c.request) for c in chunks}
        for g in self.inflight:
            if any(key[0] in ids and self._overlaps(c, key) for key in g.keys for c in chunks if id(c.request) == key[0]):
                if g.event is not None:
                    torch.cuda.current_stream().wait_event(g.event)
                    self._record(g)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _overlaps(c, key) -> bool:
        _, j, k = key
        off, item = c.request.media[j]
        tpp = item.tokens_per_temporal_patch
        a, b = off + k * tpp, off + (k + 1) * tpp
        return a < c.start + c.num_tokens and c.start < b

    def _select(self, served) -> list[tuple[object, int, int, int]]:
        """Runs (request, item, k0, k1) of missing patches, in serving order, up to the runner's
        max_vision_patches rows (one forward)."""
        runs, rows, max_rows, tokens = [], 0, self.runner.max_vision_patches, self.max_tokens
        for req, start in served:
            for j, (off, item) in enumerate(req.media):
                if off + item.num_tokens <= start:
                    continue
                t = item.grid_thw[0]
                tpp, per_patch = item.tokens_per_temporal_patch, item.pixel_values.shape[0] // t
                k = first = max(0, start - off) // tpp
                while k < t:
                    if tokens < tpp and (k != first or off + k * tpp > start):
                        break  # enough is encoded ahead (the patch a prompt waits on always goes)
                    tokens -= tpp
                    if req.mm_embeds[j] is not None and req.mm_embeds[j][k] is not None:
                        k += 1  # encoded (or in flight): held ahead already
                        continue
                    if rows and rows + per_patch > max_rows:
                        return runs  # the group is full
                    if runs and runs[-1][:2] == (req, j) and runs[-1][3] == k:
                        runs[-1] = (req, j, runs[-1][2], k + 1)  # extends the run
                    else:
                        runs.append((req, j, k, k + 1))
                    rows += per_patch
                    k += 1
        return runs

    def _launch(self, served) -> None:
        runs = self._select(served)
        if not runs:
            return
        runner = self.runner
        for req, j, _, _ in runs:  # the request references its items' cache entries from now on
            if req.mm_embeds[j] is None:
                req.mm_embeds[j] = [None] * req.media[j][1].grid_thw[0]
                runner._hold(req, req.media[j][1])
        subs = [temporal_slice(req.media[j][1], k0, k1) for req, j, k0, k1 in runs]
        if self.slice_rows is not None:  # its blocks run in the next steps (advance)
            group = _Group(runs, None, None, job=runner.vision_steps(subs), rows=sum(x.pixel_values.shape[0] for x in subs),
                           requests=len({id(req) for req, *_ in runs}))  # a generator: it fails in advance(), if at all
            group.keys = {(id(req), j, k) for req, j, k0, k1 in runs for k in range(k0, k1)}
            self.pending |= group.keys
            self.inflight.append(group)
            self.groups_launched += 1
            return
        with self.on_side_stream():
            timing = VisionTiming.start(runner.device)
            try:
                encoded = runner.run_vision_patches(subs)
            except Exception as e:  # noqa: BLE001 - the loop goes on; the steps encode them instead
                self._abandon(_Group(runs, None, timing), e)
                return
            timing.stop([(req, n) for (req, *_), n in zip(runs, runner.last_encoded_tokens)])
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        group = _Group(runs, event, timing)
        for (req, j, k0, k1), patches in zip(runs, encoded):
            req.mm_embeds[j][k0:k1] = patches
            group.keys |= {(id(req), j, k) for k in range(k0, k1)}
        self.pending |= group.keys
        self.inflight.append(group)
        self.groups_launched += 1
        if event is None:
            self.poll()

    def _abandon(self, g: _Group, err: Exception) -> None:
        """A forward launched ahead failed (a bad item, out of memory): its requests' media are
        left to the steps that reach them, where a request whose media cannot be encoded fails
        alone and the others are answered."""
        self.failures += 1
        log.warning("media encoded ahead for %d request(s) failed (%s: %s); tried once more, then left to their steps",
                    len({id(r) for r, *_ in g.runs}), type(err).__name__, err)
        self.inflight = [x for x in self.inflight if x is not g]
        self.pending -= g.keys
        g.job = None
        for req, *_ in g.runs:
            if id(req) in self._failed_once:  # a second failure: not a transient one
                self.in_step[id(req)] = req
                req.media_ready_until = None
            else:
                self._failed_once[id(req)] = req

    def _retire(self, g: _Group) -> None:
        self.pending -= g.keys
        if g.timing is not None:
            g.timing.resolve()  # each request's vision_encode_s
        self._record(g)

    def _record(self, g: _Group) -> None:
        """Its embeddings are read on the main stream from now on: their memory is not reused
        before what that stream has queued is done."""
        if self.stream is None or g.recorded:
            return
        g.recorded = True
        main = torch.cuda.current_stream()  # the engine loop's (this runs in its thread)
        for req, j, k0, k1 in g.runs:
            patches = req.mm_embeds[j]
            for k in range(k0, k1):
                if patches is not None and patches[k] is not None:
                    patches[k].record_stream(main)

    def on_side_stream(self):
        """Context of every vision forward of the engine (see the module's note)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
