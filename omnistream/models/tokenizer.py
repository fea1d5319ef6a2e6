"""The Qwen2 BPE tokenizer and chat template, without transformers.

``Tokenizer(model_dir)`` reads ``tokenizer.json`` with the ``tokenizers`` library (the same
Rust tokenizer transformers' fast tokenizer wraps, so ids are identical) and the chat template
from ``tokenizer_config.json`` / ``chat_template.json`` / ``chat_template.jinja``. The template
is rendered with a sandboxed jinja2 environment configured exactly as transformers configures
it (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``tojson``,
``strftime_now``), so rendered strings match ``AutoTokenizer.apply_chat_template``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omnistream.errors import ConfigError, UserInputError
from omnistream.models.hf_config import TOKEN_IDS
from omnistream.models.qwen2_5_omni_config import OMNI_TOKEN_IDS

__all__ = ["Tokenizer", "QWEN2_5_VL_CHAT_TEMPLATE", "SPECIAL_TOKENS"]

# The chat template shipped with Qwen/Qwen2.5-VL-{3,7,32,72}B-Instruct (chat_template.json).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# token string -> attribute name on Tokenizer / key in TOKEN_IDS
SPECIAL_TOKENS: dict[str, str] = {
    "<|endoftext|>": "bos_token_id",
    "<|im_start|>": "im_start_token_id",
    "<|im_end|>": "im_end_token_id",
    "<|vision_start|>": "vision_start_token_id",
    "<|vision_end|>": "vision_end_token_id",
    "<|vision_pad|>": "vision_pad_token_id",
    "<|image_pad|>": "image_token_id",
    "<|video_pad|>": "video_token_id",
}
# Qwen2.5-Omni's tokenizer names the same ids differently
_OMNI_NAMES: dict[str, str] = {
    "<|vision_bos|>": "vision_start_token_id",
    "<|vision_eos|>": "vision_end_token_id",
    "<|IMAGE|>": "image_token_id",
    "<|VIDEO|>": "video_token_id",
}
# audio tokens: only Qwen2.5-Omni's tokenizer has them (the same ids are other tokens in
# Qwen2.5-VL's); absent, the attributes are None
AUDIO_TOKENS: dict[str, str] = {
    "<|AUDIO|>": "audio_token_id",
    "<|audio_bos|>": "audio_start_token_id",
    "<|audio_eos|>": "audio_end_token_id",
}


class Tokenizer:
    """Qwen2 tokenizer of a model directory.

    Attributes ``bos_token_id`` (<|endoftext|>), ``eos_token_id`` (<|im_end|>),
    ``pad_token_id``, ``im_start_token_id``, ``im_end_token_id``, ``vision_start_token_id``,
    ``vision_end_token_id``, ``vision_pad_token_id``, ``image_token_id`` (<|image_pad|>),
    ``video_token_id`` (<|video_pad|>) are read from the tokenizer and checked against the
    reference table (Qwen2.5-Omni's names <|vision_bos|>, <|IMAGE|>, ... are accepted), and
    ``audio_token_id`` (<|AUDIO|>), ``audio_start_token_id``, ``audio_end_token_id`` (None
    without audio tokens).
    """

    def __init__(self, model_dir: str | Path, *, chat_template: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer  # light import, no transformers

        self.model_dir = Path(model_dir)
        tok_path = self.model_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise ConfigError(f"no tokenizer.json in {self.model_dir}")
        try:
            self._tok = _HFTokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ConfigError(f"cannot load {tok_path}: {e}") from e
        self._tok.no_padding()
        self._tok.no_truncation()
        self._literal = None  # made on first use by encode_literal
        self._special: tuple[str, ...] | None = None

        self._config = _read_json(self.model_dir / "tokenizer_config.json") or {}
        omni = {tok: name for name, tok in _OMNI_NAMES.items()}
        for name, tok in SPECIAL_TOKENS.items():
            if self._tok.token_to_id(name) is None and tok in omni:
                name = omni[tok]  # a Qwen2.5-Omni tokenizer
            tid = self._tok.token_to_id(name)
            if tid is None:
                raise ConfigError(f"{tok_path}: special token {name} missing")
            if tid != TOKEN_IDS[tok]:
                raise ConfigError(
                    f"{tok_path}: {name} has id {tid}, expected {TOKEN_IDS[tok]} (not a Qwen2 "
                    "tokenizer?)"
                )
            setattr(self, tok, tid)
        for name, tok in AUDIO_TOKENS.items():
            tid = self._tok.token_to_id(name)
            if tid is not None and tid != OMNI_TOKEN_IDS[tok]:
                raise ConfigError(f"{tok_path}: {name} has id {tid}, expected {OMNI_TOKEN_IDS[tok]}")
            setattr(self, tok, tid)
        self.audio_token_id: int | None
        self.audio_start_token_id: int | None
        self.audio_end_token_id: int | None
        self.bos_token_id: int
        self.im_start_token_id: int
        self.im_end_token_id: int
        self.vision_start_token_id: int
        self.vision_end_token_id: int
        self.vision_pad_token_id: int
        self.image_token_id: int
        self.video_token_id: int
        self.eos_token = _token_content(self._config.get("eos_token")) or "<|im_end|>"
        self.pad_token = _token_content(self._config.get("pad_token")) or "<|endoftext|>"
        self.eos_token_id = self._require_id(self.eos_token)
        self.pad_token_id = self._require_id(self.pad_token)
        added = self._tok.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in added.items() if t.special
        )
        self.added_token_ids: frozenset[int] = frozenset(added)

        if chat_template is None:
            chat_template = _load_chat_template(self.model_dir, self._config)
        self.chat_template: str = chat_template or QWEN2_5_VL_CHAT_TEMPLATE

    # -- basic -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer knows (base vocab + added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def image_pad_token_id(self) -> int:
        return self.image_token_id

    @property
    def video_pad_token_id(self) -> int:
        return self.video_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``...)
        become single ids, exactly as transformers' tokenizer does. Adds no BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_literal(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token strings as plain text (``<|im_end|>`` is
        ``<``, ``|``, ``im``, ...): what users write can never become a control token."""
        if self._literal is None:  # a copy that does not match added tokens (thread-safe: never toggled)
            from tokenizers import Tokenizer as _HFTokenizer

            literal = _HFTokenizer.from_str(self._tok.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal.encode(text, add_special_tokens=False).ids

    def special_strings(self) -> tuple[str, ...]:
        """Every added special token's string (what models/literal_text.py looks for in users' text)."""
        if self._special is None:
            self._special = tuple(t.content for t in self._tok.get_added_tokens_decoder().values() if t.special)
        return self._special

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def _require_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ConfigError(f"{self.model_dir}: token {token!r} is not in the vocabulary")
        return tid

    # -- chat template ---------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (OpenAI/HF style: ``{"role", "content": str | [parts]}``) to
        the prompt string. Extra keyword arguments (e.g. ``add_vision_id=True``) are passed to
        the template, as in transformers."""
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        import jinja2

        template = _compile_template(self.chat_template)
        context = {
            "bos_token": None,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            **kwargs,
        }
        try:
            return template.render(
                messages=list(messages),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as e:
            raise UserInputError(f"cannot render the chat template for these messages: {e}") from e

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_dir)!r}, vocab={self.vocab_size})"


# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping):
        return tok.get("content")
    return None


def _load_chat_template(model_dir: Path, config: Mapping[str, Any]) -> str | None:
    """Same precedence as transformers: chat_template.jinja, then chat_template.json
    (processor), then tokenizer_config.json."""
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    ct = _read_json(model_dir / "chat_template.json")
    if ct and isinstance(ct.get("chat_template"), str):
        return ct["chat_template"]
    t = config.get("chat_template")
    if isinstance(t, str):
        return t
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        for entry in t:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                return entry.get("template")
    return None


@lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        """Accepts transformers' ``{% generation %}...{% endgeneration %}`` (renders the body;
        assistant-mask tracking is not needed here)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(
                self.call_method("_render"), [], [], body
            ).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"invalid chat template: {e}") from e
