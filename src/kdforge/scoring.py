"""Agreement between a teacher and other models on teacher-answer tokens.

One computation for `eval` (the report, per prompt category), the export round trip and the
benchmarks, so all of them measure the same thing the same way: NLL of the answer tokens, forward
KL(teacher ‖ model) at T=1, top-1 agreement. Per category also the teacher's mean entropy: where the
teacher is nearly certain its soft labels carry little more than the hard answer, so a low-entropy
category teaches a student little beyond plain fine-tuning.

A model reads the conversations in one of three ways (docs/cross-tokenizer.md, "Evaluating such students"):
- the teacher's tokenizer (no reading given): the teacher's ids, position by position;
- a trimmed copy of it (:class:`TrimmedReading`): the model reads its own ids, the teacher reads them mapped to
  its own (the same tokens), and the teacher's logits are cut to the kept ids and renormalised (log-softmax over
  ``teacher_logits[:, kept]``), so KL and top-1 are over the kept ids;
- another tokenizer (:class:`CrossReading`): the model reads its own encoding; KL is the shared-vocabulary
  forward KL per aligned span at T=1 and top-1 is span top-1 agreement (kdforge.distill.cross_losses), the
  measures distill's validation reports.
NLL is per the model's own answer token; ``bits_per_byte`` (the same NLL in bits per byte the answer tokens
spell) is the one figure comparable across tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdforge.data.batching import collate
from kdforge.data.chat import IGNORE_INDEX, EncodedConversation
from kdforge.distill.cross_teacher import CrossSignal, Tokenizers, target_ids
from kdforge.distill.cross_tokenizer import Span, align, span_index, spelled
from kdforge.distill.losses import divergence, hard_ce
from kdforge.models.forward import target_positions
from kdforge.runtime import as_runtime

METRICS = ("nll", "kl", "top1")


@dataclass
class TrimmedReading:
    """A model whose vocabulary was trimmed from the teacher's: its id i is teacher id ``kept[i]``."""

    kept: torch.Tensor                 # (K,) teacher ids, increasing
    data: list[EncodedConversation]    # the conversations as the model's own tokenizer encodes them
    pad_id: int
    table: list[bytes | None] | None = None  # what its ids spell (bits per byte; None: not reported)


@dataclass
class CrossReading:
    """A model with another tokenizer: its own encoding of each conversation and the spans against the teacher's."""

    toks: Tokenizers                   # teacher and model tokenizers, byte tables, shared ids
    data: list[EncodedConversation]
    spans: list[list[Span]]
    pad_id: int


def cross_reading(toks: Tokenizers, teacher_data: list[EncodedConversation], data: list[EncodedConversation],
                  pad_id: int) -> CrossReading:
    """Align each conversation's target tokens on the two sides into spans (as distill's `encode_pairs`)."""
    spans = [align(spelled(toks.s_table, target_ids(s)), spelled(toks.t_table, target_ids(t)))
             for s, t in zip(data, teacher_data)]
    return CrossReading(toks, data, spans, pad_id)


def byte_lengths(table: list[bytes | None] | None) -> torch.Tensor | None:
    """(V,) bytes each id spells; a control token (None) counts as one byte, like the span alignment's sentinel."""
    if table is None:
        return None
    return torch.tensor([1 if b is None else len(b) for b in table], dtype=torch.float64)


class _Sums:
    """One model's sums per category: NLL over its own tokens, KL and top-1 over its units (tokens or spans)."""

    def __init__(self, n_cat: int):
        z = lambda: torch.zeros(n_cat, dtype=torch.float64)  # noqa: E731
        self.s = {k: z() for k in METRICS}
        self.tokens, self.units, self.bytes, self.aligned, self.dropped = z(), z(), z(), z(), z()
        self.retokenized = 0

    def add(self, key: str, cat: torch.Tensor, values: torch.Tensor) -> None:
        target = self.s[key] if key in self.s else getattr(self, key)
        target.index_add_(0, cat, values.double().cpu())


def _rows(mask: torch.Tensor, offset: int, cat_ids: torch.Tensor) -> torch.Tensor:
    # Boolean-mask indexing is row-major, so the n-th target row belongs to the n-th True of the
    # (B, T-1) mask: its row index is the conversation within the batch.
    return cat_ids[mask.nonzero()[:, 0] + offset]  # (N,) category of each target row


def _batch_targets(b: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    mask = target_positions(b["labels"])  # (B, T-1)
    return mask, b["labels"][:, 1:][mask].to(device)  # (N,)


def _own_nll(sums: _Sums, rt, b, vocab: int, device, row_cat, targets, lengths) -> torch.Tensor:
    logits = rt.target_logits(b["input_ids"], b["attention_mask"], b["labels"], vocab).to(device)  # (N, V_m)
    nll = hard_ce(logits, targets)  # (N,)
    sums.add("nll", row_cat, nll)
    sums.add("tokens", row_cat, torch.ones(len(row_cat)))
    if lengths is not None:
        sums.add("bytes", row_cat, lengths[targets.cpu()])
    return logits


def _trimmed(sums: _Sums, t_rt, rt, r: TrimmedReading, t_logits, t_data, i: int, bs: int, vocab: int,
             cat_ids, lengths) -> None:
    """The model on its own ids; the teacher on the same tokens (mapped to its ids), its logits cut to the kept ids."""
    own = r.data[i:i + bs]
    b = collate(own, r.pad_id)
    kept_list = r.kept.tolist()
    differs = [[kept_list[x] for x in s.input_ids] != t.input_ids for s, t in zip(own, t_data[i:i + bs])]
    sums.retokenized += sum(differs)
    if any(differs):
        # Text outside the trimming data: the trimmed tokenizer spells it in shorter tokens. The teacher reads
        # those same tokens (as when it distilled this student), so the positions stay one to one.
        kept = r.kept
        labels = torch.where(b["labels"] == IGNORE_INDEX, b["labels"], kept[b["labels"].clamp(min=0)])
        t_logits = t_rt.target_logits(kept[b["input_ids"]], b["attention_mask"], labels, vocab)  # (N, V)
    t_cut = t_logits[:, r.kept.to(t_logits.device)]  # (N, K): log-softmax renormalises over the kept ids
    mask, targets = _batch_targets(b, t_cut.device)
    row_cat = _rows(mask, i, cat_ids)
    logits = _own_nll(sums, rt, b, len(r.kept), t_cut.device, row_cat, targets, lengths)
    sums.add("kl", row_cat, divergence(logits, t_cut, "forward_kl", chunk_size=1024))
    sums.add("top1", row_cat, (logits.argmax(-1) == t_cut.argmax(-1)).float())
    sums.add("units", row_cat, torch.ones(len(row_cat)))
    # What the kept-ids KL leaves out: the teacher's probability on ids the model cannot write, per token.
    t = t_logits.float()
    kept_mass = torch.logsumexp(t[:, r.kept.to(t.device)], dim=-1) - torch.logsumexp(t, dim=-1)  # (N,) log P(kept)
    sums.add("dropped", row_cat, -torch.expm1(kept_mass))  # (N,) 1 - P_teacher(kept)


def _cross(sums: _Sums, rt, r: CrossReading, t_logits, t_targets, t_mask, i: int, bs: int, cat_ids,
           lengths) -> None:
    """The model on its own encoding; KL and top-1 per aligned span, as distill's `CrossSetup.evaluate`."""
    from kdforge.distill.cross_losses import chunk_spans, hybrid, span_student, span_top1, teacher_first

    b = collate(r.data[i:i + bs], r.pad_id)
    device = t_logits.device
    mask, targets = _batch_targets(b, device)
    row_cat = _rows(mask, i, cat_ids)
    logits = _own_nll(sums, rt, b, len(r.toks.s_table), device, row_cat, targets, lengths)  # (N_s, V_s)
    s_counts, t_counts = mask.sum(1).tolist(), t_mask.sum(1).tolist()
    spans = r.spans[i:i + bs]
    index = span_index(spans, s_counts, t_counts)
    # span_index keeps, per conversation, the spans both sides hold (in order): their conversation is that one's.
    held = [sum(sp.s1 <= ns and sp.t1 <= nt for sp in sps) for sps, ns, nt in zip(spans, s_counts, t_counts)]
    span_cat = cat_ids[torch.repeat_interleave(torch.arange(len(held)), torch.tensor(held, dtype=torch.long)) + i]
    signal = CrossSignal(t_logits, t_targets, None, index.to(device))
    m, first, later, later_span, t_later, t_later_span = chunk_spans(signal, 0, logits.shape[0])
    if not first.numel():
        return
    s_first, s_cont = span_student(F.log_softmax(logits.float(), dim=-1), targets, first, later, later_span,
                                   first.numel())
    t = teacher_first(signal, m, t_later, t_later_span, 1.0, t_logits.shape[-1])
    sums.add("kl", span_cat, hybrid(s_first, s_cont, t, r.toks.vocab, "forward_kl", uld_weight=0.0))
    sums.add("top1", span_cat, span_top1(s_first, t, r.toks.s_table, r.toks.t_table).float())
    sums.add("units", span_cat, torch.ones(len(span_cat)))
    sums.add("aligned", span_cat, (index.s_end - index.s_first).float())


def _means(s: _Sums, r, own: torch.Tensor, units: torch.Tensor, j: int | None) -> dict[str, Any]:
    """Means over all categories (``j`` None) or category ``j``: NLL per own token, KL and top-1 per unit."""
    pick = (lambda x: float(x.sum())) if j is None else (lambda x: float(x[j]))  # noqa: E731
    n_own, n_units, n_bytes = pick(own), pick(units), pick(s.bytes)
    out: dict[str, Any] = {"nll": pick(s.s["nll"]) / max(n_own, 1), "kl": pick(s.s["kl"]) / max(n_units, 1),
                           "top1": pick(s.s["top1"]) / max(n_units, 1)}
    out["bits_per_byte"] = pick(s.s["nll"]) / (math.log(2) * n_bytes) if n_bytes > 0 else None
    if r is not None:
        out["tokens"] = int(n_own)
    if isinstance(r, CrossReading):
        out["spans"] = int(n_units)
    return out


@torch.inference_mode()
def agreement_by_category(teacher, models: list, data: list[EncodedConversation], categories: list[str],
                          pad_id: int, vocab: int, batch_size: int = 8, readings: list | None = None,
                          tokenizer=None) -> dict[str, Any]:
    """Per model: overall and per-category means; per category: conversations, answer tokens and the
    teacher's mean entropy (nats).

    ``teacher`` and ``models``: runtimes (`kdforge.runtime.CausalLM`, any backend) or loaded
    transformers modules; an entry that is the teacher itself (and reads the teacher's ids) reuses the
    teacher's logits. ``data``: the conversations in the teacher's encoding. ``readings``: per model,
    None (it reads the teacher's ids), a :class:`TrimmedReading` or a :class:`CrossReading`.
    ``tokenizer``: the teacher's, for ``bits_per_byte`` of the models that read its ids (None: not reported
    for them). Returns ``{"models": [{"nll", "kl", "top1", "tokens", "bits_per_byte", "by_category": {cat:
    {...}}, ...}], "categories": {cat: {"conversations", "tokens", "teacher_entropy"}}}``; ``tokens``: the
    model's own answer tokens; a trimmed model adds ``retokenized`` (conversations its tokenizer spells in other
    tokens than the teacher's) and ``teacher_dropped_mass`` (the teacher's mean probability on ids the model
    lacks: what its kept-ids KL does not see), another tokenizer ``spans`` and ``aligned_tokens`` (its tokens
    inside spans).
    """
    readings = readings or [None] * len(models)
    names = sorted(set(categories))
    cat_ids = torch.tensor([names.index(c) for c in categories])  # (E,) category of each conversation
    n_cat = len(names)
    t_rt = as_runtime(teacher)
    runtimes = [t_rt if m is teacher else as_runtime(m) for m in models]
    sums = [_Sums(n_cat) for _ in models]
    t_lengths = None
    if tokenizer is not None and any(r is None for r in readings):
        from kdforge.models.token_bytes import TokenBytesError, token_bytes

        try:
            t_lengths = byte_lengths(token_bytes(tokenizer))
        except TokenBytesError:
            t_lengths = None  # a tokenizer kdforge cannot spell out: no bits per byte
    lengths = [t_lengths if r is None else byte_lengths(r.table if isinstance(r, TrimmedReading) else r.toks.s_table)
               for r in readings]
    tokens = torch.zeros(n_cat, dtype=torch.float64)
    entropy = torch.zeros(n_cat, dtype=torch.float64)
    for i in range(0, len(data), batch_size):
        b = collate(data[i:i + batch_size], pad_id)  # (B, T) each, on CPU: every runtime moves them itself
        t_logits = t_rt.target_logits(b["input_ids"], b["attention_mask"], b["labels"], vocab)  # (N, V)
        mask, targets = _batch_targets(b, t_logits.device)  # (B, T-1), (N,)
        row_cat = _rows(mask, i, cat_ids)  # (N,)
        tokens.index_add_(0, row_cat, torch.ones(len(row_cat), dtype=torch.float64))
        t_logp = F.log_softmax(t_logits.float(), dim=-1)  # (N, V)
        ent = -(t_logp.exp() * t_logp).sum(-1)  # (N,)
        entropy.index_add_(0, row_cat, ent.double().cpu())
        t_top = t_logits.argmax(-1)  # (N,)
        for s, m, r, lens in zip(sums, runtimes, readings, lengths):
            if isinstance(r, TrimmedReading):
                _trimmed(s, t_rt, m, r, t_logits, data, i, batch_size, vocab, cat_ids, lens)
                continue
            if isinstance(r, CrossReading):
                _cross(s, m, r, t_logits, targets, mask, i, batch_size, cat_ids, lens)
                continue
            logits = t_logits if m is t_rt else m.target_logits(b["input_ids"], b["attention_mask"], b["labels"],
                                                                vocab).to(t_logits.device)
            per_row = {"nll": hard_ce(logits, targets),
                       "kl": divergence(logits, t_logits, "forward_kl", chunk_size=1024),
                       "top1": (logits.argmax(-1) == t_top).float()}  # each (N,)
            for k in METRICS:
                s.add(k, row_cat, per_row[k])
            if lens is not None:
                s.add("bytes", row_cat, lens[targets.cpu()])
    total = float(tokens.sum())
    convs = torch.bincount(cat_ids, minlength=n_cat)
    out_models = []
    for s, r in zip(sums, readings):
        own, units = (tokens, tokens) if r is None else (s.tokens, s.units)
        row = _means(s, r, own, units, None)
        row["tokens"] = int(total) if r is None else int(s.tokens.sum())
        if isinstance(r, TrimmedReading):
            row["retokenized"] = s.retokenized
            row["teacher_dropped_mass"] = float(s.dropped.sum()) / max(float(s.units.sum()), 1)
        if isinstance(r, CrossReading):
            row["aligned_tokens"] = int(s.aligned.sum())
        row["by_category"] = {c: _means(s, r, own, units, j) for j, c in enumerate(names)}
        out_models.append(row)
    cats = {c: {"conversations": int(convs[j]), "tokens": int(tokens[j]),
                "teacher_entropy": float(entropy[j]) / max(float(tokens[j]), 1)} for j, c in enumerate(names)}
    return {"models": out_models, "categories": cats}


def agreement(teacher, models: list, data: list[EncodedConversation], pad_id: int, vocab: int,
              batch_size: int = 8) -> list[dict[str, float]]:
    """Per model, over the answer tokens of ``data``: mean NLL of the answer tokens, mean
    KL(teacher ‖ model) per token at T=1, top-1 agreement with the teacher's argmax, and ``tokens``.

    The teacher's logits are computed once per batch and shared by every model.
    """
    res = agreement_by_category(teacher, models, data, ["all"] * len(data), pad_id, vocab, batch_size)
    return [{k: m[k] for k in (*METRICS, "tokens")} for m in res["models"]]
