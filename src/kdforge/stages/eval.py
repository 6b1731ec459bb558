"""`kdforge eval`: teacher vs students (HF folders or GGUF files) -> report.json, report.md, plots.

Sections, each computed the same way for every model (definitions in docs/evaluation.md):
1. agreement with the teacher on held-out conversations, overall and per prompt category, with the
   teacher's entropy per category (kdforge/scoring.py). A model with the teacher's tokenizer reads the
   teacher's ids; a trimmed one its own ids (KL over the kept ids); one with another tokenizer its own
   encoding (KL and top-1 per aligned span); bits per byte for every model (docs/cross-tokenizer.md);
2. the task set: short answers by normalised exact match, code by running tests in a sandbox
   (eval/tasks.py, eval/sandbox.py), every model prompted through its own tokenizer and chat template;
3. stability of sampled answers (eval/stability.py), the answers counted in the teacher's tokens;
4. speed and size, one process per model (eval/speed.py);
5. optionally lm-evaluation-harness tasks (eval/lmeval.py);
6. plots (eval/plots.py).
report.md is rendered from the same dict that is written as report.json.
"""

from __future__ import annotations

import gc
import json
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.artifacts import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    product,
    write_config,
    write_meta,
)
from kdforge.config import ConfigError, StageConfig, dump
from kdforge.data.formats import load_training_data, select_split
from kdforge.data.prompts import SPEED_PROMPT
from kdforge.stages import Stage

# This stage's layout (meta.json "files"), plus the plots named in report.json.
FILES = {"report": "report.json", "markdown": "report.md", "task_answers": "task_answers.jsonl",
         "stability_answers": "stability_answers.jsonl"}


class EvalConfig(StageConfig):
    """`kdforge eval`: teacher vs students on held-out teacher answers."""

    teacher: str = Field(description="the reference model: HF folder, GGUF file or embedded:NAME")
    students: list[str] = Field(default_factory=list, description="models compared with the teacher (HF folders, "
                                "GGUF files)")
    names: list[str] | None = Field(None, description="display names, one per student")
    data: str = Field(description="held-out teacher answers: a generate folder or a JSONL file")
    out: str = Field("artifacts/eval", description="output folder: report.json, report.md, plots")
    split: Literal["train", "validation", "all"] = "validation"
    limit: int | None = Field(None, gt=0, description="at most N conversations of the split")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(256, gt=8)
    decode_tokens: int = Field(64, gt=0, description="greedy tokens generated to time decoding")
    device: str = "auto"
    trust_remote_code: bool = False
    backend: Literal["auto", "transformers", "llama.cpp"] = Field(
        "auto", description="runtime of GGUF students: llama.cpp (auto: when llama-cpp-python is installed) or "
        "transformers' GGUF loader (dequantised to fp32); HF folders and the teacher always run in transformers")
    # the task set: short answers (normalised exact match) and code (run against tests)
    tasks: bool = Field(True, description="score every model on the task set")
    task_file: str = Field("bundled", description="'bundled' (src/kdforge/eval/tasks.jsonl) or a JSONL task file")
    task_limit: int | None = Field(None, gt=0, description="at most N items of each type (short, code)")
    task_batch_size: int = Field(16, gt=0, description="prompts per generate call (tasks and lm_eval alike)")
    task_max_new_tokens: int = Field(32, gt=0, description="answer length cap for short-answer items")
    code_max_new_tokens: int = Field(128, gt=0, description="answer length cap for code items")
    code_timeout_s: float = Field(5.0, gt=0, description="wall-clock and CPU limit per code run")
    code_memory_mb: int = Field(512, ge=64, description="address-space limit per code run")
    # stability: sampled answers to fixed prompts
    stability_prompts: int = Field(8, ge=0, description="prompts to sample (0: off)")
    stability_samples: int = Field(4, ge=2, description="sampled answers per prompt")
    stability_max_new_tokens: int = Field(48, gt=0)
    stability_temperature: float = Field(0.7, gt=0, le=2, description="as the serve stage's sampler: (0, 2]")
    stability_top_p: float = Field(0.9, gt=0, le=1)
    seed: int = 0
    # speed and size
    speed: bool = Field(True, description="time decoding and measure peak memory, one process per model")
    speed_batch: int = Field(8, gt=1, description="the second batch size timed (the first is 1)")
    threads: int | None = Field(None, gt=0, description="torch threads for the speed measurement (default: torch's)")
    # plots and lm-evaluation-harness
    plots: bool = True
    distill_logs: list[str] | None = Field(None, description="train_log.jsonl files or distill folders to plot "
                                           "(default: every student folder that has one)")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-eval task names; kdforge_qa and "
                                     "kdforge_code are the task set as local tasks")
    lm_eval_models: list[str] | None = Field(None, description="display names of the models to run lm-eval on "
                                             "(default: all)")
    lm_eval_limit: int | None = Field(None, gt=0, description="lm-eval's limit: first N documents per task")

    @model_validator(mode="after")
    def _names_match(self) -> EvalConfig:
        if self.names is not None and len(self.names) != len(self.students):
            raise ValueError(f"names has {len(self.names)} entries but students has {len(self.students)}")
        shown = ["teacher", *(self.names or [Path(s).name for s in self.students])]
        if len(set(shown)) != len(shown):
            raise ValueError(f"model names must be unique, got {shown}; set names")
        unknown = [m for m in self.lm_eval_models or [] if m not in shown]
        if unknown:
            raise ValueError(f"lm_eval_models {unknown} are not among the models {shown}")
        return self



def _model_name(spec: str) -> str:
    p = Path(spec)
    return p.stem if p.suffix.lower() == ".gguf" else p.name


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "model"


def tokenizer_kind(spec: str, teacher_tok, tok) -> str:
    """How a model's tokenizer relates to the teacher's: "same" (the same vocabulary: it reads the teacher's ids),
    "trimmed" (its folder's vocabulary map names kept teacher ids and their tokens are its own: the same tokens
    under new ids, as distill finds it) or "other" (aligned by bytes, docs/cross-tokenizer.md)."""
    from kdforge.models.vocab_trim import same_vocabulary, trimmed_from

    if same_vocabulary(teacher_tok, tok):
        return "same"
    return "trimmed" if trimmed_from(spec, teacher_tok, tok) is not None else "other"


def reading(kind: str, spec: str, teacher_tok, m, pairs: list, max_length: int):
    """The conversations in a model's own encoding, and how they line up with the teacher's (kdforge.scoring)."""
    from kdforge.data.batching import shared_vocab_size
    from kdforge.data.chat import encode_conversation
    from kdforge.distill.cross_teacher import Tokenizers
    from kdforge.models.token_bytes import TokenBytesError, token_bytes
    from kdforge.models.vocab_trim import trimmed_from
    from kdforge.scoring import TrimmedReading, cross_reading

    tok = m.tokenizer
    shared_vocab_size(tok, m)  # its logits cover its own tokenizer
    own = [encode_conversation(tok, c.messages, max_length) for c, _ in pairs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if kind == "trimmed":
        try:
            table = token_bytes(tok)
        except TokenBytesError:
            table = None  # no bits per byte
        return TrimmedReading(trimmed_from(spec, teacher_tok, tok), own, pad, table)
    try:
        toks = Tokenizers.of(teacher_tok, tok)
    except TokenBytesError as e:
        raise ConfigError(f"{spec} has another tokenizer than the teacher's, and its tokens cannot be aligned "
                          f"with the teacher's by bytes: {e}") from None
    return cross_reading(toks, [e for _, e in pairs], own, pad)


MEASURED_ON = {"same": "tokens", "trimmed": "kept ids", "other": "aligned spans"}


def measured(kind: str, q: dict[str, Any]) -> dict[str, Any]:
    """A report row's account of what its agreement figures were measured on (docs/cross-tokenizer.md)."""
    out: dict[str, Any] = {"tokenizer": kind, "measured_on": MEASURED_ON[kind], "bits_per_byte": q["bits_per_byte"],
                           "answer_tokens": q["tokens"]}
    if kind == "trimmed":
        out["retokenized"] = q["retokenized"]
        out["teacher_dropped_mass"] = q["teacher_dropped_mass"]
    if kind == "other":
        out["spans"] = q["spans"]
        out["aligned_tokens"] = q["aligned_tokens"]
        out["coverage"] = q["aligned_tokens"] / max(q["tokens"], 1)
    return out


def find_distill_logs(cfg: EvalConfig, names: list[str], specs: list[str]) -> list[tuple[str, Path]]:
    """(title, train_log.jsonl) pairs: the configured ones, else every student folder that has one."""
    if cfg.distill_logs is not None:
        out = []
        for spec in cfg.distill_logs:
            p = Path(spec)
            log = product(p, "log") if p.is_dir() else p
            if log is None or not log.is_file():
                raise ConfigError(f"distill_logs: {spec} is neither a training log file nor a finished distill "
                                  "folder with one")
            out.append((p.name if p.is_dir() else p.parent.name, log))
        return out
    logs = [(n, product(s, "log")) for n, s in zip(names, specs) if Path(s).is_dir()]
    return [(n, log) for n, log in logs if log is not None and log.is_file()]


def run(cfg: EvalConfig, overwrite: bool = False) -> dict[str, Any]:
    from kdforge.data.batching import shared_vocab_size
    from kdforge.data.chat import encode_conversation
    from kdforge.eval import markdown
    from kdforge.runtime import TRANSFORMERS, backend_for, open_model, runtime_class

    check_writable(cfg.out)  # before any model loads
    t0 = time.time()
    if Path(cfg.out).exists() and not overwrite:
        raise FileExistsError(f"{cfg.out} already exists; pass --overwrite to replace it or choose another --out")
    names = ["teacher"] + (cfg.names or [_model_name(s) for s in cfg.students])
    specs = [cfg.teacher, *cfg.students]
    # Everything that can fail cheaply fails before a model is loaded.
    logs = find_distill_logs(cfg, names, specs) if cfg.plots else []
    if cfg.lm_eval_tasks:
        from kdforge.eval.lmeval import require

        require()
    items = []
    if cfg.tasks or cfg.lm_eval_tasks:
        from kdforge.eval.tasks import load_tasks

        items = load_tasks(cfg.task_file, cfg.task_limit)
    convs = select_split(load_training_data(cfg.data), cfg.split, cfg.limit)
    # The teacher always runs in transformers (its logits are the reference); students where backend_for says.
    backends = [TRANSFORMERS] + [backend_for(s, cfg.backend) for s in cfg.students]
    if cfg.lm_eval_tasks:
        chosen = set(cfg.lm_eval_models or names)
        other = [f"{n} would run in {b}" for n, b in zip(names, backends)
                 if n in chosen and not runtime_class(b).hf_model]
        if other:
            raise ConfigError(f"lm-eval runs transformers models only; {', '.join(other)}: "
                              f"leave them out with lm_eval_models, or set backend: {TRANSFORMERS}")

    # One runtime per model; threads apply to llama.cpp's (transformers uses torch's).
    models = [open_model(spec, backend, cfg.device, threads=cfg.threads, trust_remote_code=cfg.trust_remote_code)
              for spec, backend in zip(specs, backends)]
    teacher = models[0]
    tok = teacher.tokenizer  # the reference encoding: the teacher's answers as the teacher reads them
    kinds = ["same"] + [tokenizer_kind(s, tok, m.tokenizer) for s, m in zip(cfg.students, models[1:])]
    # Models with the teacher's vocabulary read the teacher's ids (its logits must cover them); the others
    # read their own encodings (readings below).
    vocab = shared_vocab_size(tok, *[m for m, k in zip(models, kinds) if k == "same"])
    pairs = [(c, encode_conversation(tok, c.messages, cfg.max_length)) for c in convs if c.has_answer]
    pairs = [(c, e) for c, e in pairs if e.num_targets > 0]
    if not pairs:
        raise ConfigError(f"{cfg.data}: no conversations with answers in split '{cfg.split}'")
    readings = [None if k == "same" else reading(k, spec, tok, m, pairs, cfg.max_length)
                for k, spec, m in zip(kinds, specs, models)]

    timings: dict[str, float] = {"load": time.time() - t0}
    mark = time.time()

    def lap(name: str) -> None:
        nonlocal mark
        timings[name] = time.time() - mark
        mark = time.time()

    # 1. agreement, overall and per category
    from kdforge.scoring import agreement_by_category

    print(f"[eval] agreement: {len(pairs)} conversations, {len(models)} models (tokenizer: "
          f"{', '.join(f'{n} {k}' for n, k in zip(names, kinds))})", flush=True)
    agree = agreement_by_category(teacher, models, [e for _, e in pairs], [c.category for c, _ in pairs],
                                  tok.pad_token_id, vocab, cfg.batch_size, readings=readings, tokenizer=tok)
    rows: list[dict[str, Any]] = []
    for name, spec, m, q, kind in zip(names, specs, models, agree["models"], kinds):
        rows.append({"name": name, "path": spec, "backend": m.backend, "params_m": m.num_parameters() / 1e6,
                     "nll": q["nll"], "kl": q["kl"], "top1": q["top1"], "by_category": q["by_category"],
                     **measured(kind, q)})
        m.release_scoring()  # e.g. llama.cpp's (context × vocab) logit buffer: not needed for generation

    lap("agreement")

    # 2. tasks
    extra: dict[str, Any] = {}
    task_answers: list[dict[str, Any]] = []
    if cfg.tasks:
        from kdforge.eval.tasks import chance_level, run_tasks

        extra["tasks"] = {"file": cfg.task_file, "items": len(items), "chance": chance_level(items),
                          "short_items": sum(it.type == "short" for it in items),
                          "code_items": sum(it.type == "code" for it in items)}
        for row, m in zip(rows, models):
            print(f"[eval] tasks: {row['name']} ({len(items)} items)", flush=True)
            res = run_tasks(m, m.tokenizer, items, cfg.task_batch_size, cfg.task_max_new_tokens,
                            cfg.code_max_new_tokens, cfg.code_timeout_s, cfg.code_memory_mb)
            row["tasks"] = res["summary"]
            task_answers += [{"model": row["name"], **r} for r in res["items"]]

        lap("tasks")

    # 3. stability
    stab_answers: list[dict[str, Any]] = []
    if cfg.stability_prompts:
        from kdforge.eval.generation import Sampling, generate_texts
        from kdforge.eval.stability import pick_prompts, stability

        prompts = pick_prompts([c for c, _ in pairs], cfg.stability_prompts)
        sampling = Sampling(cfg.stability_temperature, cfg.stability_top_p, cfg.seed)
        extra["stability"] = {"prompts": [p["id"] for p in prompts], "samples": cfg.stability_samples,
                              "temperature": cfg.stability_temperature, "top_p": cfg.stability_top_p,
                              "max_new_tokens": cfg.stability_max_new_tokens, "seed": cfg.seed}
        for row, m in zip(rows, models):
            print(f"[eval] stability: {row['name']}", flush=True)
            answers = generate_texts(m, m.tokenizer, [p["prompt"] for p in prompts], cfg.stability_max_new_tokens,
                                     cfg.task_batch_size, sampling, cfg.stability_samples)
            s = stability(answers, tok)  # every model's answers in the same units: the teacher's tokens
            row["stability"] = {"divergence": s["divergence"], "distinct": s["distinct"]}
            stab_answers += [{"model": row["name"], "prompt_id": p["id"], "answers": a, "divergence": d}
                             for p, a, d in zip(prompts, answers, s["per_prompt_divergence"])]

        lap("stability")

    # 5. lm-evaluation-harness (before the models are freed)
    if cfg.lm_eval_tasks:
        from kdforge.eval.lmeval import LOCAL_TASKS, run_lm_eval

        extra["lm_eval"] = {"tasks": cfg.lm_eval_tasks, "limit": cfg.lm_eval_limit}
        chosen = set(cfg.lm_eval_models or names)
        for row, m in zip(rows, models):
            if row["name"] not in chosen:
                continue
            print(f"[eval] lm_eval: {row['name']} on {', '.join(cfg.lm_eval_tasks)}", flush=True)
            res = run_lm_eval(m.model, m.tokenizer, cfg.lm_eval_tasks, items, cfg.task_batch_size,
                              cfg.task_max_new_tokens, cfg.code_max_new_tokens, cfg.lm_eval_limit, cfg.code_timeout_s,
                              cfg.code_memory_mb)
            row["lm_eval"] = {}
            for task, r in res.items():
                entry: dict[str, Any] = {"metrics": r["metrics"]}
                if task in LOCAL_TASKS and cfg.tasks:
                    # kdforge's score on the very items lm-eval ran, and how many answers match exactly.
                    ours = {a["id"]: a for a in task_answers if a["model"] == row["name"]}
                    done = [s for s in r["samples"] if s["id"] in ours]
                    entry["kdforge_score"] = sum(ours[s["id"]]["score"] for s in done) / max(len(done), 1)
                    entry["same_answers"] = sum(s["response"].strip() == ours[s["id"]]["answer"] for s in done)
                    entry["items"] = len(done)
                row["lm_eval"][task] = entry

        lap("lm_eval")

    # 4. speed and size, each model in its own process (free ours first: less memory pressure)
    for m in models:
        m.close()
    del models, teacher
    gc.collect()
    from kdforge.eval.speed import bytes_on_disk, measure_models

    for row in rows:
        disk = bytes_on_disk(row["path"])
        row["size"] = {"params": round(row["params_m"] * 1e6), "disk_bytes": disk, "disk_mb": disk / 2**20}
    threads = cfg.threads
    if cfg.speed:
        print(f"[eval] speed: {len(rows)} models, batch 1 and {cfg.speed_batch}", flush=True)
        speeds = measure_models(specs, SPEED_PROMPT, cfg.decode_tokens, cfg.speed_batch, cfg.threads, cfg.device,
                                cfg.trust_remote_code, backends)
        for row, sp in zip(rows, speeds):
            row["speed"] = {k: sp[k] for k in ("ttft_ms_b1", "decode_tokens_per_s_b1", "ttft_ms_bn",
                                               "decode_tokens_per_s_bn", "peak_rss_mb", "rss_start_mb", "threads")}
            row["decode_tokens_per_s"] = sp["decode_tokens_per_s_b1"]
            row["ttft_ms"] = sp["ttft_ms_b1"]
        threads = speeds[0]["threads"]
        lap("speed")
    else:
        for row in rows:
            row["decode_tokens_per_s"] = row["ttft_ms"] = None
    if threads is None:
        import torch

        threads = torch.get_num_threads()

    ranking = sorted(rows, key=lambda r: r["kl"])
    for i, r in enumerate(ranking, 1):
        r["rank"] = i
    report = {"data": cfg.data, "split": cfg.split, "examples": len(pairs),
              "target_tokens": agree["models"][0]["tokens"], "threads": threads, "decode_tokens": cfg.decode_tokens,
              "speed_batch": cfg.speed_batch if cfg.speed else None,
              "ranking": {"by": "kl", "order": [r["name"] for r in ranking]},
              "categories": agree["categories"], **extra, "models": rows, "plots": {}, "timings_s": timings}

    table = markdown.summary_table(rows)
    with atomic_dir(cfg.out, overwrite=overwrite) as tmp:
        if cfg.plots:
            from kdforge.eval import plots

            for title, log in logs:
                f = f"training_{_slug(title)}.png"
                plots.plot_training(plots.read_train_log(log), tmp / f, f"distillation: {title} ({log})")
                report["plots"].setdefault("training", []).append({"title": title, "log": str(log), "file": f})
            plots.plot_quality_vs_size(rows, tmp / "quality_vs_size.png")
            report["plots"]["quality_vs_size"] = "quality_vs_size.png"
            if cfg.speed:
                plots.plot_quality_vs_speed(rows, tmp / "quality_vs_speed.png")
                report["plots"]["quality_vs_speed"] = "quality_vs_speed.png"
            lap("plots")
        write_config(tmp, dump(cfg))
        atomic_write_json(tmp / FILES["report"], report)
        atomic_write_text(tmp / FILES["markdown"], markdown.render(report, table))
        written = {k: FILES[k] for k in ("report", "markdown")}
        for role, answers in (("task_answers", task_answers), ("stability_answers", stab_answers)):
            if answers:
                atomic_write_text(tmp / FILES[role], "".join(json.dumps(a, ensure_ascii=False) + "\n"
                                                             for a in answers))
                written[role] = FILES[role]
        write_meta(tmp, "eval", {"data": cfg.data, **{f"model{i}": s for i, s in enumerate(cfg.students)}},
                   {r["name"]: {k: r[k] for k in ("nll", "kl", "top1", "bits_per_byte", "tokenizer")} for r in rows},
                   time.time() - t0,
                   files=written)
    from kdforge.models.model_card import record_evaluation

    for folder in record_evaluation(report, cfg.out):  # each evaluated kdforge model folder's README.md
        print(f"[eval] model card updated: {folder}/README.md", flush=True)
    print(table, flush=True)
    if cfg.tasks:
        print(markdown.tasks_table(report), flush=True)
    return report


STAGES = (Stage("eval", "compare teacher and students on held-out teacher answers", EvalConfig, run,
                flags=("teacher", "students", "names", "data", "out", "limit", "task_limit", "lm_eval_tasks",
                       "backend")),)
