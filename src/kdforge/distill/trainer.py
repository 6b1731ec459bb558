"""The distillation step: one optimizer step's loss and gradients over its micro-batches (`Distiller`).

Objective per optimizer step, over all micro-batches of the step:
    kd_weight * (alpha * CE + (1 - alpha) * T^2 * D(teacher_T, student_T))   per target token
  + hidden_weight * H(student layer i, teacher layer map[i])                  per real token
  + attention_weight * A(student layer i, teacher layer map[i])               per real token
  + consistency_weight * D(q(x) ‖ q(perturbed x)) at T=1                       per target token
Each term is normalised by its token count over the whole step (not per micro-batch), so batch 8 x
accumulation 1 and batch 1 x accumulation 8 give the same gradients. Every weight and T can follow
a schedule. The `kdforge distill` stage (kdforge/stages/distill.py) builds the pieces and runs the loop.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import torch

from kdforge.artifacts import read_meta
from kdforge.config import ConfigError
from kdforge.data.batching import collate
from kdforge.data.chat import IGNORE_INDEX, EncodedConversation, encode_conversation
from kdforge.data.formats import Conversation
from kdforge.distill.alignment import attention_loss_sum, default_layer_map, hidden_loss_sum
from kdforge.distill.consistency import perturbation_generator, perturbed_inputs
from kdforge.distill.cross_losses import cross_terms
from kdforge.distill.cross_teacher import CrossSignal, add_to_batch
from kdforge.distill.fused_head import FusedHead
from kdforge.distill.losses import SparseSignal, hard_ce, kd_terms, soft_divergence
from kdforge.distill.parallel import Parallel, TargetHidden, grad_into
from kdforge.distill.schedules import Progress, Schedule
from kdforge.distill.taid import TaidCoefficient, interpolated_signal, target_entropy
from kdforge.distill.teacher_source import CachedTeacher, LiveTeacher, TeacherRequest
from kdforge.models.forward import capture, project


@dataclass(frozen=True)
class Objective:
    """What a step optimises (the module docstring's formula): the divergence, its weights and T
    (each a schedule over training), and how the forward pass is laid out."""

    loss: str = "forward_kl"                  # forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tv
    # weight of the hard-label CE; 1 - alpha weighs T^2 * D
    alpha: Schedule = field(default_factory=lambda: Schedule(value=0.5))
    temperature: Schedule = field(default_factory=lambda: Schedule(value=2.0))
    kd_weight: Schedule = field(default_factory=lambda: Schedule(value=1.0))
    jsd_beta: float = 0.5
    skew: float = 0.1
    hidden_loss: str = "none"                 # none, mse, cosine, nmse
    hidden_weight: Schedule = field(default_factory=lambda: Schedule(value=1.0))
    attention_loss: str = "none"              # none, kl, mse
    attention_weight: Schedule = field(default_factory=lambda: Schedule(value=1.0))
    chunk_size: int | None = 256              # target positions per projection/loss/backward chunk
    pack_length: int | None = 256             # tokens per packed row; None: padded batches
    # consistency under perturbed inputs (kdforge.distill.consistency): weight * D(q(x) ‖ q(x~)) per target token
    consistency_weight: Schedule = field(default_factory=lambda: Schedule(value=0.0))
    consistency_loss: str = "forward_kl"
    perturb: str = "token_dropout"            # token_dropout, hidden_noise
    perturb_p: float = 0.1                    # token_dropout: probability a token's vector is zeroed
    perturb_sigma: float = 0.1                # hidden_noise: noise std relative to each token's RMS
    seed: int = 0                             # seeds the perturbations (with step and micro-batch)


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


def step_totals(micro: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(target tokens, real tokens) of a list of micro-batches: what a step's terms are normalised by."""
    return (sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro),
            sum(int(b["attention_mask"].sum()) for b in micro))


def make_batch(examples: list[EncodedConversation], rows: list[int] | None, pad_id: int,
               pairs: list | None = None, teacher_pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Padded tensors, plus the examples' rows in the soft-label cache when training from one, plus the
    teacher's encoding and the spans when it tokenises differently (``pairs``: cross_teacher.Pair each)."""
    batch = collate(examples, pad_id)
    if rows is not None:
        batch["rows"] = torch.tensor(rows)
    if pairs is not None:
        batch = add_to_batch(batch, pairs, teacher_pad_id)
    return batch


class Distiller:
    """Computes one optimizer step's loss and gradients over its micro-batches."""

    def __init__(self, objective: Objective, teacher: LiveTeacher | CachedTeacher, student, vocab: int,
                 layer_map: dict[int, int], projection: torch.nn.Module | None,
                 autocast: contextlib.AbstractContextManager | None = None,
                 parallel: Parallel | None = None, root: torch.nn.Module | None = None, cross=None,
                 taid: TaidCoefficient | None = None):
        """``root``: the student as the trainer calls it (a TargetHidden, wrapped by DDP or FSDP2 in a
        parallel run: kdforge.distill.parallel); built here for one process. ``cross``: a CrossSetup when
        teacher and student tokenise differently (the teacher then yields CrossSignals)."""
        self.objective, self.teacher, self.student, self.vocab = objective, teacher, student, vocab
        self.layer_map, self.projection = layer_map, projection
        self.autocast = autocast
        self.cross = cross
        self._clean_hidden: torch.Tensor | None = None  # (N, H) a micro-batch's clean student states (consistency)
        # TAID (kdforge.distill.taid): the target interpolates the detached student and the teacher with a t that
        # rises over training; its state travels in the checkpoints.
        self.taid = taid
        self.pack_length = objective.pack_length
        self.parallel = parallel or Parallel()
        self.root = root if root is not None else TargetHidden(student, projection)
        # A sparse gradient can be neither all-reduced nor sharded: dense in parallel runs.
        self.tied_embedding = None if self.parallel.active else sparse_tied_embedding_grad(student)
        self.fused_head = FusedHead.of(student, vocab, autocast, self.parallel.active)

    def weights(self, p: Progress) -> dict[str, float]:
        c = self.objective
        return {"temperature": c.temperature.at(p), "alpha": c.alpha.at(p), "kd_weight": c.kd_weight.at(p),
                "hidden_weight": c.hidden_weight.at(p) if c.hidden_loss != "none" else 0.0,
                "attention_weight": c.attention_weight.at(p) if c.attention_loss != "none" else 0.0,
                "consistency_weight": c.consistency_weight.at(p),
                **({"taid_t": self.taid.t} if self.taid is not None else {})}

    def step(self, micro: list[dict[str, torch.Tensor]], p: Progress,
             totals: tuple[int, int] | None = None, divergence_only: bool = False,
             kinds: list[str] | None = None) -> dict[str, float]:
        """Forward + backward over the micro-batches; returns the step's terms and token counts.

        ``totals``: (target tokens, real tokens) of the whole global step when this rank holds only its
        share of it (a parallel run); the terms are normalised by them and summed over ranks.
        ``divergence_only``: alpha 0 this step; on-policy steps (kdforge.distill.on_policy) train the divergence
        alone on the student's own samples, as GKD does (CE on its own samples would reinforce them).
        ``kinds``: the divergence of each micro-batch instead of the objective's (DistiLLM-2: skew KL on the
        teacher's answers, skew reverse KL on the student's).
        """
        w = self.weights(p)
        if divergence_only:
            w["alpha"] = 0.0
        n_targets, n_tokens = totals if totals is not None else step_totals(micro)
        sums = {"loss": 0.0, "ce": 0.0, "soft": 0.0, "hidden": 0.0, "attention": 0.0, "consistency": 0.0,
                "taid_entropy": 0.0}
        for i, b in enumerate(micro):
            with self.parallel.sync(self.root, last=i == len(micro) - 1):
                self._micro_step(b, w, n_targets, n_tokens, sums, kinds[i] if kinds else None)
                if w["consistency_weight"] > 0:
                    self._consistency(b, w, n_targets, sums, perturbation_generator(self.objective.seed, p.step, i))
        emb = self.tied_embedding
        if emb is not None and emb.weight.grad is not None and emb.weight.grad.is_sparse:
            # Only when no output-projection gradient arrived first (e.g. a hidden-states-only stage).
            emb.weight.grad = emb.weight.grad.to_dense()
        sums = self.parallel.sum_floats(sums)
        # Report every term per token of its own kind; "loss" is the weighted total the gradient came from.
        out = {"ce": sums["ce"] / max(n_targets, 1), "soft": sums["soft"] / max(n_targets, 1),
               "hidden": sums["hidden"] / max(n_tokens, 1), "attention": sums["attention"] / max(n_tokens, 1),
               "consistency": sums["consistency"] / max(n_targets, 1)}
        out["loss"] = (sums["loss"] / max(n_targets, 1) + w["hidden_weight"] * out["hidden"]
                       + w["attention_weight"] * out["attention"] + w["consistency_weight"] * out["consistency"])
        if self.taid is not None and n_targets:
            # TAID's rule reads the step's cross-entropy to the target, KL + H(p_t), per target token.
            self.taid.update((sums["soft"] + sums["taid_entropy"]) / n_targets, (p.step + 1) / max(p.total_steps, 1))
        return out | w | {"targets": n_targets, "tokens": n_tokens}

    def _micro_step(self, b: dict[str, torch.Tensor], w: dict[str, float], n_targets: int, n_tokens: int,
                    sums: dict[str, float], kind: str | None = None) -> None:
        """One micro-batch's forward and backward pass; its terms are added to ``sums``."""
        c, par = self.objective, self.parallel
        use_kd = w["kd_weight"] > 0
        hid, att = w["hidden_weight"] > 0, w["attention_weight"] > 0
        s_layers = sorted(self.layer_map) if (hid or att) else []
        t_layers = sorted(set(self.layer_map[i] for i in s_layers))
        # Alignment losses compare layer outputs position by position in the padded layout: no packing then.
        pack = self.pack_length if not s_layers else None
        # alpha = 1 is plain CE on the data: the teacher's logits are not needed.
        need_logits = use_kd and w["alpha"] < 1
        device = next(self.student.parameters()).device
        b = {k: v.to(device) for k, v in b.items()}
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        with self.autocast or contextlib.nullcontext():
            t_out = self.teacher(b, TeacherRequest(need_logits, tuple(t_layers), hid, att, pack))
            with capture(self.student, s_layers, hid, att) as s_store:
                if use_kd:
                    s_hidden, targets = self.root(ids, mask, labels, pack)  # (N, H), (N,)
                else:
                    self.root(ids, mask, labels, targets=False)
        loss = torch.zeros((), device=device)
        head_grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The clean predictions are the consistency term's target (kdforge.distill.consistency).
        self._clean_hidden = s_hidden.detach() if use_kd and w["consistency_weight"] > 0 else None
        if use_kd:
            kd_sums, h_grad, head_grads = self._token_terms(s_hidden, t_out.signal, targets, w, n_targets, kind)
            if h_grad is not None:
                # Carries the token losses' gradient into the decoder: d(sum(h * g))/dh = g.
                loss = loss + (s_hidden * h_grad).sum()
            for k in ("loss", "ce", "soft", "taid_entropy"):
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
        if par.active:
            # The output projection's deferred gradient enters with the micro-batch's one backward pass
            # (kdforge.distill.parallel), and under DDP every trained parameter must receive a gradient
            # in it: a zero one where this step uses none.
            unused = [] if head_grads else [p for p in self.student.get_output_embeddings().parameters()
                                            if p.requires_grad]
            if self.projection is not None and not hid:
                unused += list(self.projection.parameters())
            pairs = head_grads + [(p, par.zeros_like(p)) for p in unused]
            # ZeRO-3: these weights are whole from here to the end of the backward pass (autograd checks the
            # gradient's shape against the weight's, once at the call and once at accumulation).
            with par.gathered([p for p, _ in pairs]):
                loss = loss + grad_into(pairs).to(loss.device)
                if loss.requires_grad:
                    # DDP, FSDP2 and DeepSpeed average gradients over ranks; terms are per token of the global step.
                    par.backward(self.root, loss * par.world)
            return
        if loss.requires_grad:
            par.backward(self.root, loss)

    def _consistency(self, b: dict[str, torch.Tensor], w: dict[str, float], n_targets: int, sums: dict[str, float],
                     generator: torch.Generator) -> None:
        """consistency_weight · D(q(x) ‖ q(x~)) of one micro-batch: the student again, on perturbed input
        embeddings, against its clean predictions of `_micro_step` (detached), chunk by chunk like the token terms."""
        c = self.objective
        device = next(self.student.parameters()).device
        b = {k: v.to(device) for k, v in b.items()}
        clean = self._clean_hidden
        if clean is None:  # kd_weight 0 this step: the clean pass kept no hidden states
            with torch.no_grad(), self.autocast or contextlib.nullcontext():
                clean, _ = self.root(b["input_ids"], b["attention_mask"], b["labels"], self.pack_length)
        with perturbed_inputs(self.student, c.perturb, c.perturb_p, c.perturb_sigma, generator), \
                self.autocast or contextlib.nullcontext():
            h, _ = self.root(b["input_ids"], b["attention_mask"], b["labels"], self.pack_length)  # (N, H)
        leaf = h.detach().requires_grad_()
        size = c.chunk_size or max(leaf.shape[0], 1)
        for start in range(0, leaf.shape[0], size):
            sl = slice(start, start + size)
            with self.autocast or contextlib.nullcontext():
                logits = project(self.student, leaf[sl], self.vocab)  # (chunk, V)
                with torch.no_grad():
                    target = project(self.student, clean[sl], self.vocab)  # (chunk, V)
            d = soft_divergence(logits, target.float(), c.consistency_loss, 1.0).sum()
            (w["consistency_weight"] * d / max(n_targets, 1)).backward()
            sums["consistency"] += float(d.detach())
        if leaf.grad is not None:
            (h * leaf.grad).sum().backward()
        self._clean_hidden = None

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Validation: CE of the answers, divergence D(teacher ‖ student) at T=1 (forward KL), top-1 agreement.
        In a parallel run every rank scores every batch (the same numbers; sharded modules need all ranks)."""
        sums, n = {"val_ce": 0.0, "val_kl": 0.0, "val_top1": 0.0}, 0
        device = next(self.student.parameters()).device
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            t_out = self.teacher(b, TeacherRequest(pack_length=self.pack_length))
            h, targets = self.root(b["input_ids"], b["attention_mask"], b["labels"], self.pack_length)
            s_logits = project(self.student, h, self.vocab)  # (N, V)
            sums["val_ce"] += float(hard_ce(s_logits, targets).sum())
            if isinstance(t_out.signal, CrossSignal):
                # Per aligned span: the shared-vocabulary KL at T=1 and whether the top-1 tokens agree on the text.
                kl, top1, spans = self.cross.evaluate(s_logits, targets, t_out.signal)
                sums["val_kl"] += kl
                sums["val_top1"] += top1
                n += spans
                continue
            sums["val_kl"] += float(soft_divergence(s_logits, t_out.signal, "forward_kl", 1.0,
                                                    chunk_size=self.objective.chunk_size).sum())
            t_top = t_out.signal.top1() if isinstance(t_out.signal, SparseSignal) else t_out.signal.argmax(-1)
            sums["val_top1"] += float((s_logits.argmax(-1) == t_top).sum())
            n += targets.numel()
        out = {k: v / max(n, 1) for k, v in sums.items()}
        if self.cross is not None:
            # val_ce stays per student token (the data's own tokenisation); the others are per aligned span.
            out["val_ce"] = sums["val_ce"] / max(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                                                     for b in batches), 1)
        return out

    def _token_terms(self, s_hidden: torch.Tensor, signal, targets: torch.Tensor, w: dict[str, float],
                     n_targets: int, kind: str | None = None) -> tuple[dict[str, float], torch.Tensor | None,
                                              list[tuple[torch.Tensor, torch.Tensor]]]:
        """alpha·CE + (1-alpha)·T²·D over the N target positions, projected and back-propagated chunk by chunk.

        The (N, V) logits and their softmax/gradient buffers dominate a step's memory (V = 49k-152k),
        so each chunk of ``chunk_size`` positions is projected, scored and back-propagated at once;
        only its (chunk, V) buffers are alive. The gradients reach the output projection directly and
        the decoder through the returned (N, H) gradient of ``s_hidden``. In a parallel run the output
        projection's gradient is returned instead, as (parameter, gradient) pairs, for the caller's one
        backward pass (kdforge.distill.parallel says why).
        """
        c = self.objective
        leaf = s_hidden.detach().requires_grad_(s_hidden.requires_grad)
        n = leaf.shape[0]
        size = c.chunk_size or max(n, 1)
        sums = {"loss": 0.0, "ce": 0.0, "soft": 0.0, "taid_entropy": 0.0}
        defer = self.parallel.active and leaf.requires_grad
        head = [p for p in self.student.get_output_embeddings().parameters() if p.requires_grad] if defer else []
        head_grads = [self.parallel.zeros_like(p) for p in head]
        fused = None if defer else self.fused_head
        leaf_grad = torch.zeros_like(leaf) if defer or (fused is not None and leaf.requires_grad) else None  # (N, H)
        cross = isinstance(signal, CrossSignal)
        # A span's tokens are scored together: chunks of a cross-tokenizer signal end between spans.
        cuts = signal.index.cuts(n, size) if cross else list(range(0, n, size)) + [n]
        for start, stop in zip(cuts, cuts[1:]):
            sl = slice(start, stop)
            x = leaf[sl]  # (chunk, H)
            if fused is not None:
                logits = fused.logits(x)  # (chunk, V) a leaf; its gradient is routed by hand (fused_head)
            else:
                with self.autocast or contextlib.nullcontext():
                    logits = project(self.student, x, self.vocab)  # (chunk, V)
            if cross:
                terms = cross_terms(logits, targets[sl], start, signal, self.cross.vocab, self.cross.t_vocab,
                                    w["alpha"], w["temperature"], self.cross.objective)
            else:
                sig = (signal.rows(sl) if isinstance(signal, SparseSignal)
                       else (signal[sl] if signal is not None else None))
                if self.taid is not None and sig is not None and w["alpha"] < 1:
                    sig = interpolated_signal(logits, sig, self.taid.t, w["temperature"])
                    if self.taid.adaptive:
                        sums["taid_entropy"] += float(target_entropy(sig, w["temperature"]).sum())
                terms = kd_terms(logits, sig, targets[sl], w["alpha"], w["temperature"], kind or c.loss, c.jsd_beta,
                                 c.skew)
            scaled = w["kd_weight"] * terms["loss"] / max(n_targets, 1)
            if defer and scaled.requires_grad:
                grads = torch.autograd.grad(scaled, [x, *head], allow_unused=True)
                leaf_grad[sl] = grads[0]
                for acc, g in zip(head_grads, grads[1:]):
                    if g is not None:
                        acc += g
            elif scaled.requires_grad:
                scaled.backward()
                if fused is not None:
                    fused.backward(x, logits, leaf_grad[sl] if leaf_grad is not None else None)
            for k in ("loss", "ce", "soft"):
                sums[k] += float(terms[k].detach())
            del logits, terms, scaled  # the next chunk's (chunk, V) buffers take these ones' place, not their side
        return sums, (leaf_grad if defer or fused is not None else leaf.grad), list(zip(head, head_grads))

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


def resolve_layer_map(layer_map: dict[int, int] | None, student_path: str, student, n_t: int) -> dict[int, int]:
    """Student layer -> teacher layer: as configured, else the student artifact's own map (the teacher
    layers it was cut from), else evenly spread."""
    n_s = student.config.num_hidden_layers
    if layer_map is not None:
        lm = dict(layer_map)
    else:
        meta = _maybe_meta(student_path) or {}
        lm = {int(k): int(v) for k, v in meta.get("layer_map", {}).items()} or default_layer_map(n_s, n_t)
    bad = {s: t for s, t in lm.items() if not (0 <= s < n_s and 0 <= t < n_t)}
    if bad:
        raise ConfigError(f"layer_map {bad} out of range: the student has {n_s} layers, the teacher {n_t}")
    return lm


def prepare_trainable(student, lora=None, freeze: list[str] = ()):
    """Apply LoRA (``lora``: r, alpha, dropout, target_modules) or freezing (regexes of parameter names);
    return (module to train/checkpoint, trainable parameters)."""
    module = student
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        module = get_peft_model(student, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    for pattern in freeze:
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


def _maybe_meta(path: str) -> dict | None:
    try:
        return read_meta(path)
    except (FileNotFoundError, ValueError):
        return None
