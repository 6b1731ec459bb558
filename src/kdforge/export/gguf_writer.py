"""Write a Hugging Face Llama or Qwen2 causal LM as a GGUF file, with the `gguf` package alone.

What llama.cpp expects, and what this module does about it:

- Tensor names: HF ``model.layers.N.self_attn.q_proj.weight`` -> GGUF ``blk.N.attn_q.weight`` and so on
  (`gguf_name`). The output projection ``lm_head`` is omitted when tied to the embedding: llama.cpp
  then reads ``token_embd`` for both.
- Shapes: a PyTorch Linear weight is (out, in), row-major. GGUF lists dimensions innermost first, so the
  same bytes are a GGUF tensor of shape [in, out]; quantisation blocks run along ``in`` (a row), which
  therefore must be a multiple of the block size (32 for Q8_0/Q4_0).
- Llama's rotary embedding: HF rotates the two halves of each head (dimension i pairs with
  i + head_dim/2), llama.cpp rotates adjacent pairs (2i, 2i+1). The q and k rows of every head are
  reordered so that pairs become adjacent (`permute_qk`); transformers' GGUF loader undoes it.
  Qwen2 uses llama.cpp's NeoX rope (halves, like HF) and is written unpermuted.
- 1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them; 2-D tensors get the
  requested type, except the ones named in ``keep_f16`` and the output projection (``output.weight``, or
  ``token_embd.weight`` when tied: it is the output projection), which a 4/5-bit file keeps at Q8_0 as
  llama.cpp's ``llama-quantize`` does (`kdforge.models.quant_grid.output_grid`) unless ``pure``.

The file is written under a temporary name and renamed into place, so a failure never leaves a
half-written ``.gguf`` behind.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge.artifacts import atomic_file
from kdforge.errors import UserError
from kdforge.export.formats import QUANT_NAMES
from kdforge.export.gguf_tokenizer import tokenizer_metadata
from kdforge.export.gptq import CALIBRATED_TYPES, Rounded, gptq_round, pack, reference_scales, round_to_nearest
from kdforge.models.quant_grid import decompose, output_grid


class GGUFExportError(UserError):
    """The model cannot be written as GGUF (architecture, config feature or tensor shape)."""



# HF model_type -> GGUF architecture name. Only these two are written and tested.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# Per-layer tensors: HF suffix after "model.layers.N." -> GGUF suffix after "blk.N.".
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",  # Qwen2 only
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _qtype(name: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q5_1": Q.Q5_1, "q5_0": Q.Q5_0,
            "q4_1": Q.Q4_1, "q4_0": Q.Q4_0}[name]


def _file_type(name: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q5_1": F.MOSTLY_Q5_1, "q5_0": F.MOSTLY_Q5_0, "q4_1": F.MOSTLY_Q4_1, "q4_0": F.MOSTLY_Q4_0}[name]


def gguf_name(hf_name: str) -> str | None:
    """GGUF tensor name for an HF Llama/Qwen2 state-dict key, or None if it has no GGUF counterpart."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"blk.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's half-split rotary layout to llama.cpp's adjacent pairs.

    ``w`` is (n_head * head_dim, in) (or a bias, (n_head * head_dim,)). Within a head, HF row
    ``half * head_dim/2 + j`` (half in {0, 1}) becomes row ``2j + half``: view the head's rows as
    (2, head_dim/2), transpose to (head_dim/2, 2), flatten.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def check_supported(config, class_name: str | None = None) -> str:
    """The GGUF architecture for ``config``, or a GGUFExportError saying what is not supported."""
    model_type = getattr(config, "model_type", None)
    archs = [class_name] if class_name else (getattr(config, "architectures", None) or [model_type])
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export supports Llama (LlamaForCausalLM) and Qwen2 (Qwen2ForCausalLM) models; "
            f"this model is {archs[0]} (model_type={model_type!r})"
        )
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    legacy = getattr(config, "rope_scaling", None)
    if rope_type not in (None, "default") or (isinstance(legacy, dict) and legacy.get("rope_type", "default")
                                              not in (None, "default")):
        raise GGUFExportError(f"rope scaling {rope_type or legacy!r} is not supported by kdforge's GGUF export")
    if model_type == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise GGUFExportError("Llama models with attention or MLP biases are not supported by the GGUF export")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if model_type == "llama" and head_dim % 2:
        raise GGUFExportError(f"head_dim {head_dim} is odd; rotary embeddings need an even head dimension")
    return ARCHITECTURES[model_type]


def _add_hyperparameters(writer, config, arch: str, vocab_rows: int) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(int(vocab_rows))
    if arch == "llama":
        writer.add_rope_dimension_count(int(head_dim))
    if head_dim * heads != config.hidden_size:
        # llama.cpp assumes head_dim = hidden / heads unless told.
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))


@dataclass
class _Planned:
    hf_name: str
    name: str  # GGUF name
    shape: tuple[int, ...]  # HF layout: (out, in) or (n,)
    qtype_name: str
    permute_heads: int | None = None  # Llama q/k: heads to permute over

    def array(self, tensor: torch.Tensor) -> np.ndarray:
        """The tensor as float32 numpy, permuted for llama.cpp where needed."""
        w = tensor.detach().to("cpu", torch.float32).numpy()
        return permute_qk(w, self.permute_heads) if self.permute_heads else w


def _is_tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is None or out.weight.data_ptr() == inp.weight.data_ptr()


def _matches(name: str, patterns: Sequence[str]) -> bool:
    base = name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


def plan_tensors(model, quant: str, keep_f16: Sequence[str] = (), allow_fallback: bool = False,
                 pure: bool = False) -> list[_Planned]:
    """Map, permute and choose a type for every tensor; raise before anything is written."""
    from gguf import GGML_QUANT_SIZES

    if quant not in QUANT_NAMES:
        raise GGUFExportError(f"unknown GGUF type {quant!r}; the gguf package can write: {', '.join(QUANT_NAMES)}")
    config = model.config
    arch = check_supported(config, type(model).__name__)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = _is_tied(model)
    planned: list[_Planned] = []
    unknown: list[str] = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = gguf_name(hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        shape = tuple(tensor.shape)
        heads = None
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = n_head if ".attn_q." in name else n_kv
        if len(shape) == 1:
            qname = "f32"
        elif _matches(name, keep_f16):
            qname = "f16"
        elif not pure and (name == "output.weight" or (tied and name == "token_embd.weight")):
            qname = output_grid(quant)
        else:
            qname = quant
        block = GGML_QUANT_SIZES[_qtype(qname)][0]
        if shape[-1] % block:
            if not allow_fallback:
                raise GGUFExportError(
                    f"tensor {name} ({hf_name}, shape {shape}) has rows of {shape[-1]} values, not a "
                    f"multiple of {qname.upper()}'s block size {block}; export as f16, keep it at f16 with "
                    f"--keep-f16 {name.rsplit('.', 1)[0]}, or pass --allow-fallback to write such tensors as f16"
                )
            qname = "f16"
        planned.append(_Planned(hf_name, name, shape, qname, heads))
    if unknown:
        raise GGUFExportError(f"no GGUF name for tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; "
                              f"the {arch} export covers standard Llama/Qwen2 checkpoints only")
    return planned


def _rounded_blocks(t: _Planned, weight: torch.Tensor, hessian: torch.Tensor | None) -> tuple[np.ndarray, int]:
    """Q8_0/Q4_0 blocks of a 2-D weight, rounded by GPTQ (``hessian`` given) or to nearest, rows permuted
    for llama.cpp like `_Planned.array`; with how many blocks got a scale fitted to the source's grid."""
    w = weight.detach().to("cpu", torch.float32)
    if hessian is not None:
        rounded = gptq_round(w, hessian.cpu(), t.qtype_name)
    else:
        rounded = round_to_nearest(w, t.qtype_name)
    fitted = int((rounded.d != reference_scales(w, t.qtype_name)).sum())
    return _packed(t, rounded), fitted


def _packed(t: _Planned, rounded: Rounded) -> np.ndarray:
    """GGUF bytes of ``rounded`` (HF row order), rows permuted for llama.cpp like `_Planned.array`."""
    if t.permute_heads:
        rounded = rounded.permute_rows(permute_qk(np.arange(t.shape[0]), t.permute_heads))
    return pack(rounded, t.qtype_name)


def write_gguf(
    model,
    tokenizer,
    path: str | Path,
    quant: str = "f16",
    keep_f16: Sequence[str] = (),
    allow_fallback: bool = False,
    pre: str | None = None,
    name: str | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    pure: bool = False,
) -> dict[str, Any]:
    """Write ``model`` (an HF Llama/Qwen2 causal LM) and ``tokenizer`` to ``path`` as one GGUF file.

    ``hessians`` (state-dict name -> input second moment, see `kdforge.export.calibration`): the Q8_0
    and Q4_0 tensors named there are rounded by GPTQ instead of to nearest (`kdforge.export.gptq`). Q8_0
    blocks whose values lie on a coarser grid (a quantised source) get scales fitted to it either way.
    Returns a summary: file size, tensor count per type, tensors kept at f16 (asked for, or by
    fallback), how many tensors had calibrated rounding and how many blocks a grid-fitted scale, and
    the tokenizer's pre-tokenizer name with how it was chosen.
    """
    import gguf
    from gguf import quants

    path = Path(path)
    trained = trained_grid(model, quant)
    if trained is not None:
        # Weights that quantisation-aware training left in full precision stay f16 in the file.
        keep_f16 = [*keep_f16, *(gguf_name(n) or n for n in trained["kept"])]
    planned = plan_tensors(model, quant, keep_f16, allow_fallback, pure)
    if trained is not None:
        check_trained_types(planned, trained)
    arch = ARCHITECTURES[model.config.model_type]
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    tok_meta = tokenizer_metadata(tokenizer, model.config, vocab_rows=vocab_rows, pre=pre)

    calibrated = grid_fitted = 0
    with atomic_file(path) as tmp:  # a killed export leaves no half-written .gguf behind
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or str(getattr(model.config, "_name_or_path", "") or path.stem) or path.stem)
        writer.add_file_type(_file_type(quant))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, model.config, arch, vocab_rows)
        tok_meta.write(writer)
        state = model.state_dict()
        exact = set(trained["tensors"]) if trained is not None else set()
        for t in planned:
            qtype = _qtype(t.qtype_name)
            hessian = (hessians or {}).get(t.hf_name) if t.qtype_name in CALIBRATED_TYPES else None
            if t.hf_name in exact:
                # On the grid already, with the reference scale or a learned one: written as it is.
                d, q = decompose(state[t.hf_name].detach().cpu(), t.qtype_name)
                writer.add_tensor(t.name, _packed(t, Rounded(q, d)), raw_dtype=qtype)
                continue
            if hessian is not None or t.qtype_name == "q8_0":
                # Q8_0 always takes kdforge's own rounding, for the scales fitted to a quantised source.
                data, fitted = _rounded_blocks(t, state[t.hf_name], hessian)
                writer.add_tensor(t.name, data, raw_dtype=qtype)
                calibrated += hessian is not None
                grid_fitted += fitted
                continue
            w = t.array(state[t.hf_name])  # one tensor at a time: no float32 copy of the whole model
            if t.qtype_name == "f16" and np.abs(w).max(initial=0.0) > 65504.0:
                raise GGUFExportError(f"tensor {t.name} has values beyond float16's range (65504); "
                                      "export as bf16 or f32")
            data = quants.quantize(w, qtype)  # f32/f16: a float array; others: uint8 blocks
            # A quantised array's numpy shape counts bytes; raw_dtype tells the writer the element type.
            writer.add_tensor(t.name, data, raw_dtype=qtype if t.qtype_name not in ("f32", "f16") else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if trained is not None:
            check_written_grid(tmp, planned, state, exact)
    fallback = [t.name for t in planned if t.qtype_name == "f16" and quant != "f16" and len(t.shape) > 1
                and not _matches(t.name, keep_f16)]
    return {
        "path": str(path),
        "quant": quant,
        "bytes": path.stat().st_size,
        "tensor_types": dict(Counter(t.qtype_name for t in planned)),
        "kept_f16": [t.name for t in planned if len(t.shape) > 1 and _matches(t.name, keep_f16)],
        "fallback_f16": fallback,
        "calibrated_tensors": calibrated,
        "grid_fitted_blocks": grid_fitted,
        "tied_embeddings": _is_tied(model),
        "quant_aware": ({"grid": trained["grid"], "tensors": len(trained["tensors"]), "kept_f16": trained["kept"],
                         "grids": trained.get("grids", {}), "scales": trained.get("scales", "reference"),
                         "exact": True} if trained is not None else _other_grid(model, quant)),
        "tokenizer": {"model": tok_meta.model, "pre": tok_meta.pre, "pre_source": tok_meta.pre_source,
                      "tokens": len(tok_meta.tokens), "merges": len(tok_meta.merges),
                      "special_ids": tok_meta.special_ids, "add_bos": tok_meta.add_bos,
                      "chat_template": tok_meta.chat_template is not None},
    }


def trained_grid(model, quant: str) -> dict | None:
    """The record of quantisation-aware training (config ``kdforge_quant_aware``, kdforge.distill.quant_aware)
    when it trained on ``quant``'s grid and its weights are still on it; None when it did not. A folder trained
    on the grid and changed since (fine-tuned again, merged) is refused with the way out: the file would
    silently not be the model that was trained."""
    record = getattr(model.config, "kdforge_quant_aware", None)
    if not isinstance(record, dict) or record.get("grid") != quant:
        return None
    from kdforge.models.quant_grid import on_grid

    state = model.state_dict()
    grids = record.get("grids") or {}
    off = [n for n in record.get("tensors", [])
           if n not in state or not on_grid(state[n].detach().cpu(), grids.get(n, quant))]
    if off:
        raise GGUFExportError(f"the model was trained on the {quant} grid (config kdforge_quant_aware) but {len(off)} "
                              f"of its weights are no longer on it (e.g. {off[0]}): it was changed after "
                              "quantisation-aware training; delete kdforge_quant_aware from its config.json to "
                              "export it as an ordinary model")
    return record


def check_trained_types(planned: Sequence[_Planned], record: Mapping[str, Any]) -> None:
    """Each weight trained on a grid must be written on that grid: a QAT run with the output projection on
    Q8_0 (llama.cpp's layout) exported ``--pure``, or a ``pure`` run exported without it, would silently
    re-round that weight; refused with the fix."""
    grids = record.get("grids") or {}
    for t in planned:
        if t.hf_name not in record.get("tensors", []):
            continue
        want = grids.get(t.hf_name, record["grid"])
        if t.qtype_name != want:
            flag = "without --pure" if want != record["grid"] else "with --pure"
            raise GGUFExportError(f"{t.name} was trained on the {want} grid (quantisation-aware distillation, config "
                                  f"kdforge_quant_aware) but this export writes it as {t.qtype_name}: export {flag} "
                                  "(as it was trained), or retrain with quant_aware_pure matching the export")


def _other_grid(model, quant: str) -> dict | None:
    record = getattr(model.config, "kdforge_quant_aware", None)
    if not isinstance(record, dict):
        return None
    return {"grid": record.get("grid"), "exact": False,
            "note": f"trained on the {record.get('grid')} grid, written as {quant}: not the trained values"}


def check_written_grid(path: Path, planned: Sequence[_Planned], state: Mapping[str, torch.Tensor],
                       exact: set[str]) -> None:
    """Read the file back and check that each tensor trained on the grid dequantises to the trained weights
    bit for bit (Llama's q/k rows in llama.cpp's order); raise before the file is renamed into place."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    for t in planned:
        if t.hf_name not in exact:
            continue
        read = tensors[t.name]
        got = dequantize(read.data, read.tensor_type).reshape(t.shape)  # (out, in) float32
        if not np.array_equal(got, t.array(state[t.hf_name])):
            raise GGUFExportError(f"{t.name}: the written {t.qtype_name} blocks differ from the trained grid values "
                                  "(report this as a bug)")
