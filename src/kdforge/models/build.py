"""`kdforge student`: build a student from the teacher and save it as an HF folder artifact."""

from __future__ import annotations

import time
from typing import Any

from kdforge.artifacts import atomic_dir, write_config, write_meta
from kdforge.config import ConfigError, StudentConfig, dump
from kdforge.models.loading import count_parameters, load_model
from kdforge.models.student import build_layer_student, check_layers, uniform_layers


def run_student(cfg: StudentConfig, overwrite: bool = False) -> dict[str, Any]:
    t0 = time.time()
    teacher, tok = load_model(cfg.teacher, device="cpu", dtype="float32", trust_remote_code=cfg.trust_remote_code)
    n_teacher = teacher.config.num_hidden_layers
    try:
        if cfg.layers:
            keep = check_layers(cfg.layers, n_teacher)
        else:
            keep = uniform_layers(n_teacher, cfg.num_layers or n_teacher)
    except ValueError as e:
        raise ConfigError(f"student: {e}") from None
    student = build_layer_student(teacher, keep)
    metrics = {"teacher_layers": n_teacher, "student_layers": len(keep),
               "teacher_params": count_parameters(teacher), "student_params": count_parameters(student)}
    with atomic_dir(cfg.out, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_config(tmp, dump(cfg))
        write_meta(tmp, "student", {"teacher": cfg.teacher}, metrics, time.time() - t0, extra={
            "method": "layers", "kept_teacher_layers": keep,
            # student layer i <-> teacher layer layer_map[i]: the default map for alignment losses
            "layer_map": {str(i): t for i, t in enumerate(keep)},
        })
    return metrics
