"""`kdforge demo`: the whole path on the embedded teacher, each stage's folder under one directory.

generate (the teacher answers the bundled prompts) -> label (its top-k soft labels, cached) ->
student (20 of 30 layers, chosen by block influence) -> distill (from the cache: the teacher is not
loaded) -> export (the distilled student as a Q8_0 GGUF, round-tripped) -> eval (teacher vs
undistilled student vs distilled student vs its GGUF file on the validation split; the file runs in
llama.cpp when llama-cpp-python is installed). With ``offline: false`` the label stage is skipped and
distillation runs the teacher online; ``export_quant: []`` skips the export.
"""

from __future__ import annotations

import time
from pathlib import Path

from kdforge.config import DemoConfig, DistillConfig, EvalConfig, GenerateConfig, LabelConfig, StudentConfig

QUICK = {"train_prompts": 48, "val_prompts": 16, "max_new_tokens": 48, "distill_steps": 30, "eval_task_limit": 12,
         "export_calibration_samples": 16, "export_check_prompts": 4}


def run_demo(cfg: DemoConfig, quick: bool = False, overwrite: bool = False) -> dict:
    from kdforge.distill.trainer import run_distill
    from kdforge.eval.report import run_eval
    from kdforge.export.config import ExportConfig
    from kdforge.export.stage import run_export
    from kdforge.models.build import run_student
    from kdforge.teacher.generate import run_generate
    from kdforge.teacher.label import run_label

    if quick:
        cfg = cfg.model_copy(update={k: v for k, v in QUICK.items() if k not in cfg.model_fields_set})
    root = Path(cfg.out)
    # Built before the first stage: a wrong quant type must fail now, not after twenty minutes.
    export_cfg = ExportConfig(model=str(root / "distill"), out=str(root / "export"), quant=cfg.export_quant,
                              calibration_samples=cfg.export_calibration_samples,
                              check_prompts=cfg.export_check_prompts) if cfg.export_quant else None
    n = 4 + cfg.offline + bool(cfg.export_quant)
    timings: dict[str, float] = {}

    def stage(name: str, i: int, text: str):
        print(f"[demo] {i}/{n} {name}: {text} -> {root / name}", flush=True)
        return time.time()

    t = stage("generate", 1, "the teacher answers the bundled prompts")
    # Train and validation prompts are generated in one resumable run.
    run_generate(GenerateConfig(model=cfg.teacher, out=str(root / "generate"), split="all", limit=cfg.train_prompts,
                                val_limit=cfg.val_prompts, max_new_tokens=cfg.max_new_tokens,
                                batch_size=cfg.gen_batch_size), overwrite=overwrite)
    timings["generate"] = time.time() - t
    i = 2
    if cfg.offline:
        t = stage("labels", i, f"cache the teacher's top-{cfg.top_k} log-probs")
        run_label(LabelConfig(teacher=cfg.teacher, data=str(root / "generate"), out=str(root / "labels"),
                              top_k=cfg.top_k, max_length=cfg.max_length), overwrite=True)
        timings["label"] = time.time() - t
        i += 1

    how = "by block influence" if cfg.student_method == "depth" else "evenly spaced"
    t = stage("student", i, f"keep {cfg.student_layers} teacher layers ({how})")
    run_student(StudentConfig(teacher=cfg.teacher, out=str(root / "student"), method=cfg.student_method,
                              num_layers=cfg.student_layers), overwrite=True)
    timings["student"] = time.time() - t

    how = "from the soft-label cache" if cfg.offline else "with the online teacher"
    t = stage("distill", i + 1, f"{cfg.distill_steps} steps {how}")
    run_distill(DistillConfig(teacher=None if cfg.offline else cfg.teacher,
                              labels=str(root / "labels") if cfg.offline else None,
                              student=str(root / "student"), data=str(root / "generate"),
                              out=str(root / "distill"), max_steps=cfg.distill_steps,
                              batch_size=cfg.distill_batch_size, lr=cfg.distill_lr, max_length=cfg.max_length,
                              eval_every=max(1, cfg.distill_steps // 4), val_limit=32),
                overwrite=True)
    timings["distill"] = time.time() - t
    i += 2

    students = [str(root / "student"), str(root / "distill")]
    names = ["student (undistilled)", "student (distilled)"]
    if export_cfg is not None:
        kinds = " ".join(q.upper() for q in cfg.export_quant)
        t = stage("export", i, f"the distilled student as {kinds} GGUF, read back and compared")
        run_export(export_cfg, overwrite=True)
        timings["export"] = time.time() - t
        students += [str(root / "export" / f"model-{q}.gguf") for q in cfg.export_quant]
        names += [f"student (distilled, {q.upper()} GGUF)" for q in cfg.export_quant]
        i += 1

    t = stage("eval", i, "teacher vs students on the validation split")
    report = run_eval(EvalConfig(teacher=cfg.teacher, students=students, names=names, data=str(root / "generate"),
                                 out=str(root / "eval"), limit=cfg.val_prompts, max_length=cfg.max_length,
                                 task_limit=cfg.eval_task_limit),
                      overwrite=True)
    timings["eval"] = time.time() - t
    print("[demo] stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), flush=True)
    print(f"[demo] report: {root / 'eval' / 'report.md'}", flush=True)
    return report
