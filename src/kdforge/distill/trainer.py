"""`kdforge distill`: train a student on teacher answers, with the teacher online.

Objective per optimizer step, over all micro-batches of the step:
    kd_weight * (alpha * CE + (1 - alpha) * T^2 * D(teacher_T, student_T))   per target token
  + hidden_weight * H(student layer i, teacher layer map[i])                  per real token
  + attention_weight * A(student layer i, teacher layer map[i])               per real token
Each term is normalised by its token count over the whole step (not per micro-batch), so batch 8 x
accumulation 1 and batch 1 x accumulation 8 give the same gradients. Every weight and T can follow
a schedule. Output folder: checkpoints/, train_log.jsonl, optional tb/, and at the end the student
as an HF folder plus meta.json (written last: its presence marks a finished run).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kdforge.artifacts import CONFIG_NAME, META_NAME, file_sha256, read_meta, write_config, write_meta
from kdforge.config import ConfigError, DistillConfig, dump, read_yaml
from kdforge.data.batching import collate, shared_vocab_size
from kdforge.data.chat import EncodedConversation, encode_conversation
from kdforge.data.formats import Conversation, data_file, load_training_data, select_split
from kdforge.distill.alignment import attention_loss_sum, default_layer_map, hidden_loss_sum
from kdforge.distill.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, set_rng_states
from kdforge.distill.losses import SparseSignal, hard_ce, kd_terms, soft_divergence
from kdforge.distill.sampler import MicroBatchSampler
from kdforge.distill.schedules import Progress
from kdforge.distill.teacher_source import CachedTeacher, LiveTeacher
from kdforge.memory import return_freed_memory_to_os
from kdforge.models.forward import capture, project, target_hidden, target_logits
from kdforge.models.loading import load_model
from kdforge.softlabels.reader import SoftLabelCache

# Fields that only change bookkeeping: a resumed run may change them.
_RESUME_FREE = {"log_every", "eval_every", "val_limit", "save_every", "keep_checkpoints", "tensorboard", "out",
                "device"}


def lr_multiplier(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Linear warmup from ~0 to 1, then cosine or linear decay to ``min_ratio`` (or constant)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ConfigError(
            "teacher and student tokenizers differ: token-level distillation needs one shared vocabulary. "
            "Build the student from the teacher with `kdforge student`, or give both the same tokenizer "
            "(sequence-level KD on `kdforge generate` output with alpha=1 works across tokenizers).")


def encode_dataset(tok, convs, max_length: int) -> tuple[list[EncodedConversation], list[Conversation]]:
    """Encoded conversations that have targets, and the conversations they came from."""
    pairs = [(encode_conversation(tok, c.messages, max_length), c) for c in convs if c.has_answer]
    pairs = [(e, c) for e, c in pairs if e.num_targets > 0]
    return [e for e, _ in pairs], [c for _, c in pairs]


def make_batch(examples: list[EncodedConversation], rows: list[int] | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Padded tensors, plus the examples' rows in the soft-label cache when training from one."""
    batch = collate(examples, pad_id)
    if rows is not None:
        batch["rows"] = torch.tensor(rows)
    return batch


class Distiller:
    """Computes one optimizer step's loss and gradients over its micro-batches."""

    def __init__(self, cfg: DistillConfig, teacher: LiveTeacher | CachedTeacher, student, vocab: int,
                 layer_map: dict[int, int], projection: torch.nn.Module | None,
                 autocast: contextlib.AbstractContextManager | None = None):
        self.cfg, self.teacher, self.student, self.vocab = cfg, teacher, student, vocab
        self.layer_map, self.projection = layer_map, projection
        self.autocast = autocast
        self.pack_length = cfg.pack_length if cfg.pack else None
        self.tied_embedding = sparse_tied_embedding_grad(student)

    def weights(self, p: Progress) -> dict[str, float]:
        c = self.cfg
        return {"temperature": c.temperature.at(p), "alpha": c.alpha.at(p), "kd_weight": c.kd_weight.at(p),
                "hidden_weight": c.hidden_weight.at(p) if c.hidden_loss != "none" else 0.0,
                "attention_weight": c.attention_weight.at(p) if c.attention_loss != "none" else 0.0}

    def step(self, micro: list[dict[str, torch.Tensor]], p: Progress) -> dict[str, float]:
        """Forward + backward over the micro-batches; returns summed terms and token counts."""
        c, w = self.cfg, self.weights(p)
        n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        use_kd = w["kd_weight"] > 0
        hid, att = w["hidden_weight"] > 0, w["attention_weight"] > 0
        s_layers = sorted(self.layer_map) if (hid or att) else []
        t_layers = sorted(set(self.layer_map[i] for i in s_layers))
        # Alignment losses compare layer outputs position by position in the padded layout: no packing then.
        pack = self.pack_length if not s_layers else None
        # alpha = 1 is plain CE on the data: the teacher's logits are not needed.
        need_logits = use_kd and w["alpha"] < 1
        sums = {"loss": 0.0, "ce": 0.0, "soft": 0.0, "hidden": 0.0, "attention": 0.0}
        device = next(self.student.parameters()).device
        for b in micro:
            b = {k: v.to(device) for k, v in b.items()}
            ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
            with self.autocast or contextlib.nullcontext():
                t_out = self.teacher(b, need_logits, t_layers, hid, att, pack)
                with capture(self.student, s_layers, hid, att) as s_store:
                    if use_kd:
                        s_hidden, targets = target_hidden(self.student, ids, mask, labels, pack)  # (N, H), (N,)
                    else:
                        self.student.get_decoder()(input_ids=ids, attention_mask=mask)
            loss = torch.zeros((), device=device)
            if use_kd:
                kd_sums, h_grad = self._token_terms(s_hidden, t_out.signal, targets, w, n_targets)
                if h_grad is not None:
                    # Carries the token losses' gradient into the decoder: d(sum(h * g))/dh = g.
                    loss = loss + (s_hidden * h_grad).sum()
                for k in ("loss", "ce", "soft"):
                    sums[k] += kd_sums[k] * (w["kd_weight"] if k == "loss" else 1.0)
            real = mask.bool()  # (B, T)
            if hid:
                h = sum(hidden_loss_sum(self._project(s_store["hidden"][i]), t_out.hidden[self.layer_map[i]],
                                        real, c.hidden_loss) for i in s_layers) / len(s_layers)
                loss = loss + w["hidden_weight"] * h / max(n_tokens, 1)
                sums["hidden"] += float(h.detach())
            if att:
                a = sum(attention_loss_sum(s_store["attention"][i], t_out.attention[self.layer_map[i]],
                                           real, c.attention_loss) for i in s_layers) / len(s_layers)
                loss = loss + w["attention_weight"] * a / max(n_tokens, 1)
                sums["attention"] += float(a.detach())
            if loss.requires_grad:
                loss.backward()
        emb = self.tied_embedding
        if emb is not None and emb.weight.grad is not None and emb.weight.grad.is_sparse:
            # Only when no output-projection gradient arrived first (e.g. a hidden-states-only stage).
            emb.weight.grad = emb.weight.grad.to_dense()
        # Report every term per token of its own kind; "loss" is the weighted total the gradient came from.
        out = {"ce": sums["ce"] / max(n_targets, 1), "soft": sums["soft"] / max(n_targets, 1),
               "hidden": sums["hidden"] / max(n_tokens, 1), "attention": sums["attention"] / max(n_tokens, 1)}
        out["loss"] = (sums["loss"] / max(n_targets, 1) + w["hidden_weight"] * out["hidden"]
                       + w["attention_weight"] * out["attention"])
        return out | w | {"targets": n_targets, "tokens": n_tokens}

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Validation: CE of the answers, divergence D(teacher ‖ student) at T=1 (forward KL), top-1 agreement."""
        sums, n = {"val_ce": 0.0, "val_kl": 0.0, "val_top1": 0.0}, 0
        device = next(self.student.parameters()).device
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            t_out = self.teacher(b, True, [], False, False, self.pack_length)
            s_logits, targets = target_logits(self.student, b["input_ids"], b["attention_mask"], b["labels"],
                                              self.vocab, self.pack_length)
            sums["val_ce"] += float(hard_ce(s_logits, targets).sum())
            sums["val_kl"] += float(soft_divergence(s_logits, t_out.signal, "forward_kl", 1.0,
                                                    chunk_size=self.cfg.chunk_size).sum())
            t_top = t_out.signal.top1() if isinstance(t_out.signal, SparseSignal) else t_out.signal.argmax(-1)
            sums["val_top1"] += float((s_logits.argmax(-1) == t_top).sum())
            n += targets.numel()
        return {k: v / max(n, 1) for k, v in sums.items()}

    def _token_terms(self, s_hidden: torch.Tensor, signal, targets: torch.Tensor, w: dict[str, float],
                     n_targets: int) -> tuple[dict[str, float], torch.Tensor | None]:
        """alpha·CE + (1-alpha)·T²·D over the N target positions, projected and back-propagated chunk by chunk.

        The (N, V) logits and their softmax/gradient buffers dominate a step's memory (V = 49k-152k),
        so each chunk of ``chunk_size`` positions is projected, scored and back-propagated at once;
        only its (chunk, V) buffers are alive. The gradients reach the output projection directly and
        the decoder through the returned (N, H) gradient of ``s_hidden``.
        """
        c = self.cfg
        leaf = s_hidden.detach().requires_grad_(s_hidden.requires_grad)
        n = leaf.shape[0]
        size = c.chunk_size or max(n, 1)
        sums = {"loss": 0.0, "ce": 0.0, "soft": 0.0}
        for start in range(0, n, size):
            sl = slice(start, start + size)
            with self.autocast or contextlib.nullcontext():
                logits = project(self.student, leaf[sl], self.vocab)  # (chunk, V)
            sig = signal.rows(sl) if isinstance(signal, SparseSignal) else (signal[sl] if signal is not None else None)
            terms = kd_terms(logits, sig, targets[sl], w["alpha"], w["temperature"], c.loss, c.jsd_beta, c.skew)
            scaled = w["kd_weight"] * terms["loss"] / max(n_targets, 1)
            if scaled.requires_grad:
                scaled.backward()
            for k in sums:
                sums[k] += float(terms[k].detach())
        return sums, leaf.grad

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        return self.projection(h) if self.projection is not None else h


def sparse_tied_embedding_grad(model) -> torch.nn.Embedding | None:
    """Make a tied input embedding send a sparse gradient; returns it, or None where it is not tied or trained.

    With tied weights (SmolLM2, Qwen2.5 0.5B-3B) the (V, H) weight gets the output projection's dense
    gradient and the embedding lookup's. The lookup's dense version is a zero-filled (V, H) buffer
    with a few hundred rows written, then added to the other in full: ~5% of a CPU step at V = 49k.
    As a sparse gradient it is added in place to the rows it touches. Distiller.step turns any
    gradient that is still sparse into a dense one, so the optimizer always sees dense gradients.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb.weight is not head.weight or not emb.weight.requires_grad:
        return None
    emb.sparse = True
    return emb


def resolve_layer_map(cfg: DistillConfig, student, n_t: int) -> dict[int, int]:
    n_s = student.config.num_hidden_layers
    if cfg.layer_map is not None:
        lm = dict(cfg.layer_map)
    else:
        meta = _maybe_meta(cfg.student) or {}
        lm = {int(k): int(v) for k, v in meta.get("layer_map", {}).items()} or default_layer_map(n_s, n_t)
    bad = {s: t for s, t in lm.items() if not (0 <= s < n_s and 0 <= t < n_t)}
    if bad:
        raise ConfigError(f"layer_map {bad} out of range: the student has {n_s} layers, the teacher {n_t}")
    return lm


def prepare_trainable(cfg: DistillConfig, student):
    """Apply LoRA or freezing; return (module to train/checkpoint, trainable parameters)."""
    module = student
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        module = get_peft_model(student, LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    for pattern in cfg.freeze:
        rx = re.compile(pattern)
        hits = [n for n, p in module.named_parameters() if rx.search(n)]
        if not hits:
            raise ConfigError(f"freeze pattern {pattern!r} matches no parameter name (e.g. 'self_attn', 'mlp')")
        for n, p in module.named_parameters():
            if rx.search(n):
                p.requires_grad_(False)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    return module, params


def _prepare_out(cfg: DistillConfig, overwrite: bool, resume: bool) -> Path | None:
    """Create or check the output folder; return the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    if out.exists() and overwrite and not resume:
        shutil.rmtree(out)
    if resume:
        ckpts = list_checkpoints(out)
        if not ckpts:
            raise ConfigError(f"--resume: {out} has no checkpoint (set save_every to write them)")
        prev = read_yaml(out / CONFIG_NAME)
        now = dump(cfg)
        diffs = [k for k in now if k not in _RESUME_FREE and prev.get(k) != now[k]]
        if diffs:
            raise ConfigError(f"--resume: settings differ from the run in {out}: {', '.join(diffs)}; "
                              "resume with the same settings or start a new --out")
        (out / META_NAME).unlink(missing_ok=True)
        return ckpts[-1]
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists; pass --resume to continue it, --overwrite to replace it, "
                          "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return None


def run_distill(cfg: DistillConfig, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    t0 = time.time()
    if cfg.release_memory if cfg.release_memory is not None else cfg.labels is not None:
        # ~7% lower peak RSS for ~10% speed (page faults on re-allocated buffers): worth it where the
        # point is to fit a small machine, i.e. training from a label cache.
        return_freed_memory_to_os()
    # Validate data before loading any model: a bad file must fail in seconds.
    convs = load_training_data(cfg.data)
    resume_from = _prepare_out(cfg, overwrite, resume)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    cache = SoftLabelCache(cfg.labels) if cfg.labels else None  # checks every shard before any model loads
    student, tok = load_model(cfg.student, cfg.device, dtype="float32", trust_remote_code=cfg.trust_remote_code)
    if cache is not None:
        # Offline distillation: the teacher is never loaded; its labels must match this data and tokenizer.
        cache.check_compatible(tok, file_sha256(data_file(cfg.data)))
        if cache.manifest["max_length"] != cfg.max_length:
            raise ConfigError(f"the cache was labelled with max_length {cache.manifest['max_length']}; "
                              f"set distill.max_length to the same (now {cfg.max_length})")
        vocab = shared_vocab_size(tok, student)
        teacher: LiveTeacher | CachedTeacher = CachedTeacher(cache)
        row_of = {e["id"]: i for i, e in enumerate(cache.manifest["examples"])}
    else:
        teacher_model, teacher_tok = load_model(cfg.teacher, cfg.device, trust_remote_code=cfg.trust_remote_code)
        check_same_tokenizer(teacher_tok, tok)
        vocab = shared_vocab_size(tok, teacher_model, student)
        if cfg.attention_loss != "none":
            # Attention probabilities are only materialised by the eager implementation.
            teacher_model.set_attn_implementation("eager")
        teacher = LiveTeacher(teacher_model, vocab)
        row_of = None
    if cfg.attention_loss != "none":
        student.set_attn_implementation("eager")

    def rows_for(selected: list[Conversation]) -> list[int] | None:
        if row_of is None:
            return None
        missing = [c.id for c in selected if c.id not in row_of]
        if missing:
            raise ConfigError(f"{len(missing)} conversations (e.g. {missing[0]!r}) are not in the cache "
                              f"{cfg.labels}; label the same split of the same data")
        return [row_of[c.id] for c in selected]

    data, kept = encode_dataset(tok, select_split(convs, cfg.split), cfg.max_length)
    if not data:
        raise ConfigError(f"{cfg.data}: no conversation in split '{cfg.split}' has assistant tokens to train on")
    rows = rows_for(kept)
    val_data, val_kept = (encode_dataset(tok, select_split(convs, "validation", cfg.val_limit), cfg.max_length)
                          if cfg.eval_every else ([], []))
    val_rows = rows_for(val_kept) if val_data else None
    device = next(student.parameters()).device
    layer_map = resolve_layer_map(cfg, student, teacher.num_layers)
    projection = None
    if cfg.hidden_loss != "none" and student.config.hidden_size != teacher.hidden_size:
        # Learned map from the student's width to the teacher's; trained with the student, not shipped.
        projection = torch.nn.Linear(student.config.hidden_size, teacher.hidden_size, bias=False).to(device)
    if cfg.gradient_checkpointing:
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
        student.config.use_cache = False
    module, params = prepare_trainable(cfg, student)
    module.train()
    all_params = params + (list(projection.parameters()) if projection is not None else [])
    opt = torch.optim.AdamW(all_params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(
        s, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule, cfg.min_lr_ratio))
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else None
    distiller = Distiller(cfg, teacher, module, vocab, layer_map, projection, autocast)
    sampler = MicroBatchSampler([len(e.input_ids) for e in data], [c.category for c in kept], cfg.batch_size,
                                cfg.seed, cfg.category_weights)
    steps_per_epoch = sampler.batches_per_epoch() / cfg.grad_accum

    start_step, consumed = 0, 0
    log_path = out / "train_log.jsonl"
    if resume_from is not None:
        state, extra = load_checkpoint(resume_from, module)
        opt.load_state_dict(extra["optimizer"])
        sched.load_state_dict(extra["scheduler"])
        if projection is not None:
            projection.load_state_dict(extra["projection"])
        start_step, consumed = state["step"], state["consumed_micro_batches"]
        _truncate_log(log_path, start_step)
        set_rng_states(extra["rng"])
        print(f"[kdforge] resuming {out} from step {start_step}", flush=True)
    else:
        write_config(out, dump(cfg))
    stream = sampler.stream(skip=consumed)
    writer = _tensorboard(out) if cfg.tensorboard else None

    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="distill", unit="step", dynamic_ncols=True)
    window: dict[str, float] = {}
    total_targets = 0
    for step in range(start_step, cfg.max_steps):
        ts = time.time()
        progress = Progress(step, cfg.max_steps, steps_per_epoch)
        micro = []
        for _ in range(cfg.grad_accum):
            epoch, idx = next(stream)
            micro.append(make_batch([data[i] for i in idx], [rows[i] for i in idx] if rows else None,
                                    tok.pad_token_id))
        consumed += cfg.grad_accum
        r = distiller.step(micro, progress)
        grad_norm = torch.nn.utils.clip_grad_norm_(all_params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        total_targets += r["targets"]
        for k in ("loss", "ce", "soft", "hidden", "attention"):
            window[k] = window.get(k, 0.0) + r[k] * r["targets"]
        window["targets"] = window.get("targets", 0) + r["targets"]
        window["seconds"] = window.get("seconds", 0.0) + time.time() - ts
        bar.update(1)
        row: dict[str, Any] = {}
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            n = max(window["targets"], 1)
            row = {"step": step + 1, "epoch": round(progress.epoch, 4), "lr": sched.get_last_lr()[0],
                   **{k: window[k] / n for k in ("loss", "ce", "soft", "hidden", "attention")},
                   **{k: r[k] for k in ("temperature", "alpha", "kd_weight", "hidden_weight", "attention_weight")},
                   "grad_norm": float(grad_norm), "target_tokens": int(window["targets"]),
                   "seconds": round(window["seconds"], 4),
                   "target_tokens_per_s": window["targets"] / max(window["seconds"], 1e-9)}
            window = {}
            bar.set_postfix(loss=f"{row['loss']:.3f}", soft=f"{row['soft']:.3f}",
                            tok_s=f"{row['target_tokens_per_s']:.0f}")
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps) and val_data:
            module.eval()
            v = distiller.evaluate([make_batch(val_data[i:i + cfg.batch_size],
                                               val_rows[i:i + cfg.batch_size] if val_rows else None, tok.pad_token_id)
                                    for i in range(0, len(val_data), cfg.batch_size)])
            module.train()
            row = (row or {"step": step + 1}) | v
        if row:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if writer is not None:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"distill/{k}", v, row["step"])
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(out, step + 1, {"consumed_micro_batches": consumed}, module,
                            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "projection": projection.state_dict() if projection is not None else None},
                            cfg.keep_checkpoints)
    bar.close()
    if writer is not None:
        writer.close()

    final = module.merge_and_unload() if cfg.method == "lora" else module
    final.eval()
    if distiller.tied_embedding is not None:
        distiller.tied_embedding.sparse = False
    if cfg.gradient_checkpointing:
        getattr(final, "activation_checkpointing_disable", final.gradient_checkpointing_disable)()
        final.config.use_cache = True
    if cfg.attention_loss != "none":
        final.set_attn_implementation("sdpa")
    _save_final(out, final, tok)
    wall = time.time() - t0
    last = _read_log(log_path)
    metrics = {"steps": cfg.max_steps, "target_tokens_this_run": total_targets, "train_examples": len(data),
               "final": last[-1] if last else {}, "wall_time_s": round(wall, 1)}
    extra = {"layer_map": {str(k): v for k, v in layer_map.items()}}
    write_meta(out, "distill", {"teacher": _existing(cfg.teacher) if cfg.teacher else None, "student": cfg.student,
                                "data": cfg.data, "labels": cfg.labels},
               metrics, wall, extra=extra)
    return metrics


def _save_final(out: Path, model, tok) -> None:
    """Write the HF folder into ``out`` atomically: save to a temp folder, then move each file in."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(f, out / f.name)
    tmp.rmdir()


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (the killed run's extra steps)."""
    rows = [r for r in _read_log(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _maybe_meta(path: str) -> dict | None:
    try:
        return read_meta(path)
    except (FileNotFoundError, ValueError):
        return None


def _existing(spec: str) -> str | None:
    return spec if Path(spec).exists() else None


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
