"""Build a student from the teacher by keeping a subset of its decoder layers.

The student is a plain HF model of the teacher's architecture with ``num_hidden_layers`` set to the
number of kept layers; kept layer ``j`` takes teacher layer ``keep[j]``'s weights, and everything
outside the layer stack (embeddings, final norm, output projection) is copied as is.
"""

from __future__ import annotations

import copy
import re

import torch

_LAYER_KEY = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")


def uniform_layers(num_teacher_layers: int, num_keep: int) -> list[int]:
    """``num_keep`` evenly spaced layer indices, always including the first and the last."""
    if not 1 <= num_keep <= num_teacher_layers:
        raise ValueError(f"cannot keep {num_keep} of {num_teacher_layers} layers; choose 1..{num_teacher_layers}")
    if num_keep == 1:
        return [num_teacher_layers - 1] if num_teacher_layers == 1 else [0]
    step = (num_teacher_layers - 1) / (num_keep - 1)
    return sorted({round(i * step) for i in range(num_keep)})


def check_layers(layers: list[int], num_teacher_layers: int) -> list[int]:
    if not layers:
        raise ValueError("layers is empty; list the teacher layer indices to keep")
    bad = [x for x in layers if not 0 <= x < num_teacher_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the teacher has layers 0..{num_teacher_layers - 1}")
    if len(set(layers)) != len(layers) or sorted(layers) != list(layers):
        raise ValueError(f"layers {layers} must be strictly increasing without repeats")
    return list(layers)


def build_layer_student(teacher, keep: list[int]):
    """A new model holding copies of the teacher's layers ``keep`` (in order) and its other weights."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    check_layers(keep, cfg.num_hidden_layers)
    cfg.num_hidden_layers = len(keep)
    # Per-layer config lists (e.g. Qwen2's sliding/full attention `layer_types`) follow the kept layers.
    for name in ("layer_types",):
        values = getattr(cfg, name, None)
        if isinstance(values, list) and len(values) == teacher.config.num_hidden_layers:
            setattr(cfg, name, [values[i] for i in keep])
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)
    src = teacher.state_dict()
    new_index = {t: s for s, t in enumerate(keep)}
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in src.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            mapped[key] = tensor
        elif int(m.group(2)) in new_index:
            mapped[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = tensor
    missing, unexpected = student.load_state_dict(mapped, strict=False)
    # A tied output projection is absent from the state dict by design; nothing else may be.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"student weights do not line up with the teacher: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def random_student(teacher, layers: int, hidden: int, inter: int, heads: int, kv: int, seed: int):
    """A freshly initialised model of the teacher's architecture with a smaller config."""
    from transformers import AutoModelForCausalLM

    if heads % kv:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = layers, hidden, inter
    cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv
    cfg.head_dim = hidden // heads
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:layers]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = copy.deepcopy(teacher.generation_config)
    return model.eval()
