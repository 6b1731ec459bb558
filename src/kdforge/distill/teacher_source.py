"""Where the teacher's signal comes from: a live teacher model, or the soft-label cache.

The trainer asks a source for the signal of one micro-batch (logits or sparse top-k at the target
positions, hidden states of mapped layers, attention maps) and does not care which it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdforge.data.chat import IGNORE_INDEX
from kdforge.distill.losses import ABSENT, ABSENT_LOGP, SparseSignal, TeacherSignal
from kdforge.models.forward import capture, target_logits
from kdforge.models.loading import input_device
from kdforge.softlabels.reader import CacheError, SoftLabelCache


@dataclass(frozen=True)
class TeacherRequest:
    """What the trainer asks of the teacher for one micro-batch."""

    logits: bool = True                # the signal at the target positions (not needed for alpha = 1)
    layers: tuple[int, ...] = ()       # teacher layers whose outputs to capture
    hidden: bool = False               # their hidden states, (B, T, H) each
    attention: bool = False            # their attention probabilities, (B, h, T, T) each
    pack_length: int | None = None     # pack the live teacher's forward pass (ignored when layers are captured)


@dataclass
class TeacherOutput:
    signal: TeacherSignal | None                                   # at the N target positions
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> (B, T, H)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> (B, h, T, T)
    # (N,) the teacher's log-prob of each target token as written, at the capture temperature: a cache
    # labelled for cross-tokenizer training has it (a live teacher's logits hold it already)
    actual_logp: torch.Tensor | None = None


class TeacherTargets(torch.nn.Module):
    """The live teacher's forward as one module (what FSDP2 wraps when the teacher is sharded): logits at
    the target positions, (N, V'), or only the decoder when just layer outputs are wanted."""

    def __init__(self, model, vocab: int):
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                logits: bool, decoder: bool, pack_length: int | None) -> torch.Tensor | None:
        if logits:
            return target_logits(self.model, input_ids, attention_mask, labels, self.vocab, pack_length)[0]
        if decoder:
            self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return None


class LiveTeacher:
    def __init__(self, model, vocab: int, wrap=None, kept_ids: torch.Tensor | None = None):
        """``wrap``: applied to the TeacherTargets module (kdforge.distill.parallel shards it with FSDP2).
        ``kept_ids``: a student with a trimmed vocabulary (kdforge.models.vocab_trim): student id i is teacher id
        kept_ids[i]. The teacher reads the batch's ids mapped to its own and its logits are cut to the kept ids,
        (N, K): the log-softmax over them renormalises the teacher's distribution over what the student can say."""
        self.model, self.vocab = model, vocab
        self.kept_ids = kept_ids
        self.num_layers = model.config.num_hidden_layers
        self.hidden_size = model.config.hidden_size
        for p in model.parameters():
            p.requires_grad_(False)
        self.input_device = input_device(model)
        self.root = TeacherTargets(model, vocab)
        if wrap is not None:
            self.root = wrap(self.root)

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], req: TeacherRequest) -> TeacherOutput:
        out_dev = batch["input_ids"].device
        # A device-mapped teacher takes its inputs where its embedding runs; its outputs come back to the student.
        ids, mask, labels = (batch[k].to(self.input_device) for k in ("input_ids", "attention_mask", "labels"))
        if self.kept_ids is not None:
            kept = self.kept_ids.to(ids.device)
            ids = kept[ids]
            labels = torch.where(labels == IGNORE_INDEX, labels, kept[labels.clamp(min=0)])
        # Captured layer outputs must keep the padded (B, T) layout of the student's: no packing then.
        pack_length = req.pack_length if not req.layers else None
        hidden, attention = req.hidden, req.attention
        with capture(self.model, list(req.layers), hidden, attention) as store:
            signal = self.root(ids, mask, labels, req.logits, hidden or attention, pack_length)  # (N, V) or None
        if hasattr(self.root, "reshard"):
            self.root.reshard()  # FSDP2 keeps a root's gathered weights after forward; a teacher has no backward
        if signal is not None and self.kept_ids is not None:
            signal = signal[:, self.kept_ids.to(signal.device)]  # (N, K)
        return TeacherOutput(None if signal is None else signal.to(out_dev),
                             {k: v.to(out_dev) for k, v in store["hidden"].items()},
                             {k: v.to(out_dev) for k, v in store["attention"].items()})


class CachedTeacher:
    """The teacher as recorded by `kdforge label`: top-k log-probs and, if kept, hidden states."""

    def __init__(self, cache: SoftLabelCache, kept_ids: torch.Tensor | None = None):
        """``kept_ids``: a student with a trimmed vocabulary (student id i is teacher id kept_ids[i]): the
        cached teacher ids become student ids, and a top-k slot whose token the student lacks becomes
        ABSENT (no bin: the teacher's other bins renormalise over what the student can say)."""
        self.cache = cache
        self.student_id = None
        if kept_ids is not None:
            self.student_id = torch.full((cache.manifest.vocab_size,), ABSENT, dtype=torch.long)
            self.student_id[kept_ids] = torch.arange(len(kept_ids))
        self.num_layers = cache.manifest.teacher_layers
        self.hidden_size = cache.manifest.teacher_hidden_size

    def _to_student(self, ids: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor):
        """Teacher ids -> a trimmed student's ids; slots it lacks ABSENT; the tail cut to its kept share. The
        target is the teacher's distribution renormalised over the kept ids (as a live teacher's logits cut to
        them give): the cache kept nothing of the tail's shape, so it is assumed spread evenly over the V - k
        tokens outside the top-k, of which K - (present slots) are kept; the losses renormalise the bins."""
        ids = self.student_id[ids]                                         # (N, k)
        present = ids != ABSENT
        v, k, kept = self.student_id.numel(), ids.shape[1], int((self.student_id != ABSENT).sum())
        share = (kept - present.sum(-1)).clamp(min=1).float() / max(v - k, 1)  # (N,)
        return ids, torch.where(present, lp, ABSENT_LOGP), tail + share.log()

    def __call__(self, batch: dict[str, torch.Tensor], req: TeacherRequest) -> TeacherOutput:
        # pack_length is the live teacher's concern: cached targets are stored conversation by conversation.
        if req.attention:
            raise CacheError("attention-map alignment needs a live teacher: the cache holds no attention maps")
        rows = batch["rows"].tolist()
        labels = [self.cache.get(r) for r in rows]
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()  # target positions per row
        for r, lab, n in zip(rows, labels, counts):
            if lab.ids.shape[0] != n:
                raise CacheError(f"cache example {r} has {lab.ids.shape[0]} target tokens, the data has {n}: the "
                                 "cache was made from other data or another max_length; re-run `kdforge label`")
        device = batch["input_ids"].device
        signal = actual = None
        if req.logits:
            ids, lp = torch.cat([x.ids for x in labels]), torch.cat([x.logprobs for x in labels])  # (N, k) each
            tail = torch.cat([x.tail_logmass for x in labels])  # (N,)
            if self.student_id is not None:
                ids, lp, tail = self._to_student(ids, lp, tail)
            signal = SparseSignal(ids.to(device), lp.to(device), tail.to(device), self.cache.temperature)
            if all(x.actual_logp is not None for x in labels):
                actual = torch.cat([x.actual_logp for x in labels]).to(device)
        out: dict[int, torch.Tensor] = {}
        if req.hidden:
            b, t = batch["input_ids"].shape
            for layer in req.layers:
                if layer not in self.cache.hidden_layers:
                    raise CacheError(f"teacher layer {layer} is mapped but the cache kept hidden states only for "
                                     f"{self.cache.hidden_layers}; re-label with --hidden-layers or change layer_map")
                padded = torch.zeros(b, t, self.hidden_size, device=device)  # (B, T, H)
                for i, lab in enumerate(labels):
                    h = lab.hidden[layer]
                    padded[i, :h.shape[0]] = h.to(device)
                out[layer] = padded
        return TeacherOutput(signal, out, actual_logp=actual)
