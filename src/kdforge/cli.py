"""`kdforge <stage>`: one subcommand per stage, plus `run` (chain stages from one YAML) and `demo`.

Every stage takes ``--config FILE`` (YAML, repeatable), its own flags, and ``--set key=value``
overrides (applied last), validates the result before any heavy work, and writes one artifact folder.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from kdforge import __version__
from kdforge.config import (
    ConfigError,
    DemoConfig,
    DistillConfig,
    EvalConfig,
    GenerateConfig,
    LabelConfig,
    StudentConfig,
    build_config,
    read_yaml,
)
from kdforge.errors import UserError
from kdforge.quiet import quiet_transformers
from kdforge.serve.commands import add_serving_parsers, run_serving_command


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config field, e.g. --set distill.temperature=2 (applied last)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdforge", description="Distil a large chat model into a small, fast one.")
    parser.add_argument("--version", action="version", version=f"kdforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="the teacher answers a prompt set (batched, resumable)")
    g.add_argument("model", nargs="?", help="teacher: HF folder, .gguf file or embedded:smollm2-135m-instruct")
    g.add_argument("--prompts", help="'bundled' (default) or a JSONL file")
    g.add_argument("--split", choices=["train", "validation", "all"])
    g.add_argument("--limit", type=int, help="first N prompts of each split")
    g.add_argument("--out")
    g.add_argument("--batch-size", type=int, dest="batch_size")
    g.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    g.add_argument("--preset", choices=["greedy", "recipe"], help="recipe = sampling at T=0.7, top-p 0.9")
    g.add_argument("--num-samples", type=int, dest="num_samples")
    g.add_argument("--seed", type=int)
    _common(g)

    lb = sub.add_parser("label", help="cache the teacher's top-k soft labels on disk (offline distillation)")
    lb.add_argument("teacher", nargs="?")
    lb.add_argument("--data", help="a generate output folder or a JSONL file")
    lb.add_argument("--out")
    lb.add_argument("--top-k", type=int, dest="top_k")
    lb.add_argument("--hidden-layers", type=_csv_ints, dest="hidden_layers", help="e.g. 4,12,29")
    lb.add_argument("--batch-size", type=int, dest="batch_size")
    _common(lb)

    s = sub.add_parser("student", help="build a student from the teacher")
    s.add_argument("teacher", nargs="?")
    s.add_argument("--out")
    s.add_argument("--num-layers", type=int, dest="num_layers", help="keep N layers, uniformly spaced")
    s.add_argument("--layers", type=_csv_ints, help="explicit teacher layers to keep, e.g. 0,4,8,29")
    s.add_argument("--method", choices=["layers", "depth", "width", "fresh"])
    s.add_argument("--hidden-size", type=int, dest="hidden_size")
    s.add_argument("--intermediate-size", type=int, dest="intermediate_size")
    s.add_argument("--num-attention-heads", type=int, dest="num_attention_heads")
    s.add_argument("--num-key-value-heads", type=int, dest="num_key_value_heads")
    s.add_argument("--init", choices=["slice", "random"], help="fresh: slice teacher weights or random")
    _common(s)

    d = sub.add_parser("distill", help="train the student on teacher answers (online teacher or a label cache)")
    d.add_argument("--teacher")
    d.add_argument("--labels", help="a `kdforge label` folder: train from the cache, without loading the teacher")
    d.add_argument("--student")
    d.add_argument("--data", help="a generate output folder or a JSONL file")
    d.add_argument("--out")
    d.add_argument("--steps", type=int, dest="max_steps")
    d.add_argument("--batch-size", type=int, dest="batch_size")
    d.add_argument("--lr", type=float)
    d.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    _common(d)

    e = sub.add_parser("eval", help="compare teacher and students on held-out teacher answers")
    e.add_argument("--teacher")
    e.add_argument("--students", nargs="+")
    e.add_argument("--names", nargs="+")
    e.add_argument("--data")
    e.add_argument("--out")
    e.add_argument("--limit", type=int)
    e.add_argument("--task-limit", type=int, dest="task_limit", help="at most N task items of each type")
    e.add_argument("--lm-eval-tasks", nargs="+", dest="lm_eval_tasks", metavar="TASK",
                   help="lm-evaluation-harness tasks, e.g. kdforge_qa kdforge_code (needs kdforge[lmeval])")
    e.add_argument("--backend", choices=["auto", "transformers", "llama.cpp"],
                   help="runtime of GGUF students (auto: llama.cpp when llama-cpp-python is installed)")
    _common(e)

    x = sub.add_parser("export", help="write a model as GGUF (llama.cpp/Ollama) and check that it round-trips")
    x.add_argument("model", nargs="?", help="HF folder, .gguf file or embedded:smollm2-135m-instruct")
    x.add_argument("--to", choices=["gguf"])
    x.add_argument("--quant", nargs="+", help="f32 f16 bf16 q8_0 q5_1 q5_0 q4_1 q4_0 (one file each)")
    x.add_argument("--keep-f16", nargs="+", dest="keep_f16", metavar="TENSOR",
                   help="GGUF tensor names/globs kept at f16, e.g. token_embd output")
    x.add_argument("--allow-fallback", action="store_true", default=None, dest="allow_fallback",
                   help="write tensors whose rows do not divide into blocks as f16 instead of failing")
    x.add_argument("--pre", help="llama.cpp pre-tokenizer name (default: detected, e.g. smollm, qwen2)")
    x.add_argument("--calibration", metavar="auto|none|DATA",
                   help="calibrated (GPTQ) rounding of q8_0/q4_0 tensors on this text: 'auto' (default: the model's "
                        "answers to the bundled training prompts), a generate folder or JSONL, or 'none'")
    x.add_argument("--calibration-samples", type=int, dest="calibration_samples", metavar="N")
    x.add_argument("--no-check", action="store_false", default=None, dest="check", help="skip the round trip")
    x.add_argument("--out")
    _common(x)

    qz = sub.add_parser("quantize", help="weight quantisation in PyTorch (torchao int8/int4; bitsandbytes on CUDA)")
    qz.add_argument("model", nargs="?")
    qz.add_argument("--method", help="int8, int8-dynamic, int4, int8-int4 (torchao); nf4, bnb-int8 (CUDA)")
    qz.add_argument("--group-size", type=int, dest="group_size")
    qz.add_argument("--no-check", action="store_false", default=None, dest="check")
    qz.add_argument("--out")
    _common(qz)

    r = sub.add_parser("run", help="run the stages of one YAML file in order")
    r.add_argument("config_file", metavar="CONFIG")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    r.add_argument("--overwrite", action="store_true")

    m = sub.add_parser("demo", help="generate -> student -> distill -> eval on the embedded teacher")
    m.add_argument("--out")
    m.add_argument("--quick", action="store_true", help="a small slice that finishes in a few minutes")
    _common(m)

    add_serving_parsers(sub)  # serve, app, chat
    return parser


_FLAGS = {
    "generate": ("model", "prompts", "split", "limit", "out", "batch_size", "max_new_tokens", "preset",
                 "num_samples", "seed"),
    "label": ("teacher", "data", "out", "top_k", "hidden_layers", "batch_size"),
    "student": ("teacher", "out", "method", "num_layers", "layers", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "init"),
    "distill": ("teacher", "labels", "student", "data", "out", "max_steps", "batch_size", "lr"),
    "eval": ("teacher", "students", "names", "data", "out", "limit", "task_limit", "lm_eval_tasks", "backend"),
    "export": ("model", "to", "quant", "keep_f16", "allow_fallback", "pre", "calibration", "calibration_samples",
               "check", "out"),
    "quantize": ("model", "method", "group_size", "check", "out"),
    "demo": ("out",),
}


def _flags(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in _FLAGS[stage]}


# `kdforge run`: the stages of one file run in this order, whatever their order in the file
# (quantize and export before eval, so that eval can compare the variants they write).
RUN_ORDER = ("generate", "label", "student", "distill", "quantize", "export", "eval")


def _stage_runner(stage: str) -> tuple[type, Callable[..., Any]]:
    # Imported lazily: `kdforge --help` and config errors should not wait for torch.
    if stage == "generate":
        from kdforge.teacher.generate import run_generate
        return GenerateConfig, run_generate
    if stage == "label":
        from kdforge.teacher.label import run_label
        return LabelConfig, run_label
    if stage == "student":
        from kdforge.models.build import run_student
        return StudentConfig, run_student
    if stage == "distill":
        from kdforge.distill.trainer import run_distill
        return DistillConfig, run_distill
    if stage == "eval":
        from kdforge.eval.report import run_eval
        return EvalConfig, run_eval
    if stage in ("export", "quantize"):
        from kdforge.export.config import ExportConfig, QuantizeConfig
        from kdforge.export.stage import run_export, run_quantize
        return (ExportConfig, run_export) if stage == "export" else (QuantizeConfig, run_quantize)
    raise ValueError(stage)


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM (``kill``, a scheduler's timeout) ends a stage like Ctrl-C does: as an exception, so that
    the stage's clean-up runs (atomic folders remove their temporary copy) instead of dying mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "app", "chat"):  # servers handle their own signals (graceful shutdown)
        return _run(args)
    with _terminate_as_exit():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "demo":
            cfg = build_config(DemoConfig, "demo", args.config, args.overrides, _flags(args, "demo"))
            quiet_transformers()
            from kdforge.demo import run_demo
            run_demo(cfg, quick=args.quick, overwrite=args.overwrite)
        elif args.command in ("serve", "app", "chat"):
            return run_serving_command(args)
        elif args.command == "run":
            sections = read_yaml(args.config_file)
            stages = [s for s in RUN_ORDER if s in sections]
            if not stages:
                raise ConfigError(f"{args.config_file}: no stage sections ({', '.join(RUN_ORDER)})")
            # Validate every stage before running the first: a typo in `eval:` must not cost a training run.
            plan = []
            for stage in stages:
                cls, runner = _stage_runner(stage)
                plan.append((stage, build_config(cls, stage, [args.config_file], args.overrides), runner))
            quiet_transformers()
            for stage, cfg, runner in plan:
                print(f"[kdforge] == {stage} -> {cfg.out}", flush=True)
                runner(cfg, overwrite=args.overwrite)
        else:
            cls, runner = _stage_runner(args.command)
            cfg = build_config(cls, args.command, args.config, args.overrides, _flags(args, args.command))
            quiet_transformers()
            kwargs = {"resume": args.resume} if args.command == "distill" else {}
            result = runner(cfg, overwrite=args.overwrite, **kwargs)
            if args.command != "eval":
                print(f"[kdforge] {args.command} done -> {cfg.out}: {result}", flush=True)
    except (UserError, FileExistsError) as e:
        print(f"kdforge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
