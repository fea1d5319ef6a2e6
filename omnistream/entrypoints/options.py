"""The one map from option dataclasses to command-line flags: engine options, sampling
parameters and server settings, for `ask`, `demo`, `stream` and `serve`.

Flags are derived from the dataclasses' fields (EngineConfig with its CacheConfig and
SchedulerConfig, SamplingParams, ServerConfig), so a new field appears as a flag by itself:
`kv_cache_tokens` -> `--kv-cache-tokens` (the Python name with dashes; the underscore spelling
is accepted too), its type from the annotation, its help from the comment beside the field,
its default from the dataclass. A flag left out is not passed on, so the dataclass stays the
only place a default lives.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# model, device, dtype: the shared --model / --device / --dtype flags of every command
ENGINE_TOP_LEVEL_SKIP = {"model", "device", "dtype"}
SAMPLING_SKIP = {"ignore_eos"}  # benchmark knob, not a user's
GIB = 1 << 30
_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# help for fields whose comment is missing or written for Python readers; every other flag's
# help is its field's comment
HELP = {
    "temperature": "sampling temperature; 0: greedy (the most likely token every step)",
    "top_p": "nucleus sampling: sample among the most likely tokens whose probabilities add up to this",
    "top_k": "sample among the k most likely tokens; 0: off",
    "max_new_tokens": "most tokens in one answer",
    "seed": "seed of the request's sampler: the same seed gives the same tokens",
    "stop_token_ids": "token ids that end the answer, comma separated, in addition to the model's end tokens",
    "host": "address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)",
    "port": "TCP port to listen on (0: any free port; the startup line says which)",
}


@dataclass(frozen=True)
class Option:
    """One dataclass field as a flag."""

    name: str  # the Python name (keyword argument / field)
    kind: type  # int, float, str, bool, Path, tuple
    default: Any  # the dataclass default (shown in the help, never passed on)
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def default_device(arg: str | None) -> str:
    """--device as given, else cuda where a GPU is visible, else cpu."""
    if arg:
        return arg
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------- values
def parse_bytes(text: str) -> int:
    """'1073741824', '1GiB', '512MiB', '64M', '2g' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kKmMgGtT])(?:i?[bB])?|[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected bytes, e.g. 1073741824 or 8GiB, got {text!r}")
    value = float(m.group(1)) * (_SIZE_SUFFIXES[m.group(2).lower()] if m.group(2) else 1)
    return int(value)


def parse_int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, comma separated, got {text!r}") from None


def at_least(kind: type, minimum: float, *, strict: bool = False) -> Callable[[str], Any]:
    """argparse type: an int (kind int) or a number (kind float) >= minimum (> with strict)."""
    what = "an integer" if kind is int else "a number"

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum):  # NaN is refused too
            bound = f"> {minimum}" if strict else (f"at least {minimum}" if kind is int else f">= {minimum}")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return convert


def _typed(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return convert


def _parser_for(opt: Option) -> Callable[[str], Any] | None:
    if opt.kind is int:
        return parse_bytes if opt.name.endswith("_bytes") else _typed(int, "an integer")
    if opt.kind is float:
        return _typed(float, "a number")
    if opt.kind is tuple:
        return parse_int_list
    if opt.kind is Path:
        return Path
    return str


# ---------------------------------------------------------------------------------- fields
def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} from the class source: the comment on the field's line, else the
    comment lines right above it. The comments are the fields' documentation (style.md: each
    field documented in one line), so the help text cannot drift from them."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (frozen install): flags without help text
        return {}
    names = {f.name for f in dataclasses.fields(cls)}  # a docstring line that looks like a field is not one
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"\s+(\w+)\s*:[^=#]*(?:=[^#]*)?(?:#\s*(.*))?$", line)
        if m and m.group(1) in names:
            out[m.group(1)] = _for_cli(m.group(2) or _first_clause(" ".join(pending)))
        pending = []
    return out


def _first_clause(text: str) -> str:
    """A comment block above a field explains at length; the help takes its first clause."""
    m = re.match(r"(.{20,}?)\s*[(:;]", text)
    return m.group(1) if m else text


def _for_cli(text: str) -> str:
    return re.sub(r"\bNone\b", "unset", text)  # a flag is left out, not set to None


def _kind(annotation: Any) -> type:
    """int | None -> int; tuple[int, ...] -> tuple."""
    base = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        base = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(base) or base


def options_of(cls: type, skip: set[str] = frozenset()) -> list[Option]:
    """The flag-able fields of a dataclass (nested dataclass fields are left to the caller)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = _kind(hints[f.name])
        if f.name in skip or dataclasses.is_dataclass(kind):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(Option(f.name, kind, default, HELP.get(f.name) or comments.get(f.name, "")))
    return out


def engine_option_list() -> list[Option]:
    """Every keyword argument of Engine.from_pretrained except model/device/dtype: the fields of
    EngineConfig's nested configs and its own scalar fields (EngineConfig.from_kwargs's map)."""
    from omnistream.config import CacheConfig, EngineConfig, SchedulerConfig

    return [*options_of(CacheConfig), *options_of(SchedulerConfig), *options_of(EngineConfig, ENGINE_TOP_LEVEL_SKIP)]


def sampling_option_list() -> list[Option]:
    from omnistream.engine.sampling import SamplingParams

    return options_of(SamplingParams, SAMPLING_SKIP)


def server_option_list(skip: set[str] = frozenset()) -> list[Option]:
    from omnistream.server.config import ServerConfig

    return options_of(ServerConfig, skip)


# ---------------------------------------------------------------------------------- flags
def _show(opt: Option, default: Any) -> str:
    if default is None:
        return "unset"
    if opt.kind is bool:
        return "on" if default else "off"
    if opt.name.endswith("_bytes") and isinstance(default, int) and default >= 1 << 20:
        return f"{default} = {default / (1 << 20):g} MiB"
    if isinstance(default, tuple):
        return ",".join(map(str, default)) or "none"
    return str(default)


def _add(group, opt: Option, default: Any, dest_prefix: str, command_default: Any = None, shown: str | None = None) -> None:
    """command_default: a default of this command that differs from the dataclass's (it is
    passed on like a given value); otherwise an absent flag is None and not passed. shown:
    what the help says the default is, where the command decides it elsewhere."""
    text = opt.help.replace("%", "%%")  # argparse formats help with %
    shown = (shown or _show(opt, default)).replace("%", "%%")
    if default is None and shown == "unset" and "unset:" in text:  # the comment already says what unset means
        help_text = text
    else:
        help_text = f"{text} (default: {shown})" if text else f"default: {shown}"
    dest = dest_prefix + opt.name
    if opt.kind is bool:
        group.add_argument(opt.flag, dest=dest, action=argparse.BooleanOptionalAction, default=command_default, help=help_text)
    else:
        group.add_argument(opt.flag, dest=dest, type=_parser_for(opt), default=command_default, metavar=_metavar(opt), help=help_text)


def _choices(name: str) -> tuple[str, ...] | None:
    """The values a text option takes, where there is a fixed list (shown in --help)."""
    from omnistream.config import PREFILL_CAP_SCOPES
    from omnistream.layers.quant import WEIGHT_QUANT_MODES

    return {"prefill_cap_scope": PREFILL_CAP_SCOPES, "weight_quant": WEIGHT_QUANT_MODES}.get(name)


def _metavar(opt: Option) -> str:
    if _choices(opt.name):
        return "{" + ",".join(_choices(opt.name)) + "}"
    if opt.name.endswith("_bytes"):
        return "BYTES"
    if opt.name.endswith("_file"):
        return "FILE"
    return {int: "N", float: "X", tuple: "IDS", Path: "DIR"}.get(opt.kind, "TEXT")


def _given(args: argparse.Namespace, prefix: str, options: list[Option]) -> dict[str, Any]:
    return {o.name: getattr(args, prefix + o.name) for o in options if getattr(args, prefix + o.name, None) is not None}


ENGINE_PREFIX, SAMPLING_PREFIX, SERVER_PREFIX = "engine_", "sampling_", "server_"


def add_engine_args(parser: argparse.ArgumentParser, shown: dict[str, str] | None = None) -> None:
    """Engine.from_pretrained's keyword arguments as flags (+ --memory-budget-gib); `shown`
    replaces the help's default of a field the command decides itself (serve: engine_process)."""
    group = parser.add_argument_group("engine options (keyword arguments of Engine.from_pretrained)")
    shown = shown or {}
    for opt in engine_option_list():
        _add(group, opt, opt.default, ENGINE_PREFIX, shown=shown.get(opt.name))
        if opt.name == "memory_budget_bytes":
            group.add_argument("--memory-budget-gib", dest="memory_budget_gib", type=_typed(float, "a number"), default=None,
                               metavar="GIB", help="the same budget in GiB (e.g. 10 or 9.5); give one of the two")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags the user gave -> keyword arguments of Engine.from_pretrained."""
    from omnistream.errors import ConfigError

    out = _given(args, ENGINE_PREFIX, engine_option_list())
    gib = getattr(args, "memory_budget_gib", None)
    if gib is not None:
        if "memory_budget_bytes" in out:
            raise ConfigError("give --memory-budget-bytes or --memory-budget-gib, not both")
        if not gib > 0:
            raise ConfigError(f"--memory-budget-gib must be positive, got {gib:g}")
        out["memory_budget_bytes"] = int(gib * GIB)
    return out


def check_engine_options(device: str, dtype: str, options: dict[str, Any]) -> None:
    """Validates the options as the engine will (EngineConfig), before a model is loaded; the
    error names the flags (`--prefill-cap-scope`), not the Python fields."""
    from omnistream.config import EngineConfig

    with flag_names(engine_option_list()):
        EngineConfig.from_kwargs("-", device=device, dtype=dtype, **options)


@contextmanager
def flag_names(option_list: list[Option], extra: tuple[str, ...] = ()):
    """A ConfigError / UserInputError raised inside names the options' flags, not their fields:
    `kv_cache_tokens must ...` -> `--kv-cache-tokens must ...` (the CLI's errors name what the
    user typed; a fresh-clone trial)."""
    from omnistream.errors import ConfigError, UserInputError

    try:
        yield
    except (ConfigError, UserInputError) as e:
        flags = {o.name: o.flag for o in option_list} | {n: "--" + n.replace("_", "-") for n in extra}
        raise type(e)(as_flags(str(e), flags)) from None


def as_flags(message: str, flags: dict[str, str]) -> str:
    """Each field name in `message` (a whole word, not already a flag) -> its flag."""
    for name in sorted(flags, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flags[name], message)
    return message


def add_sampling_args(parser: argparse.ArgumentParser, title: str = "sampling options", shown: dict[str, str] | None = None,
                      **defaults: Any) -> None:
    """SamplingParams fields as flags; `defaults` overrides a field's default for this command
    (e.g. ask answers 64 tokens, not 128); `shown` replaces the help's default of a field the
    command decides elsewhere (serve: the request's fields)."""
    group = parser.add_argument_group(title)
    shown = shown or {}
    for opt in sampling_option_list():
        _add(group, opt, defaults.get(opt.name, opt.default), SAMPLING_PREFIX, defaults.get(opt.name), shown.get(opt.name))


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given (or defaulted by the command) -> SamplingParams keyword arguments."""
    return _given(args, SAMPLING_PREFIX, sampling_option_list())


def sampling_params(args: argparse.Namespace):
    """-> SamplingParams (a bad value raises UserInputError naming the field)."""
    from omnistream.engine.sampling import SamplingParams

    with flag_names(sampling_option_list()):
        return SamplingParams(**sampling_kwargs(args))


def add_server_args(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    """ServerConfig fields as flags (host, port, api key, media switches, limits)."""
    group = parser.add_argument_group("server options (ServerConfig)")
    for opt in server_option_list(skip):
        _add(group, opt, opt.default, SERVER_PREFIX)


def server_config(args: argparse.Namespace, **overrides: Any):
    """The server flags the user gave -> ServerConfig (validated: ConfigError names the field)."""
    from omnistream.server.config import ServerConfig

    with flag_names(server_option_list()):
        return ServerConfig(**(_given(args, SERVER_PREFIX, server_option_list()) | overrides))


def normalize_argv(argv: list[str]) -> list[str]:
    """--kv_cache_tokens -> --kv-cache-tokens (the Python spelling works as well); values and
    positional arguments are left alone."""
    out = []
    for a in argv:
        if a.startswith("--") and "_" in a.split("=", 1)[0]:
            name, sep, value = a.partition("=")
            a = name.replace("_", "-") + sep + value
        out.append(a)
    return out


def to_flags(values: dict[str, Any]) -> list[str]:
    """Keyword arguments -> the flags that give them (the inverse of engine_options and
    friends), for a command started in a subprocess with the same options."""
    out = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out
