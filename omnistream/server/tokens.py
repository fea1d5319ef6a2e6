"""An answer's text on the wire: stop strings (StopText) and tokens in OpenAI's logprobs shape
(TokenText)."""

from __future__ import annotations

from functools import lru_cache

from omnistream.engine.protocol import TokenLogprob
from omnistream.models.tokenizer import Tokenizer
from omnistream.server.openai_protocol import TokenLogprobOut, TopLogprob


class StopText:
    """The answer's text as deltas arrive, cut before the first stop string. Text that could be
    the start of a stop string is held back until later text decides, so no stop string (nor
    its beginning) is ever sent."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.longest = max(map(len, stops), default=0)
        self.text = ""  # the answer so far (cut at the stop string once one is found)
        self.sent = 0  # characters of `text` released
        self.hit = False

    def feed(self, new: str) -> str:
        """Appends a delta's text; returns what may be sent now."""
        if self.hit or not new:
            return ""
        start = max(0, len(self.text) - self.longest + 1)  # a new match ends in the new text
        self.text += new
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text, self.hit = self.text[: min(found)], True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """The answer ended: the held-back text is not a stop string after all."""
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest unsent suffix that begins some stop string."""
        for k in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _release(self, upto: int) -> str:
        out = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (Qwen2 uses it): printable character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """Token id -> (text, UTF-8 bytes) as OpenAI's logprobs report them: a token that is part of
    a multi-byte character shows its bytes escaped (\\xe4), its `bytes` let clients join them."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = _byte_decoder()
        self.piece = lru_cache(maxsize=65536)(self._piece)

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        token = self.tokenizer.id_to_token(token_id)
        if token is None:  # an id past the tokenizer's vocabulary (padded embedding rows)
            return "", []
        if token_id in self.tokenizer.added_token_ids or any(ch not in self._decoder for ch in token):
            raw = token.encode()  # special / added tokens are stored as plain text
        else:
            raw = bytes(self._decoder[ch] for ch in token)
        return raw.decode("utf-8", errors="backslashreplace"), list(raw)

    def logprob(self, token_id: int, lp: TokenLogprob) -> TokenLogprobOut:
        value, top = lp
        text, raw = self.piece(token_id)
        alts = []
        for t, v in top:
            alt_text, alt_raw = self.piece(t)
            alts.append(TopLogprob(token=alt_text, logprob=v, bytes=alt_raw))
        return TokenLogprobOut(token=text, logprob=value, bytes=raw, top_logprobs=alts)
