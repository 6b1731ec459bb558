"""A decoder's architecture facts, from a ``config.json`` or a known name, and its parameter counts.

The counts are those of a Llama-layout decoder (Llama, Qwen2, Qwen3, Mistral, SmolLM): per layer
q/k/v/o projections (grouped-query attention), a SwiGLU MLP (gate, up, down) and two RMSNorms;
embeddings, a final norm and the output head (absent when tied to the embeddings). Qwen2 adds biases
to q, k and v; Llama's ``attention_bias`` adds them to all four projections, ``mlp_bias`` to the MLP;
Qwen3 adds a norm over each query and key head. ``tests/test_plan.py`` checks the counts against the
published totals and against a transformers model built from a written ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kdforge.errors import UserError

REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
LLAMA_LAYOUT = ("llama", "qwen2", "qwen3", "mistral", "smollm3")
# Where a config.json leaves tie_word_embeddings out, it means the architecture's default.
_UNTIED_BY_DEFAULT = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class Architecture:
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int
    model_type: str = "llama"
    qkv_bias: bool = False      # Qwen2: q, k and v projections carry a bias
    o_bias: bool = False        # Llama attention_bias: the output projection too
    mlp_bias: bool = False
    qk_norm: bool = False       # Qwen3: an RMSNorm over each query and key head

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_linear(self) -> int:
        """Weights of one layer's seven linear projections (what int8/4-bit quantisation stores compactly)."""
        h, i = self.hidden_size, self.intermediate_size
        return h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + 3 * h * i

    @property
    def layer_rows(self) -> int:
        """Output features of one layer's linear projections (int8 keeps one fp32 scale per row)."""
        return self.q_dim + 2 * self.kv_dim + self.hidden_size + 2 * self.intermediate_size + self.hidden_size

    @property
    def layer_biases(self) -> int:
        h = self.hidden_size
        n = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        if self.o_bias:
            n += h
        if self.mlp_bias:
            n += 2 * self.intermediate_size + h
        return n

    @property
    def layer_other(self) -> int:
        """One layer's norms and biases (kept in 16 bits by every quantisation)."""
        return 2 * self.hidden_size + self.layer_biases + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def layer_params(self) -> int:
        return self.layer_linear + self.layer_other

    @property
    def embedding(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head(self) -> int:
        """The output projection's own weights: 0 when it is the embedding matrix (tied)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        return self.num_hidden_layers * self.layer_params + self.embedding + self.head + self.hidden_size

    def with_layers(self, n: int) -> Architecture:
        """The same architecture with ``n`` decoder layers (a `kdforge student --num-layers` cut)."""
        if n < 1:
            raise UserError(f"{self.name}: a student needs at least one layer (got {n})")
        return replace(self, name=f"{self.name}, {n} layers", num_hidden_layers=n)

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "params": self.params}


def _known(name, h, layers, heads, kv, inter, vocab, tied, model_type="qwen2", qkv_bias=True) -> Architecture:
    return Architecture(name, h, layers, heads, kv, inter, vocab, tied, h // heads, model_type, qkv_bias=qkv_bias)


# Public architecture facts (the models' config.json files); the Instruct and base models share them.
KNOWN: dict[str, Architecture] = {
    "qwen2.5-72b-instruct": _known("Qwen2.5-72B-Instruct", 8192, 80, 64, 8, 29568, 152064, False),
    "qwen2.5-7b-instruct": _known("Qwen2.5-7B-Instruct", 3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-3b-instruct": _known("Qwen2.5-3B-Instruct", 2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-1.5b-instruct": _known("Qwen2.5-1.5B-Instruct", 1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-0.5b-instruct": _known("Qwen2.5-0.5B-Instruct", 896, 24, 14, 2, 4864, 151936, True),
    "smollm2-135m-instruct": _known("SmolLM2-135M-Instruct", 576, 30, 9, 3, 1536, 49152, True, "llama", False),
}


def _key(name: str) -> str:
    """``Qwen/Qwen2.5-7B-Instruct``, ``qwen2.5-7b``, ``embedded:smollm2-135m-instruct`` -> the table's key."""
    key = name.strip().lower().rsplit("/", 1)[-1].removeprefix("embedded:")
    return key if key.endswith("-instruct") else key + "-instruct"


def resolve(spec: str, role: str = "model") -> Architecture:
    """An HF folder, a ``config.json`` file or a known name -> its architecture."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"--{role} {spec}: the folder has no config.json")
    if path.is_file():
        if path.suffix == ".gguf":
            raise UserError(f"--{role} {spec}: plan reads a config.json; give the HF folder it came from or a "
                            "known name")
        return from_config_file(path)
    key = _key(spec)
    if key in KNOWN:
        return KNOWN[key]
    names = ", ".join(k.removesuffix("-instruct") for k in KNOWN)
    raise UserError(f"--{role} {spec!r}: not a folder, a config.json or a known name ({names})")


def from_config_file(path: Path) -> Architecture:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return from_config(data, str(path))


def _int(data: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = data.get(key)
    if value is None:
        if default is not None:
            return default
        raise UserError(f"{where}: missing '{key}' (plan needs {', '.join(REQUIRED)})")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: '{key}' must be a positive integer (got {value!r})")
    return value


def from_config(data: dict[str, Any], where: str) -> Architecture:
    """A transformers ``config.json`` mapping -> its architecture; a missing or bad field is named."""
    if "hidden_size" not in data and isinstance(data.get("text_config"), dict):
        data = data["text_config"]  # a multimodal config: its language model
    model_type = str(data.get("model_type") or "llama")
    if any(data.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise UserError(f"{where}: a mixture-of-experts config ({model_type}); plan counts dense decoders only")
    h = _int(data, "hidden_size", where)
    layers = _int(data, "num_hidden_layers", where)
    heads = _int(data, "num_attention_heads", where)
    inter = _int(data, "intermediate_size", where)
    vocab = _int(data, "vocab_size", where)
    kv = _int(data, "num_key_value_heads", where, default=heads)  # transformers' default: no grouping
    if heads % kv:
        raise UserError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if data.get("head_dim") is None and h % heads:
        raise UserError(f"{where}: hidden_size {h} is not a multiple of num_attention_heads {heads} "
                        "(and no head_dim is given)")
    head_dim = _int(data, "head_dim", where, default=h // heads)
    tied = data.get("tie_word_embeddings")
    if tied is None:
        tied = model_type not in _UNTIED_BY_DEFAULT
    bias = bool(data.get("attention_bias"))
    name = data.get("_name_or_path") or Path(where).parent.name or where
    return Architecture(
        name=str(name), hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=bool(tied), head_dim=head_dim,
        model_type=model_type, qkv_bias=model_type == "qwen2" or bias, o_bias=bias and model_type != "qwen2",
        mlp_bias=bool(data.get("mlp_bias")), qk_norm=model_type == "qwen3")


def layout_note(arch: Architecture) -> str | None:
    """A line for the report where the counts assume a layout the config does not name."""
    if arch.model_type in LLAMA_LAYOUT:
        return None
    return f"{arch.name}: model_type {arch.model_type!r} counted as a Llama-layout decoder"


def billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
