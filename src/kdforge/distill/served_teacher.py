"""The teacher behind a server as a teacher source for distill: a top-k signal per micro-batch.

`kdforge distill --teacher http(s)://host:port/v1` trains on the same sparse signal a soft-label cache gives
(`CachedTeacher`): per target position the teacher's k likeliest token ids, their log-probabilities and
the log of the mass outside them, at temperature 1. Here they come from the server at every step
(`kdforge.runtime.served.ServedRuntime.topk_logprobs`: one ``prompt_logprobs: k`` request per sequence of
the micro-batch, concurrent), unquantised (the cache stores fp16 and square-root codes), so the losses are
the cache's up to its quantisation and equal to a local teacher's top-k.

Only the signal: hidden states and attention maps cannot come from a server (a request for them is refused
with a message), and the temperature of the signal is 1 (a server's prompt_logprobs cannot be re-tempered;
the sparse losses apply the training temperature to it as they do to a cache at capture temperature 1).
"""

from __future__ import annotations

import torch

from kdforge.distill.losses import SparseSignal
from kdforge.distill.teacher_source import TeacherOutput, TeacherRequest
from kdforge.errors import UserError
from kdforge.softlabels.format import LOG_TAIL_FLOOR

CAPTURE_TEMPERATURE = 1.0  # prompt_logprobs are the model's log-softmax at temperature 1


def tail_logmass(top_lp: torch.Tensor) -> torch.Tensor:
    """(N, k) log-probabilities -> (N,) log(1 - their mass), as the cache computes it (fp64 sum, floored)."""
    mass = top_lp.double().exp().sum(-1)
    return torch.log1p(-mass.clamp(max=1 - 1e-13)).clamp(min=LOG_TAIL_FLOOR).float()


class ServedTeacher:
    """A served model (a `ServedRuntime`) as the trainer's teacher source: ``source(batch, request)``."""

    def __init__(self, runtime, k: int, vocab: int, num_layers: int = 0, hidden_size: int = 0, own: bool = False):
        """``k``: token log-probabilities per position (at most the server's --max-logprobs); ``vocab``: the
        shared tokenizer length (ids past it are refused); ``num_layers``/``hidden_size``: what the trainer
        reads of a teacher's shape (from the tokenizer folder's config.json; no layer can be mapped); ``own``:
        also the log-probs of the targets as written (a student with another tokenizer needs them)."""
        if k < 2:
            raise UserError(f"a served teacher's signal needs k >= 2 log-probabilities per position, not {k}")
        self.runtime, self.k, self.vocab = runtime, k, vocab
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.own = own

    def __call__(self, batch: dict[str, torch.Tensor], req: TeacherRequest) -> TeacherOutput:
        if req.layers or req.hidden or req.attention:
            raise UserError("hidden-state and attention alignment need the teacher's layers: a served teacher "
                            "returns log-probabilities only; set hidden_loss/attention_loss off (or label "
                            "with a local teacher and --hidden-layers)")
        if not req.logits:
            return TeacherOutput(None)
        device = batch["input_ids"].device
        got = self.runtime.topk_logprobs(batch["input_ids"].cpu(), batch["attention_mask"].cpu(),
                                         batch["labels"].cpu(), self.vocab, self.k, own=self.own)
        values, ids = got[0], got[1]  # (N, k), (N, k)
        actual = got[2].to(device) if self.own else None  # (N,)
        if ids.numel() and int(ids.max()) >= self.vocab:
            raise UserError(f"the served teacher returned token id {int(ids.max())}, past the tokenizer's "
                            f"{self.vocab} tokens: the tokenizer does not go with the served model")
        return TeacherOutput(SparseSignal(ids.to(device), values.to(device), tail_logmass(values).to(device),
                                          CAPTURE_TEMPERATURE), actual_logp=actual)
