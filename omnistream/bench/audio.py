"""`omnistream bench audio` (E5, E6 of the seed): audio questions, transformers vs omnistream,
in one run, on a Qwen2.5-Omni thinker (random weights for a preset: `--model-config omni-3b`).

Clips are generated test signals (speech_like: 4 s phrases of synthetic voiced syllables, then 2 s
of faint noise, repeated), written as 16 kHz wav files with PyAV and decoded back; both systems
get the same decoded samples (file decoding is not timed). Per clip length (2, 10, 60, 300,
600 s by default):
  transformers  Qwen2.5-Omni's feature extractor as its processor calls it (WhisperFeatureExtractor,
                padding="max_length" to 300 s, truncation: longer clips are cut at 300 s),
                then a prefill with those features (the audio tower inside it) and a greedy
                decode with explicit TMRoPE positions
  omnistream    Engine.generate on the same samples: log-mel at the true length, the audio
                encoder per 2 s chunk, prefill, decode
Columns: feature shape, padding ratio (padded frames / real frames) and feature time, audio
encoder time (forward hooks), TTFT from the samples (features included) and audio tokens of
both. With silero-vad installed, the engine also answers each clip with `"vad": true` (lossy:
silent stretches dropped): audio tokens saved and the greedy answer's agreement with the exact
path.

W1 with sound: an mp4 (generated frames + the same kind of audio track), N questions:
  omnistream    one session, add_video(use_audio_in_video=True) once, then ask() per turn
  transformers  every turn re-runs the whole conversation: the audio track's padded features,
                the video's frames, the audio and vision towers, prefill of everything (the
                engine's exact prompt ids, its own answers included)
Per turn: TTFT of both and encoder calls (audio tower, vision tower) of both.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from omnistream.bench.latency import Prepared, environment, hf_greedy, median
from omnistream.bench.models import make_pair, resolve_dtype
from omnistream.bench.multiturn import (
    TURN_TEXT_TOKENS, VisionProbe, cuda_device, fmt, ratio, times, without_last_answer, write_json,
)
from omnistream.bench.workload import synthetic_video_frames, video_tokens
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import MediaError
from omnistream.media.audio import AudioConfig, decode_audio, log_mel_features
from omnistream.media.patchify import normalize_rows
from omnistream.media.samples import write_audio, write_video_with_audio
from omnistream.models.prompt import build_prompt

RATE = 16_000
CLIP_SECONDS = (2, 10, 60, 300, 600)
HF_MAX_SECONDS = 300  # Qwen2.5-Omni's feature extractor: chunk_length 300, n_samples 4,800,000
WARMUP_SEED_OFFSET = 1000
AV_QUESTIONS = (
    "What is said in this clip?",
    "Describe the sound you hear.",
    "How many times does the sound stop?",
    "What is on the screen when the sound starts?",
    "Is the sound a voice or a tone?",
    "Which square moves the fastest?",
    "Does the pitch of the sound change?",
    "When is the clip silent?",
    "Summarise the clip in one sentence.",
    "Do the sound and the picture change together?",
)


# ---------------------------------------------------------------------------------- signals
def speech_like(seconds: float, seed: int = 0, rate: int = RATE) -> np.ndarray:
    """(N,) float32 at `rate`: phrases of 4 s of syllables, then 2 s of faint noise, repeated
    from a seed-dependent point of the first phrase. A syllable is 120-300 ms of a voiced tone (a 100-220 Hz pitch
    gliding by up to 15%, harmonics shaped by two random formants, a Hann envelope) followed by a
    20-80 ms gap, so that a VAD hears most phrases as speech (a steady tone it does not) and
    drops the pauses."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    x = np.zeros(n)
    phase, pos = rng.random() * 3, 0  # starts inside a phrase: every clip holds speech
    while pos < n:
        t_in = (pos / rate + phase) % 6
        if t_in >= 4:  # the pause after a phrase
            pos += int((6 - t_in) * rate) + 1
            continue
        syllable = _syllable(rng, int(rate * rng.uniform(0.12, 0.3)), rate)
        end = min(n, pos + syllable.shape[0])
        x[pos:end] += syllable[: end - pos]
        pos = end + int(rate * rng.uniform(0.02, 0.08))
    x += 0.003 * rng.standard_normal(n)
    return x.astype(np.float32)


def _syllable(rng: np.random.Generator, length: int, rate: int) -> np.ndarray:
    t = np.arange(length) / rate
    f0 = rng.uniform(100, 220) * (1 + rng.uniform(-0.15, 0.15) * t / t[-1])
    phase = 2 * np.pi * np.cumsum(f0) / rate
    f1, f2 = rng.uniform(300, 800), rng.uniform(900, 2300)  # vowel formants
    out = np.zeros(length)
    for k in range(1, int(4000 // f0.mean()) + 1):
        fk = k * f0.mean()
        out += (np.exp(-((fk - f1) / 150) ** 2) + 0.6 * np.exp(-((fk - f2) / 250) ** 2) + 0.05) * np.sin(k * phase)
    out *= np.hanning(length)
    return 0.25 * out / (np.abs(out).max() + 1e-9)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    """16-bit PCM mono wav."""
    return write_audio(path, samples[None, :], rate)


def write_av_clip(path: Path, seconds: float, size: int, seed: int = 0, fps: int = 2, rate: int = 44100) -> Path:
    """An mp4: the benchmark's moving squares at `fps`, speech_like audio at `rate`."""
    frames = synthetic_video_frames(int(seconds * fps), size, seed)
    return write_video_with_audio(path, frames, speech_like(seconds, seed, rate)[None, :], fps, rate, bit_rate=4_000_000)


# ------------------------------------------------------------------------------ transformers
def hf_feature_extractor():
    """Qwen2.5-Omni's feature extractor (its preprocessor_config.json values)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, sampling_rate=RATE, hop_length=160, chunk_length=HF_MAX_SECONDS,
                                   n_fft=400, padding_value=0.0, return_attention_mask=True, dither=0.0)


def hf_features(fe, samples: np.ndarray, dtype: torch.dtype) -> tuple[dict, float]:
    """What Qwen2_5OmniProcessor does with an audio part (padding="max_length", truncation on
    by default) and what its users then do (inputs.to(model.dtype)) -> (inputs, seconds)."""
    t0 = time.perf_counter()
    out = fe(samples, sampling_rate=RATE, padding="max_length", return_attention_mask=True, return_tensors="pt")
    inputs = {"input_features": out["input_features"].to(dtype), "feature_attention_mask": out["attention_mask"]}
    return inputs, time.perf_counter() - t0


def hf_audio_tokens(mask: torch.Tensor) -> int:
    """The processor's count of <|AUDIO|> tokens for a feature mask."""
    frames = int(mask.sum())
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


class AudioProbe(VisionProbe):
    """VisionProbe on an audio tower: transformers' returns an output with last_hidden_state."""

    def _count(self, _mod, _args, out) -> None:
        rows = out if isinstance(out, torch.Tensor) else getattr(out, "last_hidden_state", None)
        self.calls += 1
        self.tokens += rows.shape[0] if isinstance(rows, torch.Tensor) else 0

    def take(self) -> dict:
        v = super().take()
        return {"audio_calls": v["vision_calls"], "audio_tokens": v["vision_tokens"], "audio_encode_s": v["vision_encode_s"]}


def audio_message(samples: np.ndarray, text: str, **options) -> list[dict]:
    audio = {"type": "audio", "audio": {"array": samples, "sampling_rate": RATE}, **options}
    return [{"role": "user", "content": [audio, {"type": "text", "text": text}]}]


def hf_clip(hf, engine, fe, samples: np.ndarray, text: str, new_tokens: int, probe: AudioProbe) -> dict:
    """transformers on one audio question: its features (padded, truncated), then prefill and
    greedy decode. Its prompt has the tokens of what it keeps (the first 300 s), placed by the
    original rule (our positions for those tokens: audio alone is sequential)."""
    device = next(hf.parameters()).device
    inputs, feature_s = hf_features(fe, samples, next(hf.parameters()).dtype)
    kept = samples[: HF_MAX_SECONDS * RATE]
    messages = audio_message(kept, text)
    items = engine.load_media(messages)
    prompt = build_prompt(engine.tokenizer, messages, items)
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    tokens = sum(m.num_tokens for _, m in media)
    if tokens != hf_audio_tokens(inputs["feature_attention_mask"]):
        raise RuntimeError(f"audio tokens differ: ours {tokens} for the kept samples, transformers' processor "
                           f"{hf_audio_tokens(inputs['feature_attention_mask'])}")
    positions, next_pos = engine.model.positions(len(prompt.token_ids), media)
    probe.take()
    r = hf_greedy(hf, Prepared(messages, prompt.token_ids, positions, next_pos, inputs), device, new_tokens, _cache(hf))
    a = probe.take()
    shape = tuple(inputs["input_features"].shape)
    real = int(inputs["feature_attention_mask"].sum())
    return {"feature_shape": shape, "real_frames": real, "padding_ratio": shape[-1] / real, "feature_s": feature_s,
            "audio_encode_s": a["audio_encode_s"], "audio_calls": a["audio_calls"], "ttft_s": feature_s + r["ttft_s"],
            "ttft_no_features_s": r["ttft_s"], "audio_tokens": tokens, "prompt_tokens": len(prompt.token_ids), "tokens": r["tokens"]}


def _cache(hf):
    from transformers import DynamicCache

    return DynamicCache(config=hf.config)


# ---------------------------------------------------------------------------------- engine
def engine_clip(engine, samples: np.ndarray, text: str, sampling: SamplingParams, probe: AudioProbe, **options) -> dict:
    """Engine.generate on one audio question; TTFT from the samples (features, hashing, the
    VAD when asked, encoder, prefill), and our feature shape and time alone."""
    cfg = engine.model.audio_config
    t0 = time.perf_counter()
    feats = log_mel_features(samples, cfg)
    feature_s = time.perf_counter() - t0
    probe.take()
    [res] = engine.generate([audio_message(samples, text, **options)], sampling)
    m = res.metrics  # generate's TTFT counts from the request's arrival: media loading (and the VAD) included
    a = probe.take()
    return {"feature_shape": tuple(feats.shape), "real_frames": feats.shape[-1], "padding_ratio": 1.0, "feature_s": feature_s,
            "audio_encode_s": a["audio_encode_s"], "audio_calls": a["audio_calls"], "ttft_s": m.ttft_s,
            "ttft_no_features_s": m.ttft_s - m.media_decode_s - m.preprocess_s,
            "audio_tokens": m.media_tokens, "prompt_tokens": m.prompt_tokens, "tokens": res.token_ids}


def agreement(a: list[int], b: list[int]) -> dict:
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"equal_tokens": sum(x == y for x, y in zip(a, b)), "matching_prefix": prefix, "compared": min(len(a), len(b))}


def vad_available() -> bool:
    try:
        import silero_vad  # noqa: F401
    except ImportError:
        return False
    return True


def vad_row(engine, samples: np.ndarray, text: str, sampling: SamplingParams, probe: AudioProbe, exact: dict) -> dict:
    """The same question with "vad": true -> its row, the tokens saved and the answer's agreement
    with the exact path (a clip the VAD hears no speech in is refused: recorded as such)."""
    try:
        row = engine_clip(engine, samples, text, sampling, probe, vad=True)
    except MediaError as exc:
        return {"error": str(exc), "audio_tokens": 0, "tokens_saved": None, "ttft_s": None, "agreement_with_exact": None}
    return row | {"tokens_saved": exact["audio_tokens"] - row["audio_tokens"], "agreement_with_exact": agreement(row["tokens"], exact["tokens"])}


def clip_samples(workdir: Path, seconds: float, seed: int) -> np.ndarray:
    """The clip of `seconds`, written as a wav file with PyAV and decoded back (16 kHz mono)."""
    path = write_wav(workdir / f"clip_{seconds:g}s_{seed}.wav", speech_like(seconds, seed))
    return decode_audio(path, AudioConfig()).samples


def run_clips(hf, engine, workdir: Path, seconds: list[float], seed: int, sampling: SamplingParams, with_vad: bool) -> list[dict]:
    fe = hf_feature_extractor()
    hp, op = AudioProbe(hf.audio_tower, next(hf.parameters()).device), AudioProbe(engine.model.audio_tower, engine.device)
    rows = []
    try:
        # kernels, pools, allocator growth; clips no measurement reuses. As long as the longest
        # measured one: the first long prefill of each system paid its shapes' first use (H200:
        # the 300 s row took 2x the 600 s row's TTFT, for both systems, with a 4 s warm-up only)
        warm = speech_like(4.0, seed + WARMUP_SEED_OFFSET)
        longest = speech_like(max(seconds), seed + WARMUP_SEED_OFFSET + 1)
        for clip in (warm, longest):
            engine_clip(engine, clip, "Warm up.", sampling, op)
            hf_clip(hf, engine, fe, clip, "Warm up.", sampling.max_new_tokens, hp)
        if with_vad:  # loads Silero's model once
            engine_clip(engine, warm, "Warm up.", sampling, op, vad=True)
        for i, s in enumerate(seconds):
            samples = clip_samples(workdir, s, seed + i)
            text = "What is said in this recording?"
            row = {"seconds": s, "omnistream": engine_clip(engine, samples, text, sampling, op),
                   "transformers": hf_clip(hf, engine, fe, samples, text, sampling.max_new_tokens, hp)}
            if with_vad:
                row["omnistream_vad"] = vad_row(engine, samples, text, sampling, op, row["omnistream"])
            row["equal_tokens_tf_vs_omni"] = agreement(row["transformers"]["tokens"], row["omnistream"]["tokens"])
            rows.append(row)
    finally:
        hp.remove()
        op.remove()
    return rows


# ---------------------------------------------------------------------------------- W1 + sound
def av_options(size: int) -> dict:
    return {"use_audio_in_video": True, "fps": 2.0, "min_pixels": size * size, "max_pixels": size * size}


def av_question(i: int) -> str:
    q = AV_QUESTIONS[i % len(AV_QUESTIONS)]
    return q if i < len(AV_QUESTIONS) else f"{q} (question {i + 1})"


def engine_w1_av(engine, path: Path, size: int, turns: int, sampling: SamplingParams) -> tuple[list[dict], list[tuple], float]:
    vp, ap = VisionProbe(engine.model.visual, engine.device), AudioProbe(engine.model.audio_tower, engine.device)
    session = engine.session()
    rows, convs = [], []
    try:
        t0 = time.perf_counter()
        session.add_video(str(path), **av_options(size))
        ingest = time.perf_counter() - t0
        for i in range(turns):
            exact = session.prompt_for(av_question(i))
            vp.take(), ap.take()
            res = session.ask(av_question(i), sampling)
            m = res.metrics
            rows.append({"ttft_s": m.ttft_s, "prompt_tokens": m.prompt_tokens, "cached_tokens": m.cached_tokens,
                         "vision_calls": vp.take()["vision_calls"], "audio_calls": ap.take()["audio_calls"], "tokens": res.token_ids})
            convs.append((without_last_answer(session.messages), exact))
    finally:
        session.close()
        vp.remove()
        ap.remove()
    return rows, convs, ingest


def hf_av_turn(hf, engine, fe, path: Path, size: int, exact: tuple, new_tokens: int, vp: VisionProbe, ap: AudioProbe) -> dict:
    """One turn from scratch: decode the audio track and make its padded features, preprocess
    the frames, then prefill the engine's exact prompt with both towers, and decode."""
    device, dtype = next(hf.parameters()).device, next(hf.parameters()).dtype
    t0 = time.perf_counter()
    track = decode_audio(path, engine.model.audio_config)
    inputs, _ = hf_features(fe, track.samples, dtype)
    part = {"video": str(path), **{k: v for k, v in av_options(size).items() if k != "use_audio_in_video"}}
    [video] = engine.load_media([{"role": "user", "content": [{"type": "video", **part}]}])
    inputs |= {"pixel_values_videos": normalize_rows(video.pixel_values).to(dtype), "video_grid_thw": torch.tensor([video.grid_thw]),
               "video_second_per_grid": torch.tensor([video.second_per_grid_t])}
    preprocess = time.perf_counter() - t0
    ids, media = exact
    positions, next_pos = engine.model.positions(len(ids), media)
    vp.take(), ap.take()
    r = hf_greedy(hf, Prepared([], list(ids), positions, next_pos, inputs), device, new_tokens, _cache(hf))
    return {"ttft_s": r["ttft_s"], "preprocess_s": preprocess, "prompt_tokens": len(ids), "vision_calls": vp.take()["vision_calls"],
            "audio_calls": ap.take()["audio_calls"], "tokens": r["tokens"]}


def run_w1_av(hf, engine, workdir: Path, seconds: float, size: int, turns: int, seed: int, sampling: SamplingParams) -> dict:
    fe = hf_feature_extractor()
    warm = write_av_clip(workdir / "warmup.mp4", min(seconds, 4.0), size, seed + WARMUP_SEED_OFFSET)
    clip = write_av_clip(workdir / "w1.mp4", seconds, size, seed)
    vp, ap = VisionProbe(hf.visual, next(hf.parameters()).device), AudioProbe(hf.audio_tower, next(hf.parameters()).device)
    try:
        _, warm_convs, _ = engine_w1_av(engine, warm, size, 2, sampling)
        hf_av_turn(hf, engine, fe, warm, size, warm_convs[0][1], sampling.max_new_tokens, vp, ap)
        ours, convs, ingest = engine_w1_av(engine, clip, size, turns, sampling)
        base = [hf_av_turn(hf, engine, fe, clip, size, exact, sampling.max_new_tokens, vp, ap) for _, exact in convs]
    finally:
        vp.remove()
        ap.remove()
    return {"seconds": seconds, "size": size, "add_video_s": ingest, "omnistream": ours, "transformers": base,
            "follow_up_ttft_s": {"omnistream": median([r["ttft_s"] for r in ours[1:]]), "transformers": median([r["ttft_s"] for r in base[1:]])},
            "equal_greedy_tokens_per_turn": [agreement(b["tokens"], o["tokens"])["equal_tokens"] for b, o in zip(base, ours)]}


# ---------------------------------------------------------------------------------- run
def run_audio(model, device: str, dtype: str, seconds: list[float], new_tokens: int, seed: int = 0, *, w1_seconds: float = 60.0,
              w1_size: int = 224, turns: int = 10, with_vad: bool = True) -> dict:
    import tempfile

    dev = cuda_device(device)
    tdtype = resolve_dtype(dtype, str(dev))
    # the longest context: a clip (25 audio tokens per second) or the W1 clip with its frames, + text
    w1_tokens = int(w1_seconds * 25) + video_tokens(int(w1_seconds * 2), w1_size) if turns > 0 else 0
    longest = max(int(max(seconds) * 25), w1_tokens) + 2048
    options = {"enable_prefix_caching": True, "kv_cache_tokens": 2 * longest + turns * (new_tokens + TURN_TEXT_TOKENS) + 8192,
               "encoder_cache_bytes": 512 << 20}
    hf, engine = make_pair(model, str(dev), tdtype, seed, **options)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    vad = with_vad and vad_available()
    try:
        with tempfile.TemporaryDirectory(prefix="omnistream-bench-audio-") as tmp:
            clips = run_clips(hf, engine, Path(tmp), seconds, seed, sampling, vad)
            w1 = run_w1_av(hf, engine, Path(tmp), w1_seconds, w1_size, turns, seed, sampling) if turns > 0 else None
        stats = engine.stats()
    finally:
        engine.close()
    return {
        "env": environment(dev, tdtype),
        "workload": {"model": str(model), "clips_s": seconds, "new_tokens": new_tokens, "seed": seed, "engine_options": options,
                     "vad": vad if with_vad else False, "vad_requested": with_vad,
                     "w1": {"seconds": w1_seconds, "size": w1_size, "turns": turns}},
        "clips": clips,
        "w1_av": w1,
        "engine_stats": stats,
    }


# ---------------------------------------------------------------------------------- output
def _shape(s) -> str:
    return "x".join(str(d) for d in s)


def print_audio(r: dict, out=None) -> None:
    env, w = r["env"], r["workload"]
    where = env["gpu"] or f"CPU ({env['cpu']})"
    print(f"omnistream bench audio: {w['model']} {env['dtype']} on {where}; torch {env['torch']}, transformers {env['transformers']}", file=out)
    print(f"clips: synthetic syllables, 4 s phrases + 2 s pauses (16 kHz wav via PyAV), {w['new_tokens']} new tokens per answer, greedy", file=out)
    print(f"{'clip s':>7}{'tf features':>16}{'pad':>7}{'tf feat ms':>11}{'omni features':>15}{'omni feat ms':>13}"
          f"{'tf enc ms':>10}{'omni enc ms':>12}{'tf TTFT ms':>11}{'omni TTFT ms':>13}{'ratio':>7}{'tokens tf/omni':>16}", file=out)
    for c in r["clips"]:
        t, o = c["transformers"], c["omnistream"]
        print(f"{c['seconds']:>7g}{_shape(t['feature_shape']):>16}{t['padding_ratio']:>6.1f}x{fmt(t['feature_s'], 1000):>11}"
              f"{_shape(o['feature_shape']):>15}{fmt(o['feature_s'], 1000):>13}{fmt(t['audio_encode_s'], 1000):>10}"
              f"{fmt(o['audio_encode_s'], 1000):>12}{fmt(t['ttft_s'], 1000):>11}{fmt(o['ttft_s'], 1000):>13}"
              f"{times(ratio(t['ttft_s'], o['ttft_s'])):>7}{str(t['audio_tokens']) + '/' + str(o['audio_tokens']):>16}", file=out)
    for c in r["clips"]:
        if c["seconds"] > HF_MAX_SECONDS:
            t, o = c["transformers"], c["omnistream"]
            print(f"{c['seconds']:g} s clip: transformers' processor truncates at {HF_MAX_SECONDS} s and keeps {t['audio_tokens']} audio "
                  f"tokens ({t['real_frames']} mel frames) without a warning; omnistream encodes all {o['audio_tokens']}", file=out)
    if not w["vad"]:
        why = "not requested" if not w["vad_requested"] else "silero-vad is not installed (pip install 'omnistream[vad]')"
        print(f"VAD: {why}", file=out)
    else:
        print(f"VAD (lossy, opt-in \"vad\": true): {'clip s':>7}{'tokens exact':>14}{'with VAD':>10}{'saved':>8}{'TTFT ms':>9}{'answer = exact':>16}", file=out)
        for c in r["clips"]:
            v, o = c["omnistream_vad"], c["omnistream"]
            if v["agreement_with_exact"] is None:
                print(f"{'':33}{c['seconds']:>7g}{o['audio_tokens']:>14}  refused: {v['error']}", file=out)
                continue
            a = v["agreement_with_exact"]
            print(f"{'':33}{c['seconds']:>7g}{o['audio_tokens']:>14}{v['audio_tokens']:>10}{v['tokens_saved']:>8}"
                  f"{fmt(v['ttft_s'], 1000):>9}{str(a['equal_tokens']) + '/' + str(a['compared']):>16}", file=out)
    w1 = r["w1_av"]
    if w1 is not None:
        print(f"W1 with sound: {w1['seconds']:g} s mp4 ({w1['size']}x{w1['size']} at 2 fps, its audio track, use_audio_in_video), "
              f"{len(w1['omnistream'])} questions; add_video {fmt(w1['add_video_s'], 1000)} ms", file=out)
        print(f"{'turn':>5}{'prompt':>8}{'cached':>8}{'tf TTFT ms':>12}{'omni TTFT ms':>14}{'ratio':>8}"
              f"{'audio calls tf/omni':>21}{'vision calls tf/omni':>22}{'tf preprocess ms':>18}", file=out)
        for i, (o, b) in enumerate(zip(w1["omnistream"], w1["transformers"])):
            print(f"{i + 1:>5}{o['prompt_tokens']:>8}{o['cached_tokens'] if o['cached_tokens'] is not None else '-':>8}"
                  f"{fmt(b['ttft_s'], 1000):>12}{fmt(o['ttft_s'], 1000):>14}{times(ratio(b['ttft_s'], o['ttft_s'])):>8}"
                  f"{str(b['audio_calls']) + '/' + str(o['audio_calls']):>21}{str(b['vision_calls']) + '/' + str(o['vision_calls']):>22}"
                  f"{fmt(b['preprocess_s'], 1000):>18}", file=out)
        f = w1["follow_up_ttft_s"]
        print(f"follow-up TTFT (median of turns 2..{len(w1['omnistream'])}): transformers {fmt(f['transformers'], 1000)} ms, omnistream "
              f"{fmt(f['omnistream'], 1000, 2)} ms ({times(ratio(f['transformers'], f['omnistream']))})", file=out)
        print("greedy tokens equal to transformers' per turn: " + " ".join(
            f"{n}/{len(o['tokens'])}" for n, o in zip(w1["equal_greedy_tokens_per_turn"], w1["omnistream"])), file=out)


def cmd_audio(args) -> int:
    from omnistream.entrypoints.options import default_device

    model = args.model_config or args.model
    if model == "demo":
        raise SystemExit("error: bench audio needs a Qwen2.5-Omni model: --model-config omni-3b (or omni-tiny), or --model DIR")
    seconds = [float(s) for s in args.clips.split(",") if s.strip()]
    if not seconds or any(s <= 0 for s in seconds):
        raise SystemExit(f"error: --clips must be positive seconds, comma separated (got {args.clips!r})")
    report = run_audio(model, default_device(args.device), args.dtype, seconds, args.new_tokens, args.seed,
                       w1_seconds=args.w1_seconds, w1_size=args.w1_size, turns=args.turns, with_vad=not args.no_vad)
    print_audio(report)
    write_json(report, args.json)
    return 0
