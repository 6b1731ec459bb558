"""`kdforge student`: build a student from the teacher and save it as an HF folder artifact.

Methods: ``layers`` (uniform subset, first and last kept), ``depth`` (the layers with the highest
block influence on calibration data), ``width`` (FFN neurons, attention heads/KV groups and hidden
channels by activation importance; optionally fewer layers by block influence), ``fresh`` (a
smaller config of the same architecture, its weights sliced from the teacher or random).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kdforge.artifacts import atomic_dir, write_config, write_meta
from kdforge.config import ConfigError, StudentConfig, dump
from kdforge.data.chat import encode_conversation, encode_prompt
from kdforge.data.formats import load_training_data, select_split
from kdforge.data.prompts import BUNDLED, load_prompt_set
from kdforge.models.loading import count_parameters, load_model
from kdforge.models.pruning import build_width_student, measure_importance, plan_width, top_sorted
from kdforge.models.student import build_layer_student, check_layers, uniform_layers

DEFAULT_LAYERS = 8


def calibration_batches(tok, spec: str, samples: int, max_length: int) -> list[torch.Tensor]:
    """Evenly spread conversations of the train split, as (1, T) id tensors (answers included if present)."""
    convs = select_split(load_prompt_set(BUNDLED) if spec == BUNDLED else load_training_data(spec), "train")
    if not convs:
        raise ConfigError(f"calibration data {spec} has no train records")
    step = max(1, len(convs) // samples)
    out = []
    for c in convs[::step][:samples]:
        ids = (encode_conversation(tok, c.messages, max_length).input_ids if c.has_answer
               else encode_prompt(tok, c.prompt_messages)[:max_length])
        out.append(torch.tensor([ids]))
    return out


def run_student(cfg: StudentConfig, overwrite: bool = False) -> dict[str, Any]:
    t0 = time.time()
    teacher, tok = load_model(cfg.teacher, device="cpu", dtype="float32", trust_remote_code=cfg.trust_remote_code)
    tc = teacher.config
    n_teacher = tc.num_hidden_layers
    imp = None
    if cfg.method in ("depth", "width"):
        imp = measure_importance(teacher, calibration_batches(tok, cfg.calibration, cfg.calibration_samples,
                                                              cfg.calibration_max_length))
    try:
        if cfg.method == "layers":
            keep = (check_layers(cfg.layers, n_teacher) if cfg.layers
                    else uniform_layers(n_teacher, cfg.num_layers or min(DEFAULT_LAYERS, n_teacher)))
        elif cfg.method == "depth" or (cfg.method == "width" and cfg.num_layers):
            n_keep = cfg.num_layers or min(DEFAULT_LAYERS, n_teacher)
            if not 1 <= n_keep <= n_teacher:
                raise ValueError(f"num_layers must be 1..{n_teacher}")
            keep = top_sorted(torch.tensor(imp.block_influence), n_keep)
        elif cfg.method == "width":
            keep = list(range(n_teacher))
        else:
            keep = uniform_layers(n_teacher, cfg.num_layers or n_teacher)

        if cfg.method in ("layers", "depth"):
            student = build_layer_student(teacher, keep)
        else:
            hidden = cfg.hidden_size or tc.hidden_size
            inter = cfg.intermediate_size or tc.intermediate_size
            heads = cfg.num_attention_heads or tc.num_attention_heads
            kv = cfg.num_key_value_heads or max(1, heads * tc.num_key_value_heads // tc.num_attention_heads)
            if cfg.method == "fresh" and cfg.init == "random":
                student = random_student(teacher, len(keep), hidden, inter, heads, kv, cfg.seed)
            else:
                plan = plan_width(tc, imp if cfg.method == "width" else None, keep, hidden, inter, heads, kv)
                student = build_width_student(teacher, plan)
    except ValueError as e:
        raise ConfigError(f"student: {e}") from None
    metrics = {"teacher_layers": n_teacher, "student_layers": student.config.num_hidden_layers,
               "teacher_params": count_parameters(teacher), "student_params": count_parameters(student),
               "hidden_size": student.config.hidden_size, "intermediate_size": student.config.intermediate_size,
               "num_attention_heads": student.config.num_attention_heads,
               "num_key_value_heads": student.config.num_key_value_heads}
    with atomic_dir(cfg.out, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_config(tmp, dump(cfg))
        write_meta(tmp, "student", {"teacher": cfg.teacher}, metrics, time.time() - t0, extra={
            "method": cfg.method, "kept_teacher_layers": keep,
            # student layer i <-> teacher layer layer_map[i]: the default map for alignment losses
            "layer_map": {str(i): t for i, t in enumerate(keep)},
            "importance": imp.summary() if imp is not None else None,
        })
    return metrics


def random_student(teacher, layers: int, hidden: int, inter: int, heads: int, kv: int, seed: int):
    """A freshly initialised model of the teacher's architecture with a smaller config."""
    import copy

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
