"""`kdforge demo`: the whole path on the embedded teacher, each stage's folder under one directory.

generate (teacher answers the bundled prompts) -> student (8 of 30 layers) -> distill (online
teacher) -> eval (teacher vs undistilled student vs distilled student on the validation split).
"""

from __future__ import annotations

import time
from pathlib import Path

from kdforge.config import DemoConfig, DistillConfig, EvalConfig, GenerateConfig, StudentConfig

QUICK = {"train_prompts": 48, "val_prompts": 16, "max_new_tokens": 48, "distill_steps": 30}


def run_demo(cfg: DemoConfig, quick: bool = False, overwrite: bool = False) -> dict:
    from kdforge.distill.trainer import run_distill
    from kdforge.eval.report import run_eval
    from kdforge.models.build import run_student
    from kdforge.teacher.generate import run_generate

    if quick:
        cfg = cfg.model_copy(update={k: v for k, v in QUICK.items() if k not in cfg.model_fields_set})
    root = Path(cfg.out)
    timings = {}
    t = time.time()

    print(f"[demo] 1/4 generate: the teacher answers the bundled prompts -> {root / 'generate'}", flush=True)
    # Train and validation prompts are generated in one resumable run.
    gen = GenerateConfig(model=cfg.teacher, out=str(root / "generate"), split="all",
                         limit=cfg.train_prompts, val_limit=cfg.val_prompts,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size)
    run_generate(gen, overwrite=overwrite)
    timings["generate_s"] = time.time() - t

    t = time.time()
    print(f"[demo] 2/4 student: keep {cfg.student_layers} teacher layers -> {root / 'student'}", flush=True)
    run_student(StudentConfig(teacher=cfg.teacher, out=str(root / "student"), num_layers=cfg.student_layers),
                overwrite=True)
    timings["student_s"] = time.time() - t

    t = time.time()
    print(f"[demo] 3/4 distill: {cfg.distill_steps} steps with the online teacher -> {root / 'distill'}", flush=True)
    run_distill(DistillConfig(teacher=cfg.teacher, student=str(root / "student"), data=str(root / "generate"),
                              out=str(root / "distill"), max_steps=cfg.distill_steps,
                              batch_size=cfg.distill_batch_size, lr=cfg.distill_lr, max_length=cfg.max_length,
                              eval_every=max(1, cfg.distill_steps // 4), val_limit=32),
                overwrite=True)
    timings["distill_s"] = time.time() - t

    t = time.time()
    print(f"[demo] 4/4 eval: teacher vs students on the validation split -> {root / 'eval'}", flush=True)
    report = run_eval(EvalConfig(teacher=cfg.teacher, students=[str(root / "student"), str(root / "distill")],
                                 names=["student (undistilled)", "student (distilled)"], data=str(root / "generate"),
                                 out=str(root / "eval"), limit=cfg.val_prompts, max_length=cfg.max_length),
                      overwrite=True)
    timings["eval_s"] = time.time() - t
    print("[demo] stage times: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items()), flush=True)
    print(f"[demo] report: {root / 'eval' / 'report.md'}", flush=True)
    return report
