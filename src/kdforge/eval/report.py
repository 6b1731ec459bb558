"""`kdforge eval`: teacher vs students on held-out teacher answers -> report.json + report.md."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdforge.artifacts import atomic_dir, atomic_write_json, atomic_write_text, write_config, write_meta
from kdforge.config import ConfigError, EvalConfig, dump
from kdforge.data.batching import shared_vocab_size
from kdforge.data.chat import encode_conversation, encode_prompt
from kdforge.data.formats import load_training_data, select_split
from kdforge.eval.metrics import decode_speed
from kdforge.models.loading import count_parameters, load_model
from kdforge.scoring import agreement

SPEED_PROMPT = [{"role": "user", "content": "Write a short paragraph about why the sky is blue."}]
COLUMNS = [("name", "model", "{}"), ("params_m", "params (M)", "{:.1f}"), ("nll", "NLL", "{:.4f}"),
           ("kl", "KL(teacher‖model)", "{:.4f}"), ("top1", "top-1 agree", "{:.3f}"),
           ("decode_tokens_per_s", "decode tok/s", "{:.1f}"), ("ttft_ms", "TTFT (ms)", "{:.0f}")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table; also readable as plain text in a terminal."""
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def run_eval(cfg: EvalConfig, overwrite: bool = False) -> dict[str, Any]:
    t0 = time.time()
    teacher, tok = load_model(cfg.teacher, cfg.device, trust_remote_code=cfg.trust_remote_code)
    names = ["teacher"] + (cfg.names or [Path(s).name for s in cfg.students])
    models = [teacher]
    for spec in cfg.students:
        m, _ = load_model(spec, cfg.device, trust_remote_code=cfg.trust_remote_code)
        models.append(m)
    vocab = shared_vocab_size(tok, *models)
    convs = select_split(load_training_data(cfg.data), cfg.split, cfg.limit)
    data = [e for e in (encode_conversation(tok, c.messages, cfg.max_length) for c in convs if c.has_answer)
            if e.num_targets > 0]
    if not data:
        raise ConfigError(f"{cfg.data}: no conversations with answers in split '{cfg.split}'")
    quality = agreement(teacher, models, data, tok.pad_token_id, vocab, cfg.batch_size)
    prompt_ids = encode_prompt(tok, SPEED_PROMPT)
    rows = []
    for name, spec, m, q in zip(names, [cfg.teacher, *cfg.students], models, quality):
        speed = decode_speed(m, tok, prompt_ids, cfg.decode_tokens)
        rows.append({"name": name, "path": spec, "params_m": count_parameters(m) / 1e6,
                     "nll": q["nll"], "kl": q["kl"], "top1": q["top1"],
                     "decode_tokens_per_s": speed["decode_tokens_per_s"], "ttft_ms": speed["ttft_s"] * 1000})
    report = {"data": cfg.data, "split": cfg.split, "examples": len(data), "target_tokens": quality[0]["tokens"],
              "threads": decode_threads(), "decode_tokens": cfg.decode_tokens, "models": rows}
    table = format_table(rows)
    md = (f"# kdforge eval\n\nData: `{cfg.data}` (split `{cfg.split}`): {len(data)} conversations, "
          f"{report['target_tokens']} teacher-answer tokens.\n\n{table}\n\n"
          "NLL: mean negative log-likelihood of the teacher's answer tokens. KL: mean forward "
          "KL(teacher‖model) per answer token at T=1. Top-1: share of answer positions where the model's "
          f"most likely next token is the teacher's. Decoding: greedy, batch 1, {cfg.decode_tokens} new tokens, "
          f"{report['threads']} threads; TTFT includes the prompt's prefill.\n")
    with atomic_dir(cfg.out, overwrite=overwrite) as tmp:
        write_config(tmp, dump(cfg))
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", md)
        write_meta(tmp, "eval", {"data": cfg.data, **{f"model{i}": s for i, s in enumerate(cfg.students)}},
                   {r["name"]: {k: r[k] for k in ("nll", "kl", "top1")} for r in rows}, time.time() - t0)
    print(table, flush=True)
    return report


def decode_threads() -> int:
    import torch

    return torch.get_num_threads()
