"""Preference objectives in `kdforge distill --objective dpo|kto`: one optimizer step over preference data.

The data are a `kdforge prefs` artifact (or a user's JSONL of pairs): for DPO, (prompt, chosen, rejected) pairs;
for KTO, (prompt, completion, desirable) singles. The policy is the student; the reference is the student as
training starts, whose sequence log-probabilities are computed once at set-up (`reference_logps`) and kept in
the output folder, so a resumed run uses the same ones. The losses are the pure functions of
kdforge.distill.preference.

A sequence's log-probability is Σ over its answer tokens (the end of turn included) of log q(token | prefix), in
the student's own tokenisation of the rendered conversation. The decoder runs once per micro-batch with gradient;
the (N, V) logits are made chunk by chunk twice (once without gradient for the (B,) sums the loss needs, once to
send each token its share of dLoss/dlogp(sequence)), so only one chunk's (C, V) buffers are alive at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kdforge.data.batching import collate
from kdforge.data.chat import IGNORE_INDEX, EncodedConversation
from kdforge.distill.preference import dpo_loss, kto_loss, kto_reference_point
from kdforge.distill.preference_data import answer_encoding
from kdforge.distill.schedules import Progress
from kdforge.models.forward import project

Tensor = torch.Tensor


@dataclass(frozen=True)
class PreferenceObjective:
    """What a preference step optimises: DPO (``beta``, ``loss_type``, ``label_smoothing``) or KTO (``beta``,
    ``desirable_weight``, ``undesirable_weight``), plus ``sft_weight`` x the chosen (desirable) answers' CE per
    token (RPO-style regularisation; 0: off)."""

    kind: str = "dpo"                  # dpo, kto
    beta: float = 0.1
    loss_type: str = "sigmoid"         # dpo: sigmoid, ipo, hinge
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    sft_weight: float = 0.0
    chunk_size: int = 256


def encode_pairs(tok, pairs: list, max_length: int) -> list[tuple[EncodedConversation, EncodedConversation]]:
    """(chosen, rejected) encodings of each preference pair (prompt + answer, labels on the final answer only:
    earlier assistant turns of a multi-turn prompt are context, as in the teacher's ranking)."""
    return [(answer_encoding(tok, p.messages, p.chosen, max_length),
             answer_encoding(tok, p.messages, p.rejected, max_length)) for p in pairs]


def encode_singles(tok, singles: list, max_length: int) -> tuple[list[EncodedConversation], list[EncodedConversation]]:
    """KTO: each single's encoding, and its mismatched encoding (its prompt with the next single's completion),
    on which the reference point z0 = KL(policy ‖ reference) is estimated, as in KTO and TRL."""
    own = [answer_encoding(tok, s.messages, s.completion, max_length) for s in singles]
    n = len(singles)
    shifted = [answer_encoding(tok, s.messages, singles[(i + 1) % n].completion, max_length)
               for i, s in enumerate(singles)]
    return own, shifted


def _rows_of_targets(labels: Tensor) -> Tensor:
    """(N,) the batch row of each target position, in the trainer's row-major target order."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]


def token_logps(student, h: Tensor, targets: Tensor, vocab: int, chunk: int) -> Tensor:
    """(N,) log q(target) from (N, H) final hidden states, chunk by chunk (differentiable through ``h``)."""
    out = []
    for start in range(0, h.shape[0], chunk):
        logits = project(student, h[start:start + chunk], vocab).float()  # (C, V)
        out.append(logits.gather(1, targets[start:start + chunk, None])[:, 0] - torch.logsumexp(logits, -1))
    return torch.cat(out) if out else h.new_zeros(0)


@torch.no_grad()
def sequence_logps(root, student, batch: dict[str, Tensor], vocab: int, chunk: int, pack: int | None,
                   autocast=None) -> Tensor:
    """(B,) Σ log q(answer token) of each row of a padded batch, without gradient (the reference's, validation)."""
    with autocast or contextlib.nullcontext():
        h, targets = root(batch["input_ids"], batch["attention_mask"], batch["labels"], pack)  # (N, H), (N,)
        lp = token_logps(student, h, targets, vocab, chunk)
    rows = _rows_of_targets(batch["labels"])
    return torch.zeros(batch["labels"].shape[0], dtype=torch.float64, device=lp.device).index_add(
        0, rows, lp.double()).float()


def reference_logps(root, student, encoded: list[EncodedConversation], pad_id: int, vocab: int, chunk: int,
                    pack: int | None, batch_size: int = 8) -> list[float]:
    """Σ log-probabilities of each encoded sequence under ``student`` as it is now (the reference model)."""
    device = next(student.parameters()).device
    out: list[float] = []
    was = student.training
    student.eval()
    try:
        for i in range(0, len(encoded), batch_size):
            b = {k: v.to(device) for k, v in collate(encoded[i:i + batch_size], pad_id).items()}
            out += sequence_logps(root, student, b, vocab, chunk, pack).tolist()
    finally:
        student.train(was)
    return out


class PreferenceDistiller:
    """One optimizer step of DPO or KTO over micro-batches; the `Distiller` interface the distill loop uses."""

    teacher = None          # the policy is scored against cached reference log-probs: no teacher runs
    tied_embedding = None   # gradients stay dense (one backward per micro-batch through the whole graph)

    def __init__(self, objective: PreferenceObjective, student, root, vocab: int, pack: int | None,
                 autocast=None):
        self.objective, self.student, self.root, self.vocab, self.pack = objective, student, root, vocab, pack
        self.autocast = autocast

    def _policy(self, b: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The decoder pass with gradient: (N, H) hidden, (N,) targets, (N,) their rows, (B,) sequence log-probs
        (no gradient: the loss's inputs)."""
        with self.autocast or contextlib.nullcontext():
            h, targets = self.root(b["input_ids"], b["attention_mask"], b["labels"], self.pack)
            with torch.no_grad():
                lp = token_logps(self.student, h.detach(), targets, self.vocab, self.objective.chunk_size)
        rows = _rows_of_targets(b["labels"])
        seq = torch.zeros(b["labels"].shape[0], device=lp.device).index_add(0, rows, lp.float())
        return h, targets, rows, seq

    def _backward(self, h: Tensor, targets: Tensor, rows: Tensor, seq_grad: Tensor, token_grad: Tensor | None) -> None:
        """Send d(loss)/d(seq logp) of each row (and a per-token weight, for the SFT term) to its tokens."""
        leaf = h.detach().requires_grad_()
        weight = seq_grad[rows] + (token_grad if token_grad is not None else 0.0)  # (N,)
        c = self.objective.chunk_size
        for start in range(0, leaf.shape[0], c):
            sl = slice(start, start + c)
            with self.autocast or contextlib.nullcontext():
                lp = token_logps(self.student, leaf[sl], targets[sl], self.vocab, c)
            (weight[sl].detach() * lp).sum().backward()
        if leaf.grad is not None:
            (h * leaf.grad).sum().backward()

    def step(self, micro: list[dict[str, Tensor]], p: Progress, totals=None) -> dict:
        """Forward + backward over the micro-batches (each: ``kind`` rows as `batch_for` builds them); the loss
        is the mean over the step's pairs (DPO) or singles (KTO), plus sft_weight x CE per chosen token."""
        o = self.objective
        device = next(self.student.parameters()).device
        n_items = sum(int(b["ref"].shape[0]) for b in micro)
        n_sft = sum(int(b["sft_tokens"]) for b in micro)
        sums = {"loss": 0.0, "ce": 0.0, "soft": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "accuracy": 0.0,
                "margin": 0.0, "kl": 0.0}
        targets_total = 0
        for b in micro:
            b = {k: v.to(device) for k, v in b.items()}
            h, targets, rows, seq = self._policy(b)
            targets_total += int(targets.numel())
            seq_leaf = seq.detach().requires_grad_()
            terms = self._loss(seq_leaf, b)
            pref = terms["loss"].sum() / max(n_items, 1)
            pref.backward()
            token_grad, ce = None, torch.zeros(())
            if o.sft_weight > 0:
                # CE on the chosen (desirable) answers' tokens: d(-Σ lp)/d lp = -1 per such token.
                sft_rows = b["sft_rows"]
                on = sft_rows[rows].float()  # (N,)
                with torch.no_grad():
                    ce = -(on * self._token_lp(h, targets)).sum()
                token_grad = -o.sft_weight * on / max(n_sft, 1)
            self._backward(h, targets, rows, seq_leaf.grad, token_grad)
            sums["soft"] += float(terms["loss"].detach().sum())
            sums["ce"] += float(ce)
            for k in ("chosen_reward", "rejected_reward", "accuracy", "margin"):
                if k in terms:
                    sums[k] += float(terms[k].sum())
            if "kl" in terms:
                sums["kl"] += float(terms["kl"]) * int(b["ref"].shape[0])
        pref_mean = sums["soft"] / max(n_items, 1)
        ce_mean = sums["ce"] / max(n_sft, 1)
        out = {"loss": pref_mean + o.sft_weight * ce_mean, "soft": pref_mean, "ce": ce_mean, "hidden": 0.0,
               "attention": 0.0, "consistency": 0.0, "temperature": 1.0, "alpha": 0.0, "kd_weight": 1.0,
               "hidden_weight": 0.0, "attention_weight": 0.0, "consistency_weight": 0.0,
               "targets": targets_total, "tokens": targets_total}
        extra = {k: sums[k] / max(n_items, 1) for k in ("chosen_reward", "rejected_reward", "accuracy", "margin")}
        if o.kind == "kto":
            extra = {"kl": sums["kl"] / max(n_items, 1), "reward": sums["chosen_reward"] / max(n_items, 1)}
        return out | {"extra": extra}

    def _token_lp(self, h: Tensor, targets: Tensor) -> Tensor:
        with self.autocast or contextlib.nullcontext():
            return token_logps(self.student, h.detach(), targets, self.vocab, self.objective.chunk_size)

    def _loss(self, seq: Tensor, b: dict[str, Tensor]) -> dict[str, Tensor]:
        """The objective's per-item terms from (rows,) sequence log-probs ``seq`` (a leaf) and the batch's refs."""
        o = self.objective
        if o.kind == "dpo":
            n = seq.shape[0] // 2  # rows: chosen 0..n-1, rejected n..2n-1
            ref = b["ref"]  # (n, 2)
            r = dpo_loss(seq[:n], seq[n:], ref[:, 0], ref[:, 1], beta=o.beta, label_smoothing=o.label_smoothing,
                         loss_type=o.loss_type)
            return {"loss": r["loss"], "chosen_reward": r["chosen_reward"], "rejected_reward": r["rejected_reward"],
                    "margin": r["chosen_reward"] - r["rejected_reward"],
                    "accuracy": (r["chosen_reward"] > r["rejected_reward"]).float()}
        n = seq.shape[0] // 2  # rows: own completions 0..n-1, mismatched n..2n-1 (the reference point)
        ref = b["ref"]  # (n, 2): own, mismatched
        z0 = kto_reference_point(seq[n:].detach(), ref[:, 1])
        r = kto_loss(seq[:n], ref[:, 0], b["desirable"].bool(), z0, beta=o.beta,
                     desirable_weight=o.desirable_weight, undesirable_weight=o.undesirable_weight)
        return {"loss": r["loss"], "chosen_reward": o.beta * (seq[:n] - ref[:, 0]).detach(), "kl": z0}

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        """Validation pairs: the loss, reward accuracy (chosen above rejected) and margin; KTO: the loss."""
        device = next(self.student.parameters()).device
        sums, n = {"val_loss": 0.0, "val_accuracy": 0.0, "val_margin": 0.0}, 0
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            seq = sequence_logps(self.root, self.student, b, self.vocab, self.objective.chunk_size, self.pack,
                                 self.autocast)
            terms = self._loss(seq, b)
            sums["val_loss"] += float(terms["loss"].sum())
            if "accuracy" in terms:
                sums["val_accuracy"] += float(terms["accuracy"].sum())
                sums["val_margin"] += float(terms["margin"].sum())
            n += int(b["ref"].shape[0])
        out = {k: v / max(n, 1) for k, v in sums.items()}
        return out if self.objective.kind == "dpo" else {"val_loss": out["val_loss"]}


def batch_for(kind: str, items: list[tuple[EncodedConversation, EncodedConversation]], refs: list[tuple[float, float]],
              pad_id: int, desirable: list[bool] | None = None) -> dict[str, Tensor]:
    """A micro-batch of n items as 2n padded rows: DPO chosen then rejected, KTO own then mismatched completions;
    ``ref`` (n, 2) their reference log-probs; ``sft_rows`` (2n,) rows whose tokens the SFT term trains."""
    first, second = [a for a, _ in items], [b for _, b in items]
    batch = collate(first + second, pad_id)
    n = len(items)
    batch["ref"] = torch.tensor(refs, dtype=torch.float32).reshape(n, 2)
    sft = torch.zeros(2 * n, dtype=torch.bool)
    if kind == "dpo":
        sft[:n] = True
    else:
        batch["desirable"] = torch.tensor(desirable, dtype=torch.bool)
        sft[:n] = batch["desirable"]
    batch["sft_rows"] = sft
    batch["sft_tokens"] = torch.tensor(sum(sum(x != IGNORE_INDEX for x in e.labels[1:])
                                           for e, on in zip(first, sft[:n].tolist()) if on))
    return batch
