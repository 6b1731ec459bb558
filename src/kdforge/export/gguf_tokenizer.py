"""The tokenizer metadata llama.cpp needs, read from a Hugging Face fast tokenizer.

A GGUF file carries no ``tokenizer.json``: llama.cpp rebuilds the tokenizer from metadata keys
(``tokenizer.ggml.*``). For a byte-level BPE vocabulary (GPT-2 style, which SmolLM2 and Qwen2 use)
those are:

- ``model``: ``"gpt2"`` (byte-level BPE);
- ``pre``: the name of the pre-tokenizer (the regex that splits text before BPE). llama.cpp cannot
  read a regex from the file, it only knows names, and a wrong name silently changes the ids;
- ``tokens`` in id order, ``token_type`` per token (normal, control for special tokens,
  user-defined for added non-special tokens, unused for padding rows), ``merges`` in rank order;
- the bos/eos/unk/pad ids, whether BOS/EOS are added, and the chat template.

Only byte-level BPE is supported: SentencePiece vocabularies (Llama 2, Mistral v1, Gemma) get a
clear error instead of a file that tokenizes wrongly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kdforge.errors import UserError

# llama.cpp's token types (llama_token_type / gguf.TokenType).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# Pre-tokenizer split patterns we recognise, by the name llama.cpp uses for them. A tokenizer whose
# first split is one of these gets that name; the rest are detected structurally in `detect_pre`.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_KNOWN_SPLITS = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}

# The first ids of SmolLM/SmolLM2's vocabulary (a StarCoder-family vocabulary of 49,152 tokens).
_SMOLLM_HEAD = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"]


class TokenizerExportError(UserError):
    """The tokenizer cannot be described in GGUF metadata (e.g. SentencePiece, or an unknown pre-tokenizer)."""


@dataclass
class GGUFTokenizer:
    """Everything the GGUF file says about the tokenizer (``tokenizer.ggml.*`` and the chat template)."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    pre_source: str = ""  # how `pre` was chosen (for the report)

    def write(self, writer) -> None:
        """Add the keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                   "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for name, token_id in self.special_ids.items():
            setters[name](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(False)  # byte-level BPE encodes the leading space itself
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _backend_json(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerExportError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; GGUF export needs a fast tokenizer "
            "(tokenizer.json)"
        )
    return json.loads(backend.to_str())


def _pre_parts(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre is None:
        return []
    return list(pre["pretokenizers"]) if pre.get("type") == "Sequence" else [pre]


def detect_pre(tokenizer, model_type: str | None = None) -> tuple[str, str]:
    """The llama.cpp pre-tokenizer name for ``tokenizer`` and a note on how it was chosen.

    Order: (1) a Split regex we know (Qwen2's, Llama 3's); (2) individual digits + GPT-2 regex
    (SmolLM's pre-tokenizer, llama.cpp "smollm"); (3) GPT-2 regex alone: "smollm" when the vocabulary
    is SmolLM's (transformers' GGUF reader rebuilds SmolLM2's tokenizer without the digit split; the
    vocabulary has no multi-digit tokens, so both give the same ids), else "gpt-2"; (4) otherwise by
    model type (qwen2 -> "qwen2"), else "gpt-2" with a warning in the note. Pass ``pre=`` to
    `tokenizer_metadata` to override.
    """
    spec = _backend_json(tokenizer)
    parts = _pre_parts(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    for p in parts:
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex")
            if regex in _KNOWN_SPLITS:
                return _KNOWN_SPLITS[regex], f"pre-tokenizer split regex is {_KNOWN_SPLITS[regex]}'s"
    byte_level_regex = any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts)
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    if byte_level_regex and digits and kinds[0] == "Digits":
        return "smollm", "pre-tokenizer: individual digits, then the GPT-2 regex"
    if byte_level_regex and kinds == ["ByteLevel"]:
        head = tokenizer.convert_ids_to_tokens(list(range(len(_SMOLLM_HEAD))))
        if head == _SMOLLM_HEAD:
            return "smollm", "GPT-2 regex and SmolLM's vocabulary"
        return "gpt-2", "pre-tokenizer is the GPT-2 regex"
    if model_type == "qwen2":
        return "qwen2", f"unrecognised pre-tokenizer {kinds}; chosen by model type qwen2"
    return "gpt-2", f"WARNING: unrecognised pre-tokenizer {kinds}; defaulted to gpt-2 (set pre= to override)"


def _merges(spec: dict[str, Any]) -> list[str]:
    # tokenizers >= 0.20 stores merges as [left, right] pairs, older versions as "left right".
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _adds_token(tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether encoding with special tokens puts ``token_id`` first (BOS) or last (EOS)."""
    if token_id is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) <= len(plain):
        return False
    return (with_special[0] if first else with_special[-1]) == token_id


def tokenizer_metadata(tokenizer, config=None, vocab_rows: int | None = None, pre: str | None = None) -> GGUFTokenizer:
    """Read a fast byte-level BPE tokenizer into `GGUFTokenizer`.

    ``vocab_rows`` is the embedding matrix's row count: llama.cpp requires one token per row, so rows
    beyond the tokenizer (Qwen2.5 pads 151,665 tokens to 151,936 rows) become ``[PAD<id>]`` tokens of
    type "unused", as llama.cpp's own converter writes them.
    """
    spec = _backend_json(tokenizer)
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise TokenizerExportError(
            f"only byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2, Llama 3) can be exported to GGUF; "
            f"this one is {spec['model']['type']} with pre-tokenizer "
            f"{[p.get('type') for p in _pre_parts(spec.get('pre_tokenizer'))]}"
        )
    n_tok = len(tokenizer)
    rows = vocab_rows if vocab_rows is not None else n_tok
    if rows < n_tok:
        raise TokenizerExportError(f"the model has {rows} embedding rows but the tokenizer has {n_tok} tokens")
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens: list[str] = []
    types: list[int] = []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)

    if pre is not None:
        pre_name, how = pre, "set explicitly"
    else:
        pre_name, how = detect_pre(tokenizer, getattr(config, "model_type", None))

    special: dict[str, int] = {}
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is None and config is not None and name in ("bos", "eos", "pad"):
            # Qwen2.5's tokenizer has no bos_token; llama.cpp would otherwise assume id 11.
            cfg_id = getattr(config, f"{name}_token_id", None)
            tid = cfg_id[0] if isinstance(cfg_id, list) and cfg_id else cfg_id
        if isinstance(tid, int) and 0 <= tid < rows:
            special[name] = tid
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return GGUFTokenizer(
        model="gpt2", pre=pre_name, tokens=tokens, token_types=types, merges=_merges(spec),
        special_ids=special,
        add_bos=_adds_token(tokenizer, tokenizer.bos_token_id, first=True),
        add_eos=_adds_token(tokenizer, tokenizer.eos_token_id, first=False),
        chat_template=template, pre_source=how,
    )
