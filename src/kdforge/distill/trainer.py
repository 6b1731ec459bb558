"""`kdforge distill`: train a student on teacher answers, with the teacher online.

Loss per optimizer step, over the assistant tokens of all micro-batches of the step:
    L = alpha * CE(student, data) + (1 - alpha) * T^2 * KL(teacher_T || student_T)
normalised by the number of target tokens of the whole step (not per micro-batch).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kdforge.artifacts import atomic_dir, read_meta, write_config, write_meta
from kdforge.config import ConfigError, DistillConfig, dump
from kdforge.data.batching import collate, shared_vocab_size
from kdforge.data.chat import EncodedConversation, encode_conversation
from kdforge.data.formats import load_training_data, select_split
from kdforge.distill.losses import kd_terms
from kdforge.models.forward import target_logits
from kdforge.models.loading import load_model


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from ~0 to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ConfigError(
            "teacher and student tokenizers differ: token-level distillation needs one shared vocabulary. "
            "Build the student from the teacher with `kdforge student`, or give both the same tokenizer."
        )


def encode_dataset(tok, convs, max_length: int) -> list[EncodedConversation]:
    encoded = [encode_conversation(tok, c.messages, max_length) for c in convs if c.has_answer]
    return [e for e in encoded if e.num_targets > 0]


def batches_forever(n: int, batch_size: int, seed: int):
    """Yield index lists: a fresh shuffle every epoch (seeded), the last partial batch kept."""
    rng = random.Random(seed)
    epoch = 0
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, batch_size):
            yield epoch, order[i:i + batch_size]
        epoch += 1


def run_distill(cfg: DistillConfig, overwrite: bool = False) -> dict[str, Any]:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    teacher, tok = load_model(cfg.teacher, cfg.device, trust_remote_code=cfg.trust_remote_code)
    student, student_tok = load_model(cfg.student, cfg.device, dtype="float32", trust_remote_code=cfg.trust_remote_code)
    check_same_tokenizer(tok, student_tok)
    vocab = shared_vocab_size(tok, teacher, student)
    convs = select_split(load_training_data(cfg.data), cfg.split)
    data = encode_dataset(tok, convs, cfg.max_length)
    if not data:
        raise ConfigError(f"{cfg.data}: no conversation in split '{cfg.split}' has assistant tokens to train on")
    device = next(student.parameters()).device
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    stream = batches_forever(len(data), cfg.batch_size, cfg.seed)
    student_meta = _maybe_meta(cfg.student)

    with atomic_dir(cfg.out, overwrite=overwrite) as tmp:
        write_config(tmp, dump(cfg))
        log_path = tmp / "train_log.jsonl"
        bar = tqdm(total=cfg.max_steps, desc="distill", unit="step", dynamic_ncols=True)
        window = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "targets": 0, "seconds": 0.0}
        total_targets, epoch = 0, 0
        for step in range(cfg.max_steps):
            ts = time.time()
            micro = []
            for _ in range(cfg.grad_accum):
                epoch, idx = next(stream)
                micro.append(collate([data[i] for i in idx], tok.pad_token_id))
            n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
            for b in micro:
                b = {k: v.to(device) for k, v in b.items()}
                with torch.no_grad():
                    t_logits, _ = target_logits(teacher, b["input_ids"], b["attention_mask"], b["labels"], vocab)
                s_logits, targets = target_logits(student, b["input_ids"], b["attention_mask"], b["labels"], vocab)
                terms = kd_terms(s_logits, t_logits, targets, cfg.alpha, cfg.temperature)
                (terms["loss"] / n_targets).backward()
                for k in sums:
                    sums[k] += float(terms[k].detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total_targets += n_targets
            for k in sums:
                window[k] += sums[k]
            window["targets"] += n_targets
            window["seconds"] += time.time() - ts
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                n = max(window["targets"], 1)
                row = {"step": step + 1, "epoch": epoch, "lr": sched.get_last_lr()[0],
                       "loss": window["loss"] / n, "ce": window["ce"] / n, "kl": window["kl"] / n,
                       "grad_norm": float(grad_norm), "target_tokens": total_targets,
                       "tokens_per_s": window["targets"] / max(window["seconds"], 1e-9)}
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.3f}", kl=f"{row['kl']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                window = {k: 0 if k == "targets" else 0.0 for k in window}
        bar.close()
        student.eval()
        student.save_pretrained(tmp, safe_serialization=True)
        student_tok.save_pretrained(tmp)
        wall = time.time() - t0
        last = _last_log(log_path)
        metrics = {"steps": cfg.max_steps, "target_tokens": total_targets, "train_examples": len(data),
                   "final_loss": last.get("loss"), "final_kl": last.get("kl"), "final_ce": last.get("ce"),
                   "tokens_per_s": round(total_targets / wall, 2)}
        extra = {}
        if student_meta and "layer_map" in student_meta:
            extra["layer_map"] = student_meta["layer_map"]
        write_meta(tmp, "distill", {"teacher": _existing(cfg.teacher), "student": cfg.student, "data": cfg.data},
                   metrics, wall, extra=extra)
    return metrics


def _maybe_meta(path: str) -> dict | None:
    try:
        return read_meta(path)
    except (FileNotFoundError, ValueError):
        return None


def _existing(spec: str) -> str | None:
    return spec if Path(spec).exists() else None


def _last_log(path: Path) -> dict:
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    return json.loads(lines[-1]) if lines else {}
