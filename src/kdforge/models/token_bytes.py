"""What bytes each token id stands for: the common ground of two tokenizers.

Two tokenizers of the same text agree only on its bytes, so cross-tokenizer alignment
(kdforge.distill.cross_tokenizer), vocabulary trimming and transplants all start here. Supported
encodings of a token's text, which together cover the Hugging Face fast tokenizers of the common
model families:
  - byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2): each character of a piece stands for one byte
    through GPT-2's printable-byte alphabet;
  - SentencePiece-style pieces (Gemma, Llama 2, Mistral): ``▁`` stands for a space and ``<0xAB>``
    for the byte 0xAB (byte fallback); every other piece is its own UTF-8 text.
Special (control) tokens stand for no text: their entry is None. Added tokens that are not special
stand for their own content.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

SPIECE_SPACE = "\u2581"  # ▁
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenBytesError(ValueError):
    """A tokenizer whose pieces kdforge cannot map to bytes (named in the message)."""


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map from the printable character standing for a byte back to the byte (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def backend_spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenBytesError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; kdforge needs a fast "
                              "one (a tokenizer.json)")
    return json.loads(backend.to_str())


def _parts(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [q for p in spec.get("pretokenizers", spec.get("decoders", spec.get("normalizers", [])))
                for q in _parts(p)]
    return [spec]


def encoding_kind(tokenizer) -> str:
    """``byte_level`` or ``sentencepiece``: how the tokenizer's pieces spell their bytes."""
    spec = backend_spec(tokenizer)
    kinds = {p.get("type") for key in ("pre_tokenizer", "decoder") for p in _parts(spec.get(key))}
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"Metaspace", "ByteFallback", "Replace"} or spec.get("model", {}).get("byte_fallback"):
        return "sentencepiece"
    normalizers = _parts(spec.get("normalizer"))
    if any(n.get("type") == "Replace" and SPIECE_SPACE in json.dumps(n, ensure_ascii=False) for n in normalizers):
        return "sentencepiece"
    raise TokenBytesError(f"unsupported tokenizer encoding (pre-tokenizer/decoder types {sorted(k for k in kinds if k)}"
                          "): kdforge maps byte-level BPE and SentencePiece-style pieces to bytes")


def piece_bytes(piece: str, kind: str) -> bytes:
    """The bytes one vocabulary piece stands for."""
    if kind == "byte_level":
        table = byte_level_alphabet()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:
            return piece.encode("utf-8")  # an added, non-special token written as plain text
    m = _BYTE_PIECE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace(SPIECE_SPACE, " ").encode("utf-8")


def special_ids(tokenizer) -> set[int]:
    """Ids of the control tokens: the declared special tokens and every added token marked special."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def token_bytes(tokenizer) -> list[bytes | None]:
    """Per token id (0 .. len(tokenizer) - 1): the bytes it stands for, or None for a control token."""
    kind = encoding_kind(tokenizer)
    special = special_ids(tokenizer)
    added = {int(i): a for i, a in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    out: list[bytes | None] = []
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for i, piece in enumerate(pieces):
        if i in special:
            out.append(None)
        elif i in added:
            out.append(str(getattr(added[i], "content", piece)).encode("utf-8"))
        elif piece is None:
            out.append(b"")
        else:
            out.append(piece_bytes(piece, kind))
    return out


def text_of(table: list[bytes | None], ids: list[int]) -> bytes:
    """The bytes a token sequence stands for (control tokens contribute none)."""
    return b"".join(table[i] or b"" for i in ids)
