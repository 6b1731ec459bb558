"""The teacher's signal when it tokenises differently from the student (kdforge.distill.cross_tokenizer).

Every training conversation is encoded twice, once per tokenizer; the two encodings' target tokens are
aligned into spans once, when the data is prepared (:func:`encode_pairs`). A micro-batch then carries
the teacher-side tensors (``t_input_ids``, ``t_attention_mask``, ``t_labels``) and the spans as flat
index tensors (``span_*``, :func:`add_to_batch`); :class:`CrossTeacher` asks the live teacher or the
cache for the signal at the *teacher's* target rows and hands the trainer a :class:`CrossSignal`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from kdforge.data.chat import END_OF_TURN_MARKERS, IGNORE_INDEX, EncodedConversation, encode_conversation
from kdforge.distill.cross_tokenizer import SharedVocab, Span, SpanIndex, align, shared_vocab, span_index, spelled
from kdforge.distill.losses import SparseSignal
from kdforge.models.token_bytes import token_bytes

SPAN_KEYS = tuple(f"span_{f.name}" for f in fields(SpanIndex))


@dataclass
class Tokenizers:
    """Both sides' tokenizers, what their ids spell, and the ids they share."""

    teacher: object
    student: object
    t_table: list[bytes | None]
    s_table: list[bytes | None]
    vocab: SharedVocab

    @classmethod
    def of(cls, teacher_tok, student_tok) -> Tokenizers:
        t_table, s_table = token_bytes(teacher_tok), token_bytes(student_tok)
        return cls(teacher_tok, student_tok, t_table, s_table,
                   shared_vocab(t_table, s_table, end_ids(teacher_tok), end_ids(student_tok),
                                control_names(teacher_tok, t_table), control_names(student_tok, s_table)))


def control_names(tok, table: list[bytes | None]) -> dict[str, int]:
    """Each control token's name (``<|im_start|>``) -> its id."""
    ids = [i for i, b in enumerate(table) if b is None]
    return dict(zip(tok.convert_ids_to_tokens(ids), ids))


def end_ids(tok) -> list[int]:
    """The end-of-turn ids a tokenizer has (its chat template's marker first, then EOS)."""
    vocab = tok.get_vocab()
    ids = [vocab[m] for m in END_OF_TURN_MARKERS if m in vocab]
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


@dataclass
class Pair:
    """One conversation as the teacher encodes it, and its spans against the student's encoding."""

    teacher: EncodedConversation
    spans: list[Span]
    s_targets: int
    t_targets: int


def target_ids(enc: EncodedConversation) -> list[int]:
    """The target tokens in the trainer's order: labels of positions 1.. (each predicted by the one before)."""
    return [x for x in enc.labels[1:] if x != IGNORE_INDEX]


def encode_pairs(toks: Tokenizers, student_encs: list[EncodedConversation], convs: list,
                 max_length: int) -> list[Pair]:
    """The teacher's encoding of each conversation and its spans against the student's (same order)."""
    out = []
    for s_enc, conv in zip(student_encs, convs):
        t_enc = encode_conversation(toks.teacher, conv.messages, max_length)
        s_ids, t_ids = target_ids(s_enc), target_ids(t_enc)
        spans = align(spelled(toks.s_table, s_ids), spelled(toks.t_table, t_ids))
        out.append(Pair(t_enc, spans, len(s_ids), len(t_ids)))
    return out


def add_to_batch(batch: dict[str, torch.Tensor], pairs: list[Pair], teacher_pad_id: int) -> dict[str, torch.Tensor]:
    """The micro-batch's teacher-side tensors and span index, added to the student's batch."""
    from kdforge.data.batching import collate

    t = collate([p.teacher for p in pairs], teacher_pad_id)
    index = span_index([p.spans for p in pairs], [p.s_targets for p in pairs], [p.t_targets for p in pairs])
    return batch | {f"t_{k}": v for k, v in t.items()} | {
        key: getattr(index, key.removeprefix("span_")) for key in SPAN_KEYS}


def batch_index(batch: dict[str, torch.Tensor]) -> SpanIndex:
    return SpanIndex(**{key.removeprefix("span_"): batch[key] for key in SPAN_KEYS})


@dataclass
class CrossSignal:
    """The teacher at its own N_t target rows, and how they line up with the student's N_s rows."""

    teacher: torch.Tensor | SparseSignal  # (N_t, V_t) logits, or the cache's top-k
    t_actual: torch.Tensor                # (N_t,) the teacher's own target tokens
    actual_logp: torch.Tensor | None      # (N_t,) their log-probs at the capture temperature (cache only)
    index: SpanIndex

    def top1(self) -> torch.Tensor:  # for logging only: the teacher's most likely token per teacher row
        return self.teacher.top1() if isinstance(self.teacher, SparseSignal) else self.teacher.argmax(-1)


class CrossTeacher:
    """Wraps a LiveTeacher or CachedTeacher: runs it on the teacher's encoding of the micro-batch."""

    def __init__(self, inner, toks: Tokenizers):
        self.inner, self.toks = inner, toks
        self.num_layers, self.hidden_size = inner.num_layers, inner.hidden_size
        self.runtime = getattr(inner, "runtime", None)

    def __call__(self, batch: dict[str, torch.Tensor], req):
        from kdforge.distill.teacher_source import TeacherOutput

        tb = {k.removeprefix("t_"): v for k, v in batch.items() if k.startswith("t_")}
        if "rows" in batch:
            tb["rows"] = batch["rows"]
        out = self.inner(tb, req)
        if out.signal is None:
            return TeacherOutput(None)
        labels = tb["labels"][:, 1:]
        t_actual = labels[labels != IGNORE_INDEX]  # (N_t,) in row order, as the signal's rows
        actual = getattr(out, "actual_logp", None)
        return TeacherOutput(CrossSignal(out.signal, t_actual, actual, batch_index(batch)))


@dataclass
class CrossSetup:
    """What the trainer needs to score a CrossSignal: the shared ids, the teacher's vocabulary size, the objective."""

    toks: Tokenizers
    t_vocab: int
    objective: object  # kdforge.distill.cross_losses.CrossObjective

    @property
    def vocab(self) -> SharedVocab:
        return self.toks.vocab

    @torch.no_grad()
    def evaluate(self, s_logits: torch.Tensor, targets: torch.Tensor, signal: CrossSignal) -> tuple[float, float, int]:
        """(Σ shared-vocabulary forward KL at T=1, Σ span top-1 agreement, spans) over a batch's spans."""
        import torch.nn.functional as F

        from kdforge.distill.cross_losses import chunk_spans, hybrid, span_student, span_top1, teacher_first

        m, first, later, later_span, t_later, t_later_span = chunk_spans(signal, 0, s_logits.shape[0])
        if not first.numel():
            return 0.0, 0.0, 0
        s_first, s_cont = span_student(F.log_softmax(s_logits.float(), dim=-1), targets, first, later, later_span,
                                       first.numel())
        t = teacher_first(signal, m, t_later, t_later_span, 1.0, self.t_vocab)
        kl = hybrid(s_first, s_cont, t, self.vocab, "forward_kl", uld_weight=0.0)
        top1 = span_top1(s_first, t, self.toks.s_table, self.toks.t_table)
        return float(kl.sum()), float(top1.sum()), int(first.numel())
