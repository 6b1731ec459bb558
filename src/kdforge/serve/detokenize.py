"""Token ids -> text, one token at a time, without ever emitting half a character.

Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM2) split a Chinese character or an emoji
into several tokens of raw bytes; decoding a prefix of them gives U+FFFD. SentencePiece vocabularies
drop a word's leading space when a token is decoded on its own. Both are handled by decoding a small
window that starts a few tokens back and emitting only what the newest tokens add to it, and by
holding text back while it ends in U+FFFD (an incomplete UTF-8 sequence).

Stop strings are applied on top: text that could be the start of a stop string is held back until
the next token settles it, so a stream never shows a stop string, or a piece of one.
"""

from __future__ import annotations

import re

from kdforge.models.token_bytes import byte_level_alphabet

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids with :meth:`push`; joined outputs plus :meth:`flush` equal decoding them all
    (less an incomplete character at the very end, which :meth:`flush` drops)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: decoded already, kept only as context for the next tokens
        self._read = 0  # tokens before this index have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new, complete text it settles (often '', never a split char)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            # ``after`` starts with ``before`` (same window start), so the difference is the new text.
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation), less a trailing incomplete character.

        Generation that stops inside a multi-byte character (``max_tokens`` reached after two of an
        emoji's four bytes) leaves bytes that are no character: they are dropped, never sent as U+FFFD.
        """
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):].rstrip(REPLACEMENT) if len(after) > len(before) else ""


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenPieces:
    """A token id's raw bytes and its text, for log-probabilities (cached: the vocabulary is fixed).

    Byte-level vocabularies (GPT-2, Llama 3, Qwen, SmolLM2) store each byte as one character;
    SentencePiece ones write a space as U+2581 and single bytes as ``<0xNN>``. A token that is only
    part of a character shows its bytes as ``\\xNN`` escapes in its text; ``bytes`` are exact.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel" or "ByteLevel" in repr(decoder)
        self._inverse = byte_level_alphabet() if self._byte_level else {}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="backslashreplace"), list(raw))
        return hit

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if self._byte_level and all(c in self._inverse for c in piece):
            return bytes(self._inverse[c] for c in piece)
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m[1], 16)])
        return piece.replace("\u2581", " ").encode("utf-8", errors="replace")


class StopStringFilter:
    """Cuts the text at the first stop string; holds back a tail that may grow into one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """New text in; the part that is safe to show out. Sets :attr:`stopped` on a match."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[:min(hits)]
        # Any stop string that starts in ``buf`` and is not complete yet begins in its last
        # (len(stop) - 1) characters; hold back the longest such tail that is a prefix of a stop.
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if s.startswith(buf[len(buf) - k:]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation the held tail is plain text (no stop string completed)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out
