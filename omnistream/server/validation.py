"""pydantic's validation errors as a user reads them.

pydantic reports a field typed as a union once per branch, with the branch in the location:
a content part with no `image_url` came out as
`messages.0.content.str: Input should be a valid string; messages.0.content.list[tagged-union[
TextPart,ImagePart,...]].0.image_url.image_url: Field required` (a fresh-clone trial). Here the
same error reads `messages[0].content[0].image_url: Field required`: branch markers and a tagged
union's tag are dropped from the path, and where one branch got further into the input than
another's plain type mismatch, only the branch that got further is reported.
"""

from __future__ import annotations

from typing import Any, Iterable

# pydantic's location elements that name a union branch, not a field: a type name, or a
# schema such as list[...], tagged-union[...], function-after[...]
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


def _is_branch(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in _TYPE_NAMES)


def _path(loc: Iterable[Any]) -> tuple[str, tuple]:
    """-> (readable path, the location up to its first branch marker). A tagged union's tag
    (the element after the marker and any list index) names the branch, not a field: dropped."""
    out, prefix, seen_branch, drop_tag = [], [], False, False
    for part in loc:
        if _is_branch(part):
            seen_branch = True
            drop_tag = drop_tag or "tagged-union" in part
            continue
        if not seen_branch:
            prefix.append(part)
        if isinstance(part, int):
            out.append(f"[{part}]")
            continue
        if drop_tag:
            drop_tag = False
            continue
        out.append(f".{part}" if out else str(part))
    return "".join(out), tuple(prefix)


def _message(e: dict) -> str:
    ctx = e.get("ctx") or {}
    if e.get("type") == "union_tag_invalid":
        return f"unknown {ctx.get('discriminator', 'type')} {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if e.get("type") == "extra_forbidden":
        return "unknown or unsupported field"
    return str(e.get("msg"))


def problems(errors: Iterable[dict], skip: tuple = ()) -> list[tuple[str, str, str]]:
    """pydantic's errors -> [(path, message, error type)], union branches folded (see the
    module); location elements in `skip` (FastAPI's "body") are left out."""
    rows = []
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p not in skip]
        where, prefix = _path(loc)
        branch_depth = sum(1 for p in loc if _is_branch(p))
        rows.append((where, prefix, branch_depth, len(loc), e))
    # a branch's plain type mismatch (`content.str: Input should be a valid string`) is noise
    # when another branch at the same place got deeper into the input
    deepest: dict[tuple, int] = {}
    for _, prefix, depth, n, _e in rows:
        if depth:
            deepest[prefix] = max(deepest.get(prefix, 0), n)
    kept = [(w, _message(e), str(e.get("type")))
            for w, prefix, depth, n, e in rows
            if not (depth and str(e.get("type", "")).endswith("_type") and n < deepest.get(prefix, 0))]
    return _merge_alternatives(kept)


def _merge_alternatives(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Type mismatches of every branch at one place (`content: Input should be a valid string;
    content: Input should be a valid array`) -> one row: `Input should be a valid string or a
    valid array`."""
    out: list[tuple[str, str, str]] = []
    for where, message, kind in rows:
        prev = out[-1] if out else None
        if prev and prev[0] == where and kind.endswith("_type") and prev[2].endswith("_type"):
            alt = message.removeprefix("Input should be ")
            out[-1] = (where, f"{prev[1]} or {alt}", prev[2])
        else:
            out.append((where, message, kind))
    return out
