"""Sessions that hear, on a tiny random Qwen2.5-Omni thinker (float32): a 4-turn conversation
mixing audio, an image and a video with its audio track, a batch of 8 sessions asking at once,
and a live session fed frames and audio past its memories' bounds. Exact against transformers'
Qwen2_5OmniThinkerForConditionalGeneration with our TMRoPE positions passed explicitly, and
against a fresh run (or each conversation alone); the audio of a conversation is hashed and
encoded once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from omnistream.engine.protocol import EngineRequest
from omnistream.engine.sampling import SamplingParams
from omnistream.entrypoints.api import Engine
from omnistream.errors import MediaError, UserInputError
from omnistream.media import hashing
from omnistream.media.audio import log_mel_features
from omnistream.media.audio_memory import AudioMemory, AudioMemoryConfig
from omnistream.media.frame_memory import FrameMemoryConfig
from omnistream.media.item import MediaItem
from omnistream.media.patchify import normalize_rows
from omnistream.models.qwen2_5_omni_config import FULL_MODEL_TYPE
from omnistream.sessions.live_media import audio_tick
from tests.reference import assert_close_logits
from tests.test_audio import write_video_with_audio
from tests.test_live import scene_frames
from tests.test_omni_exact import _image, _noise, hf_omni, omni_dirs  # noqa: F401 - fixtures

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)
SIZE = 56 * 56  # live frames: 4 LLM tokens per temporal patch


@pytest.fixture(scope="module")
def engine(omni_dirs):
    eng = Engine.from_pretrained(omni_dirs[FULL_MODEL_TYPE], device="cpu", kv_cache_tokens=16384, block_size=16,
                                 encoder_cache_bytes=64 << 20)
    yield eng
    eng.close()


def hf_logits(hf, engine, prompt_ids: list[int], media: list[tuple[int, MediaItem]], output_ids: list[int]) -> torch.Tensor:
    """transformers' logits for each generated token: every audio item its own clip (unpadded
    features), the video pieces as one video in prompt order, our positions passed explicitly."""
    ids = list(prompt_ids) + list(output_ids[:-1])
    positions, next_pos = engine.model.positions(len(prompt_ids), media)
    positions = torch.cat([positions, torch.arange(next_pos, next_pos + len(output_ids) - 1).expand(3, -1)], dim=1)
    items = [m for _, m in media]
    kw: dict = {}
    clips: list[list[MediaItem]] = []  # offline clips: the items of one audio source; live: one chunk each
    for m in (m for m in items if m.kind == "audio"):
        same = clips and m.block_id is not None and clips[-1][-1].block_id == m.block_id and m.source_start == _end(clips[-1])
        clips[-1].append(m) if same else clips.append([m])
    if clips:
        feats = [torch.cat([m.pixel_values for m in c]) for c in clips]
        longest = max(f.shape[0] for f in feats)
        kw |= {"input_features": torch.stack([torch.nn.functional.pad(f, (0, 0, 0, longest - f.shape[0])).T for f in feats]),
               "feature_attention_mask": torch.stack([(torch.arange(longest) < f.shape[0]).long() for f in feats])}
    videos = [m for m in items if m.kind == "video"]
    if videos:
        kw |= {"pixel_values_videos": torch.cat([normalize_rows(m.pixel_values) for m in videos]),
               "video_grid_thw": torch.tensor([[sum(m.grid_thw[0] for m in videos), *videos[0].grid_thw[1:]]]),
               "video_second_per_grid": torch.tensor([videos[0].second_per_grid_t])}
    images = [m for m in items if m.kind == "image"]
    if images:
        kw |= {"pixel_values": torch.cat([normalize_rows(m.pixel_values) for m in images]),
               "image_grid_thw": torch.tensor([m.grid_thw for m in images])}
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids]), position_ids=positions[:, None, :], **kw)
    return out.logits[0, len(prompt_ids) - 1 :].float()


def _end(clip: list[MediaItem]) -> int:
    """The token after a clip's items (an offline clip's next item starts there)."""
    return clip[-1].source_start + clip[-1].num_tokens


# ------------------------------------------------------------------------------ multi-turn


def test_four_turns_audio_image_video_with_audio(engine, hf_omni, tmp_path):
    """Audio, then an image, then a video with its audio track, then text only: each answer
    exact; each question after the media was added costs only its own tokens (the media is
    hashed at add_*() and encoded once: nothing encoded, nothing hashed while asking); a fork
    keeps it all."""
    clip = write_video_with_audio(tmp_path / "clip.mp4", seconds=5.0, fps=4, seed=11)
    s = engine.session(system="You listen and watch.")
    turns = [
        (lambda: s.add_audio(_noise(4.7, 21)["audio"]), "What is this sound?"),
        (lambda: s.add_image(_image(22)["image"]), "And this picture?"),
        (lambda: s.add_video(str(clip), max_pixels=112 * 112, use_audio_in_video=True), "What happens in the clip?"),
        (None, "Which came first?"),
    ]
    blocks = [2, 1, 6, 0]  # items each turn's part gives: 2 s chunks + a short one; an image; 3 video + 3 audio pieces
    prev_len = 0
    for (add, question), n_items in zip(turns, blocks):
        hashed = hashing.STATS.items_hashed
        if add is not None:
            add()
        assert len(s.pending_items()) == n_items and s.pending_media == (1 if n_items else 0)
        hashed = hashing.STATS.items_hashed - hashed
        ids, media = s.prompt_for(question)
        new_media = sum(m.num_tokens for _, m in media[len(s.media):])
        encoded, stats = engine.vision_tokens_encoded, engine.stats()["encoder_cache"]
        before_ask = hashing.STATS.items_hashed
        res = s.ask(question, GREEDY, return_logits=True)
        assert hashing.STATS.items_hashed == before_ask, "asking hashed media again"
        assert engine.vision_tokens_encoded - encoded == new_media, "only the new turn's media is encoded"
        assert engine.stats()["encoder_cache"]["hits"] == stats["hits"]  # nothing old looked up again
        assert res.metrics.cached_tokens >= prev_len // 16 * 16  # the conversation so far is not recomputed
        assert hashed == {2: 2, 1: 1, 6: 3, 0: 0}[n_items]  # hashed once, when added (video + 2 audio items)
        assert_close_logits(res.logits, hf_logits(hf_omni, engine, ids, media, res.token_ids))
        prev_len = len(s.token_ids)
    assert [m.kind for _, m in s.media] == ["audio", "audio", "image", "video", "audio", "video", "audio", "video", "audio"]

    fork = s.fork()
    encoded = engine.vision_tokens_encoded
    a = fork.ask("Say it again.", GREEDY)
    b = s.ask("Say it again.", GREEDY)
    assert a.token_ids == b.token_ids and engine.vision_tokens_encoded == encoded
    assert a.metrics.cached_tokens >= prev_len // 16 * 16


def test_drop_pending_forgets_every_item_of_a_part(engine):
    s = engine.session()
    s.add_text("Listen:")
    mark = s.pending_count
    items = s.add_audio(_noise(4.7, 23)["audio"])  # two items of one block
    assert len(items) == 2 and s.pending_media == 1
    s.drop_pending(mark)
    assert s.pending_items() == [] and s.pending_count == 1
    s.add_item(items)  # the block again, as a server's media cache would add it
    assert s.pending_media == 1 and len(s.pending_items()) == 2
    with pytest.raises(UserInputError):
        s.add_item([items[0], _noise_item(engine)])  # two blocks are not one part


def _noise_item(engine) -> MediaItem:
    [item] = engine.load_media([{"role": "user", "content": [_noise(1.0, 24)]}])
    return item


def test_eight_sessions_ask_at_once(engine):
    """8 conversations over different audio (and an image for some) asking together, twice:
    each answer equals the same conversation asked alone (greedy tokens, logits 1e-4)."""
    sessions = []
    for i in range(8):
        s = engine.session()
        s.add_audio(_noise(0.8 + 0.4 * i, 30 + i)["audio"])
        if i % 3 == 0:
            s.add_image(_image(40 + i)["image"])
        sessions.append(s)
    for question in ("What do you hear?", "Again?"):
        prompts = [s.prompt_for(question) for s in sessions]
        pending = [s.start(question, GREEDY, return_logits=True) for s in sessions]
        together = [p.finish() for p in pending]
        alone = [engine.run([EngineRequest(ids, media, GREEDY, return_logits=True)])[0] for ids, media in prompts]
        for t, a in zip(together, alone):
            assert t.token_ids == a.token_ids
            assert_close_logits(t.logits, torch.stack(a.logits))


# ------------------------------------------------------------------------------ live


def test_audio_memory_bound_gap_and_order():
    mem = AudioMemory(AudioMemoryConfig(max_seconds=4.0))
    for k in range(10):  # 5 s in 0.5 s pieces
        mem.push(np.full(8000, 0.01 * k, np.float32), 0.5 * k)
    assert [(c.start, c.seconds, c.sealed) for c in mem.retained()] == [(0.0, 2.0, True), (2.0, 2.0, True), (4.0, 1.0, False)]
    dropped = mem.push(np.zeros(8000, np.float32), 7.0)  # a 2 s gap: the open chunk is sealed short
    assert dropped == [0]  # over 4 s sealed: the oldest goes first
    assert [(c.start, c.seconds) for c in mem.retained()] == [(2.0, 2.0), (4.0, 1.0), (7.0, 0.5)]
    s = mem.stats()
    assert (s.seconds_held, s.seconds_dropped, s.gaps, s.chunks_dropped) == (3.5, 2.0, 1, 1)
    with pytest.raises(MediaError):
        mem.push(np.zeros(160, np.float32), 6.0)  # before the end of the audio so far
    mem.push(np.zeros(160, np.float32), 7.52)  # 20 ms late: within the tolerance, contiguous
    assert mem.retained()[-1].start == 7.0 and mem.stats().gaps == 1


def _tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    return (0.2 * np.sin(2 * np.pi * (250 + 40 * seed) * np.arange(n) / 16000) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _feed(live, frames, audio, t0: float, fps: float = 2.0, piece_s: float = 0.5):
    """Frames at `fps` and audio in `piece_s` pieces from t0, interleaved as a camera sends them."""
    step = int(piece_s * 16000)
    for i, f in enumerate(frames):
        t = t0 + i / fps
        live.add_frame(f, t)
        a0 = int(round((t - t0) * 16000))
        for j in range(a0, min(a0 + int(16000 / fps), audio.shape[0]), step):
            live.add_audio(audio[j : j + step], t0 + j / 16000)
    live.flush(timeout=120)


def _check_live_answer(live, engine, hf, omni_dirs, question):
    ids, media = live.prompt_for(question)
    res = live.ask(question, GREEDY, return_logits=True)
    assert_close_logits(res.logits, hf_logits(hf, engine, ids, media, res.token_ids))
    fresh = Engine.from_pretrained(omni_dirs[FULL_MODEL_TYPE], device="cpu", kv_cache_tokens=8192, block_size=16,
                                   enable_prefix_caching=False, encoder_cache_bytes=0)
    try:
        [again] = fresh.run([EngineRequest(ids, media, GREEDY)])
    finally:
        fresh.close()
    assert again.token_ids == res.token_ids
    return ids, media, res


def test_live_frames_and_audio_after_evictions_equal_a_fresh_run(engine, hf_omni, omni_dirs):
    mem = FrameMemoryConfig(star_capacity=4, stream_capacity=4)
    live = engine.live_session(system="You watch and listen.", memory=mem, max_pixels=SIZE,
                               audio_memory=AudioMemoryConfig(max_seconds=4.0))
    _feed(live, scene_frames(3, 6, seed=51), _tone(9.0, 1), t0=0.0)  # 18 frames, 9 s of sound
    a, m = live.audio.stats(), live.memory.stats()
    assert a.seconds_dropped >= 4.0 and a.seconds_held <= 6.0 and m.frames_added == 18 and len(live.patches) <= 4

    ids, media, res = _check_live_answer(live, engine, hf_omni, omni_dirs, "What do you see and hear?")
    pieces = [item for _, item in media]
    assert {p.kind for p in pieces} == {"video", "audio"} and res.live.audio_tokens > 0
    # the block is the retained media, placed on one timeline and interleaved per 2 s
    chunks = [c for c in live.audio.retained() if c.samples.shape[0] >= 480]
    heard = [p for p in pieces if p.kind == "audio"]
    assert len(heard) == len(chunks)
    for c, p in zip(chunks, heard):  # features of each retained chunk alone, at its true length
        assert torch.allclose(p.pixel_values, log_mel_features(c.samples).T, atol=1e-5)
    video = [p for p in pieces if p.kind == "video"]
    origin = min(chunks[0].start, video[0].patch_times[0])
    assert [p.source_start for p in heard] == [audio_tick(c.start, origin, 25) for c in chunks]
    assert [t for p in video for t in p.patch_times] == [lp.patch.timestamps[0] for lp in live._context_patches()]
    order = [(math.floor((p.patch_times[0] - origin) * 25) if p.kind == "video" else p.source_start) // 50 for p in pieces]
    assert order == sorted(order)
    tok = engine.tokenizer
    first = media[0][0]
    assert ids[first - 2 : first] == [tok.vision_start_token_id, tok.audio_start_token_id]

    # a question with nothing new encodes nothing
    encoded = engine.vision_tokens_encoded
    again = live.ask("And?", GREEDY)
    assert engine.vision_tokens_encoded == encoded and again.live.frames_encoded == 0

    # more frames and sound after a pause (a gap in the audio): still exact
    _feed(live, scene_frames(1, 5, seed=52), _tone(2.3, 2), t0=20.0)
    assert live.audio.stats().gaps == 1
    _check_live_answer(live, engine, hf_omni, omni_dirs, "What changed?")


def test_live_audio_only_and_refusals(engine, hf_omni, omni_dirs):
    live = engine.live_session(audio_memory=AudioMemoryConfig(max_seconds=2.0))
    with pytest.raises(MediaError):
        live.add_audio(np.zeros((2, 800), np.float32), 0.0)  # not mono
    sound = _tone(3.3, 3)
    live.add_audio((sound[:16000] * 32767).astype(np.int16), 0.0)  # int16 PCM
    live.add_audio(sound[16000:], 1.0)
    with pytest.raises(MediaError):
        live.add_audio(sound[:800], 0.5)  # before the end of the audio so far: refused, the session goes on
    ids, media, _ = _check_live_answer(live, engine, hf_omni, omni_dirs, "What is this?")
    assert [m.kind for _, m in media] == ["audio", "audio"]
    live.close()

    fast = engine.live_session(policy="fast")
    with pytest.raises(UserInputError, match="fast"):
        fast.add_audio(sound[:1600], 0.0)
    fast.close()


def test_live_video_positions_follow_real_time_from_the_block_origin(engine):
    """TMRoPE placed a live video's patches by second_per_grid_t, ignoring their timestamps;
    a piece of a live block is placed from the block's origin, and its KV blocks' names say so."""
    from omnistream.cache.prefix_hash import block_hash, root_hash

    rows = torch.zeros(3 * 4, 1176, dtype=torch.uint8)
    item = MediaItem(kind="video", pixel_values=rows, grid_thw=(3, 2, 2), patch_times=[10.0, 11.0, 15.0],
                     patch_hashes=["aa" * 16, "bb" * 16, "cc" * 16])
    assert engine.model.media_positions(item, 0)[0].tolist() == [0, 25, 125]
    placed = MediaItem(**{**item.__dict__, "time_origin": 9.0})
    assert engine.model.media_positions(placed, 0)[0].tolist() == [25, 50, 150]
    names = {block_hash(root_hash(None), [1] * 3, 0, [(0, m)]) for m in (item, placed)}
    audio = MediaItem(kind="audio", pixel_values=torch.zeros(200, 128), grid_thw=(1, 200, 1), patch_hashes=["dd" * 16])
    later = MediaItem(**{**audio.__dict__, "source_start": 75})
    names |= {block_hash(root_hash(None), [1] * 3, 0, [(0, m)]) for m in (audio, later)}
    assert len(names) == 4
