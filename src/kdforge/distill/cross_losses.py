"""Cross-tokenizer losses over aligned spans (kdforge.distill.cross_tokenizer makes the spans).

A span covers student tokens s_1..s_a and teacher tokens t_1..t_b that spell the same bytes. Each side's
**span distribution** is its first token's distribution scaled by the probability of the rest of the span
as written:
    p_span(v) = p_1(v) · Π_{j>1} p_j(t_j)        q_span(v) = q_1(v) · Π_{i>1} q_i(s_i)
so a single-token span (every span, when both tokenizers are the same) is the ordinary next-token
distribution, and a longer span's mass Π p_j(t_j) ≤ 1 is the chance of continuing as written.

Losses, per span (the trainer sums them and divides by the student's target-token count, like every
token loss; at temperature T both sides' log-probs are taken at T, and the objective's T² applies):
  uld     Universal Logit Distillation (Boizard et al., 2024): the Wasserstein-1 distance between the two
          distributions when tokens are matched by rank, Σ_r |p_(r) − q_(r)| over sorted probabilities.
          It needs no vocabulary correspondence. Here the k largest are compared rank by rank and the
          rest as one bin, |P_rest − Q_rest| (a lower bound of the full sum, exact when k covers both).
  hybrid  GOLD's idea (TRL): entries that spell the same bytes in both vocabularies (SharedVocab) are the
          same event, so on them an ordinary divergence (the objective's forward/reverse KL, JSD, ...)
          applies, over the bins [shared tokens..., everything else]; ULD compares the unshared rest
          (teacher tokens with no student counterpart against student tokens with no teacher one),
          weighted by ``uld_weight``. With identical tokenizers every token is shared, every span is one
          token and the rest bins are empty: the hybrid loss is the same-tokenizer divergence (a test).

Multi-token spans (``CrossObjective.multi_token``). The shared bins are the same event on both sides only
when each side spells the span with one token. In a span one side cuts more finely (student " Par"+"is",
teacher " Paris") the teacher's first-token mass sits on " Paris", a token the student's own tokenizer does
not emit there, while its bin " Par" holds the student's probability of the span as the student writes it:
the first-token comparison pushes the student's first token toward " Paris" and the CE toward " Par".
  first_token  (default) the span distributions above, on every span.
  binary       on spans where either side has more than one token, the divergence over the two events
               both sides really share: the span as written, P = Π_j p_j(t_j) and Q = Π_i q_i(s_i) (each
               side's own tokens), against anything else, bins [log P, log(1 − P)] vs [log Q, log(1 − Q)];
               no ULD there. One-token spans keep the shared-vocabulary divergence (and ULD), so with
               identical tokenizers (every span one token) it is the same-tokenizer divergence exactly.
Unshared teacher mass (``CrossObjective.unshared``): what the hybrid does with the first-token probability of
teacher ids that spell no student token (a trimmed student lacks most of a teacher's vocabulary).
  uld          (default) it goes to the rest bin, and ULD compares it by rank with the student's mass on ids no
               teacher id maps to.
  renormalise  both first-token distributions over the shared ids only, each renormalised over them (the rest
               bin keeps only "not continuing as written").
  map_prefix   each unshared teacher id's mass moves to the student id spelling the longest prefix of its bytes
               (SharedVocab.prefix: " Paris" -> " Par"), so several teacher ids may fill one student bin; ids no
               student token begins stay in the rest bin.
With identical tokenizers nothing is unshared and all three are the same-tokenizer divergence exactly.
The cached teacher gives only its top-k at a span's first token (plus the tail mass): then the shared
bins are the top-k's shared ids and the tail counts as unshared mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdforge.distill.cross_tokenizer import SharedVocab
from kdforge.distill.losses import divergence_fn
from kdforge.softlabels.format import LOG_TAIL_FLOOR

Tensor = torch.Tensor

CROSS_LOSSES = ("hybrid", "uld")
_MASKED = -1e4  # log-prob of a bin that is not there: exp() is exactly 0, and no inf/nan reaches a gradient
_FLOOR = math.exp(LOG_TAIL_FLOOR)


@dataclass
class TeacherFirst:
    """The teacher at the first token of M spans: log-probs at T over ``ids`` (None: the whole vocabulary,
    ids 0..V_t-1), the probability outside them, and log Π of the rest of the span as written."""

    logp: Tensor            # (M, K)
    ids: Tensor | None      # (M, K) or None
    tail: Tensor            # (M,) probability mass outside ``ids`` (0 for a dense teacher)
    cont: Tensor            # (M,) log-probability of the span's later tokens
    own: Tensor | None = None  # (M,) log-probability of the span's first token as written (multi_token binary)


def span_student(s_logp: Tensor, s_actual: Tensor, first: Tensor, later: Tensor, later_span: Tensor,
                 m: int) -> tuple[Tensor, Tensor]:
    """The student's first-token log-probs (M, V_s) and its log Π over each span's later tokens (M,).
    (C, V_s) log-probs at T of a chunk's rows, (C,) their actual next tokens; indices are chunk-local."""
    cont = s_logp.new_zeros(m)
    if later.numel():
        cont = cont.index_add(0, later_span, s_logp[later].gather(1, s_actual[later][:, None])[:, 0])
    return s_logp[first], cont


def dense_teacher(t_logits: Tensor, t_actual: Tensor, first: Tensor, later: Tensor, later_span: Tensor,
                  temperature: float) -> TeacherFirst:
    """A live teacher's (N_t, V_t) target logits -> its span distributions' parts at T."""
    lp_first = F.log_softmax(t_logits[first].float() / temperature, dim=-1)  # (M, V_t)
    cont = lp_first.new_zeros(first.numel())
    if later.numel():
        z = t_logits[later].float() / temperature  # (Lt, V_t)
        own = z.gather(1, t_actual[later][:, None])[:, 0] - torch.logsumexp(z, dim=-1)
        cont = cont.index_add(0, later_span, own)
    first_own = lp_first.gather(1, t_actual[first][:, None])[:, 0]
    return TeacherFirst(lp_first, None, lp_first.new_zeros(first.numel()), cont, first_own)


def sparse_teacher(ids: Tensor, t_bins: Tensor, later_logp: Tensor, later_span: Tensor,
                   first_logp: Tensor | None = None) -> TeacherFirst:
    """A cached teacher at M spans' first rows: (M, k) ids and (M, k+1) bin log-probs at T (top-k, then the
    tail: losses.sparse_teacher_logp), the log-probs at T of the spans' later tokens as written (Lt,) and,
    if known, of their first tokens as written (M,)."""
    cont = t_bins.new_zeros(ids.shape[0])
    if later_logp.numel():
        cont = cont.index_add(0, later_span, later_logp.float())
    return TeacherFirst(t_bins[:, :-1], ids, t_bins[:, -1].exp(), cont,
                        None if first_logp is None else first_logp.float())


def _sorted_l1(p: Tensor, q: Tensor, p_total: Tensor, q_total: Tensor, k: int) -> Tensor:
    """Σ_{r<k} |p_(r) − q_(r)| + |rest_p − rest_q|: W1 by rank over probabilities (M, ·); totals (M,)."""
    kp, kq = min(k, p.shape[-1]), min(k, q.shape[-1])
    tp, tq = p.topk(kp, dim=-1).values, q.topk(kq, dim=-1).values  # (M, kp), (M, kq) descending
    width = max(kp, kq)
    tp, tq = F.pad(tp, (0, width - kp)), F.pad(tq, (0, width - kq))
    return (tp - tq).abs().sum(-1) + ((p_total - tp.sum(-1)) - (q_total - tq.sum(-1))).abs()


def uld(s_first: Tensor, s_cont: Tensor, t: TeacherFirst, top_k: int = 64) -> Tensor:
    """ULD between the span distributions, the k largest by rank plus the rest. -> (M,)"""
    s_scale, t_scale = s_cont.exp(), t.cont.exp()
    q = s_first.exp() * s_scale[:, None]        # (M, V_s)
    p = t.logp.exp() * t_scale[:, None]         # (M, K)
    return _sorted_l1(p, q, t_scale * (t.logp.exp().sum(-1) + t.tail), s_scale * s_first.exp().sum(-1), top_k)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x ≤ 0, floored like the rest bins (no inf reaches a gradient)."""
    return torch.where(x > -0.693, torch.log((-torch.expm1(x)).clamp(min=_FLOOR)),
                       torch.log1p(-x.clamp(max=-0.693).exp()))


def span_binary(s_span: Tensor, t_span: Tensor, kind: str = "forward_kl", beta: float = 0.5,
                skew: float = 0.1) -> Tensor:
    """The divergence ``kind`` over the two events [the span as written, anything else], from each side's
    log-probability of the span in its own tokens (M,), (M,). -> (M,)"""
    fn = divergence_fn(kind, beta, skew)
    s_span, t_span = s_span.clamp(max=0.0), t_span.clamp(max=0.0)
    return fn(torch.stack([s_span, _log1mexp(s_span)], -1), torch.stack([t_span, _log1mexp(t_span)], -1))


def hybrid(s_first: Tensor, s_cont: Tensor, t: TeacherFirst, vocab: SharedVocab, kind: str = "forward_kl",
           beta: float = 0.5, skew: float = 0.1, uld_weight: float = 1.0, top_k: int = 64,
           multi: Tensor | None = None, s_own: Tensor | None = None, unshared: str = "uld") -> Tensor:
    """The divergence ``kind`` over [shared tokens..., the rest] plus ``uld_weight`` · ULD of the unshared
    tokens, per span. (M, V_s) student first-token log-probs, (M,) continuation, the teacher. -> (M,)

    ``multi`` (M,) bool: spans either side spells with several tokens, scored instead by :func:`span_binary`
    (the span as written vs not; multi_token "binary"); ``s_own`` (M,): the student's first tokens as
    written (ids), needed with ``multi``, as is the teacher's ``own``. ``unshared``: what becomes of the teacher's
    mass on ids the student has no counterpart for (uld, renormalise, map_prefix: the module docstring)."""
    if unshared not in UNSHARED:
        raise ValueError(f"unshared {unshared!r}: choose one of {', '.join(UNSHARED)}")
    d = _hybrid_first(s_first, s_cont, t, vocab, kind, beta, skew, uld_weight, top_k, unshared)
    if multi is None or not bool(multi.any()):
        return d
    if t.own is None or s_own is None:
        raise ValueError("multi_token binary needs both sides' log-probs of the span's first tokens as written")
    s_span = s_first.gather(1, s_own[:, None])[:, 0] + s_cont
    return torch.where(multi, span_binary(s_span, t.own + t.cont, kind, beta, skew), d)


def _group_logsumexp(x: Tensor, group: Tensor, n: int) -> Tensor:
    """(M, L) log-probs -> (M, n): log Σ of the columns of each group (``group`` (L,) in 0..n-1). A group of
    one column is that column exactly (log(e^0) + x)."""
    idx = group[None, :].expand_as(x)
    mx = x.new_full((x.shape[0], n), -math.inf).scatter_reduce(1, idx, x.detach(), "amax")
    e = (x - mx.gather(1, idx)).exp()
    return e.new_zeros(x.shape[0], n).index_add(1, group, e).log() + mx


def _renormalised(bins: Tensor, present: Tensor | None = None) -> Tensor:
    """Log-probs (M, S) renormalised over the bins (``present`` (M, S) bool: the others stay masked)."""
    out = bins - torch.logsumexp(bins, dim=-1, keepdim=True)
    return out if present is None else torch.where(present, out, _MASKED)


def _hybrid_first(s_first: Tensor, s_cont: Tensor, t: TeacherFirst, vocab: SharedVocab, kind: str,
                  beta: float, skew: float, uld_weight: float, top_k: int, unshared: str = "uld") -> Tensor:
    fn = divergence_fn(kind, beta, skew)
    t2s, s_unmapped = vocab.mapping(unshared)
    t2s, s_unmapped = t2s.to(s_first.device), s_unmapped.to(s_first.device)
    q = s_first.exp()                                                                  # (M, V_s)
    t_p = t.logp.exp()                                                                 # (M, K)
    present = None
    renorm = (True, True)  # whether each side (teacher, student) has mass outside the bins to renormalise away
    if t.ids is None:
        # A dense teacher: the same shared columns in every row, taken by index (no (M, V_t) index tensors).
        shared_t = (t2s >= 0).nonzero()[:, 0]                                          # (S,) teacher ids
        cols, group = torch.unique(t2s[shared_t], return_inverse=True)                 # (S',) student ids
        if cols.numel() == shared_t.numel():                                           # one to one (t2s)
            cols, t_first = t2s[shared_t], t.logp[:, shared_t]
        else:                                                                          # map_prefix: merged
            t_first = _group_logsumexp(t.logp[:, shared_t], group, cols.numel())
        s_first_bins = s_first[:, cols]                                                # (M, S')
        t_unshared = t_p[:, t2s < 0]                                                   # (M, V_t - S)
        out_s = torch.ones(q.shape[1], dtype=torch.bool, device=q.device)
        out_s[cols] = False
        s_out = q[:, out_s].sum(-1)                                                    # (M,)
        renorm = (bool((t2s < 0).any()), bool(out_s.any()))
    else:
        sid = t2s[t.ids]                                                               # (M, k) student ids
        shared = sid >= 0
        sid0 = sid.clamp(min=0)
        t_first = torch.where(shared, t.logp, _MASKED)                                 # (M, k)
        if unshared == "map_prefix":
            # Several of a row's ids may start with the same student token: their mass is summed into the
            # first of them, the others masked.
            count = torch.zeros_like(q).scatter_add_(1, sid0, shared.to(q.dtype))      # (M, V_s)
            dup = shared & (count.gather(1, sid0) > 1)
            if bool(dup.any()):
                k = sid.shape[1]
                pos = torch.arange(k, device=sid.device).expand_as(sid)
                key = torch.where(shared, pos, k)
                first_pos = torch.full_like(q, k, dtype=torch.long).scatter_reduce(1, sid0, key, "amin")
                shared = shared & (first_pos.gather(1, sid0) == pos)
                mass = torch.zeros_like(q).scatter_add_(1, sid0, torch.where(sid >= 0, t_p, 0.0))
                merged = mass.gather(1, sid0).clamp(min=_FLOOR).log()
                t_first = torch.where(shared, torch.where(dup, merged, t.logp), _MASKED)
        s_first_bins = torch.where(shared, s_first.gather(1, sid0), _MASKED)
        t_unshared = torch.where(sid >= 0, 0.0, t_p)
        in_bins = torch.zeros_like(q).scatter_add_(1, sid0, shared.to(q.dtype)) > 0    # (M, V_s)
        s_out = torch.where(in_bins, 0.0, q).sum(-1)
        present = shared
    t_out = t_unshared.sum(-1) + t.tail                                                # (M,)
    if unshared == "renormalise":
        # Both first-token distributions over the shared ids only, each renormalised over them; the rest bin
        # is then only "not continuing as written" (empty for a one-token span).
        # (A side with every entry in the bins is left as it is: the same tokenizer gives the same bits.)
        if renorm[0]:
            t_first = _renormalised(t_first, present)
        if renorm[1]:
            s_first_bins = _renormalised(s_first_bins, present)
        t_out, s_out = torch.zeros_like(t_out), torch.zeros_like(s_out)
    t_bins, s_bins = t_first + t.cont[:, None], s_first_bins + s_cont[:, None]
    if present is not None:
        t_bins, s_bins = torch.where(present, t_bins, _MASKED), torch.where(present, s_bins, _MASKED)
    # The rest bin on each side: not continuing as written, or starting with a token outside the bins.
    # Summed from the outside entries (never as 1 − Σ inside): exactly 0 when every entry is shared.
    t_rest = -torch.expm1(t.cont) + t.cont.exp() * t_out
    s_rest = -torch.expm1(s_cont) + s_cont.exp() * s_out
    d = fn(s_bins, t_bins) + fn(s_rest.clamp(min=_FLOOR).log()[:, None], t_rest.clamp(min=_FLOOR).log()[:, None])
    if present is not None and unshared == "renormalise":
        d = torch.where(present.any(-1), d, 0.0)  # a cached row with no shared id among its top-k: nothing to compare
    if uld_weight == 0:
        return d
    # Unshared mass on each side, compared by rank (ULD): teacher entries without a student counterpart
    # (and the cached tail), student ids no teacher id maps to.
    t_scale, s_scale = t.cont.exp(), s_cont.exp()
    t_unshared_total = t_unshared.sum(-1) + t.tail
    p_u = t_unshared * t_scale[:, None]
    q_u = q[:, s_unmapped] * s_scale[:, None]
    return d + uld_weight * _sorted_l1(p_u, q_u, t_scale * t_unshared_total, q_u.sum(-1), top_k)


def span_top1(s_first: Tensor, t: TeacherFirst, s_table: list[bytes | None], t_table: list[bytes | None]) -> Tensor:
    """Per span: 1 where the two most likely first tokens agree on the text, i.e. one's bytes are a prefix of the
    other's (a longer teacher token " Paris" and a student's " Par" both start the same text). -> (M,) bool"""
    s_top = s_first.argmax(-1).tolist()
    t_arg = t.logp.argmax(-1)
    t_top = (t_arg if t.ids is None else t.ids.gather(1, t_arg[:, None])[:, 0]).tolist()
    out = []
    for a, b in zip(s_top, t_top):
        x, y = s_table[a], t_table[b]
        if x is None or y is None:
            out.append(x is None and y is None)
        else:
            out.append(bool(x) and bool(y) and (x.startswith(y) or y.startswith(x)))
    return torch.tensor(out, dtype=torch.bool)


def retemper(actual_logp: Tensor, bins_capture: Tensor, capture_temperature: float, temperature: float,
             vocab_size: int) -> Tensor:
    """A cached token's log-prob at the capture temperature -> at T, normalised like
    losses.sparse_teacher_logp's bins (top-k re-tempered exactly, the tail spread evenly). (N,), (N, k+1)"""
    if temperature == capture_temperature:
        return actual_logp.float()
    r = capture_temperature / temperature
    lp, tail = bins_capture[:, :-1].float(), bins_capture[:, -1].float()
    n_tail = max(vocab_size - lp.shape[-1], 1)
    tail = math.log(n_tail) + r * (tail - math.log(n_tail))
    z = torch.logsumexp(torch.cat([r * lp, tail[:, None]], dim=-1), dim=-1)
    return r * actual_logp.float() - z


@dataclass(frozen=True)
class CrossObjective:
    """How spans are scored: ``loss`` hybrid or uld, the divergence of the hybrid's shared bins, ULD's weight
    in the hybrid and how many ranks ULD compares one by one."""

    loss: str = "hybrid"
    kind: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    uld_weight: float = 1.0
    top_k: int = 64
    multi_token: str = "first_token"  # "first_token" | "binary" (module docstring); spans of several tokens
    unshared: str = "uld"  # "uld" | "renormalise" | "map_prefix" (module docstring): unshared teacher mass


MULTI_TOKEN = ("first_token", "binary")
UNSHARED = ("uld", "renormalise", "map_prefix")


def chunk_spans(signal, r0: int, r1: int) -> tuple[slice, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The spans starting in student rows [r0, r1) (a chunk never cuts one): their slice, their first rows
    (chunk-local student rows; teacher rows) and their later rows with the span each continues."""
    idx = signal.index
    m0, m1 = idx.spans_in(r0, r1)
    s_sel = (idx.s_later_span >= m0) & (idx.s_later_span < m1)
    t_sel = (idx.t_later_span >= m0) & (idx.t_later_span < m1)
    return (slice(m0, m1), idx.s_first[m0:m1] - r0, idx.s_later[s_sel] - r0, idx.s_later_span[s_sel] - m0,
            idx.t_later[t_sel], idx.t_later_span[t_sel] - m0)


def teacher_first(signal, m: slice, t_later: Tensor, t_later_span: Tensor, temperature: float,
                  t_vocab: int) -> TeacherFirst:
    """The teacher's side of spans ``m`` from a CrossSignal (live logits or the cache's top-k)."""
    from kdforge.distill.losses import SparseSignal, sparse_teacher_logp

    first = signal.index.t_first[m]
    t = signal.teacher
    if not isinstance(t, SparseSignal):
        return dense_teacher(t, signal.t_actual, first, t_later, t_later_span, temperature)
    if signal.actual_logp is None and t_later.numel():
        raise ValueError("this soft-label cache has no log-probs of the teacher's own tokens: label it with "
                         "cross_tokenizer: true for a student with another tokenizer")
    bins = sparse_teacher_logp(t.logprobs[first], t.tail_logmass[first], t.capture_temperature, temperature, t_vocab)
    later = t_later.new_zeros(0, dtype=torch.float32) if not t_later.numel() else retemper(
        signal.actual_logp[t_later], torch.cat([t.logprobs[t_later], t.tail_logmass[t_later, None]], dim=-1),
        t.capture_temperature, temperature, t_vocab)
    own = None if signal.actual_logp is None else retemper(
        signal.actual_logp[first], torch.cat([t.logprobs[first], t.tail_logmass[first, None]], dim=-1),
        t.capture_temperature, temperature, t_vocab)
    return sparse_teacher(t.ids[first], bins, later, t_later_span, own)


def multi_token_spans(m: int, later_span: Tensor, t_later_span: Tensor) -> Tensor:
    """(M,) bool: the spans either side spells with more than one token (from chunk_spans' later rows)."""
    return (torch.bincount(later_span, minlength=m) > 0) | (torch.bincount(t_later_span, minlength=m) > 0)


def cross_terms(s_logits: Tensor, s_targets: Tensor, r0: int, signal, vocab: SharedVocab, t_vocab: int,
                alpha: float, temperature: float, obj: CrossObjective) -> dict[str, Tensor]:
    """alpha·CE + (1 − alpha)·T²·Σ span losses for one chunk of student rows [r0, r0 + C) (summed, not averaged).
    (C, V_s) logits, (C,) the student's own targets, the micro-batch's CrossSignal."""
    from kdforge.distill.losses import hard_ce

    ce = hard_ce(s_logits, s_targets).sum() if alpha > 0 else s_logits.new_zeros((), dtype=torch.float32)
    soft = s_logits.new_zeros((), dtype=torch.float32)
    m, first, later, later_span, t_later, t_later_span = chunk_spans(signal, r0, r0 + s_logits.shape[0])
    if alpha < 1 and first.numel():
        s_lp = F.log_softmax(s_logits.float() / temperature, dim=-1)  # (C, V_s)
        s_first, s_cont = span_student(s_lp, s_targets, first, later, later_span, first.numel())
        t = teacher_first(signal, m, t_later, t_later_span, temperature, t_vocab)
        if obj.loss == "uld":
            soft = uld(s_first, s_cont, t, obj.top_k).sum()
        else:
            if obj.multi_token not in MULTI_TOKEN:
                raise ValueError(f"multi_token {obj.multi_token!r}: choose one of {', '.join(MULTI_TOKEN)}")
            multi = (multi_token_spans(first.numel(), later_span, t_later_span)
                     if obj.multi_token == "binary" else None)
            soft = hybrid(s_first, s_cont, t, vocab, obj.kind, obj.beta, obj.skew, obj.uld_weight, obj.top_k,
                          multi, s_targets[first], obj.unshared).sum()
    return {"loss": alpha * ce + (1 - alpha) * temperature ** 2 * soft, "ce": ce, "soft": soft}
