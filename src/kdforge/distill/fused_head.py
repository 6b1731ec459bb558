"""The output projection's forward and backward by hand, one (chunk, V) block at a time (one process).

Autograd through ``lm_head(x)`` for each chunk of target positions makes, per chunk, a fresh (V, H)
weight gradient (113 MB at V = 49k, H = 576) that AccumulateGrad then adds into ``W.grad``, and a
zero-filled (N, H) buffer per chunk for the slice's input gradient. Here the logits are a leaf, the
loss's backward stops at them, and their gradient g (chunk, V') goes straight where it belongs:
    W.grad[:V'] += gᵀ x      (addmm_ into the one (V, H) buffer: no allocation, no extra pass)
    x.grad[chunk] = g W[:V']
The same numbers as autograd's (a test checks it); on the CI machine the gᵀ x GEMM runs at ~210
GFLOP/s into the existing buffer vs ~145 into a fresh one. Only the padded rows beyond the
tokenizer (V' < V) are skipped in the forward, as `project` cuts them off anyway.

Used where the head is a plain bias-free fp32 Linear (no LoRA, no quantisation-aware parametrization,
no autocast); parallel runs defer the head's gradient instead (kdforge.distill.parallel).
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize


class FusedHead:
    def __init__(self, weight: torch.nn.Parameter, vocab: int):
        self.weight, self.vocab = weight, vocab

    @classmethod
    def of(cls, model, vocab: int, autocast, parallel_active: bool) -> FusedHead | None:
        """The model's head run by hand, or None where autograd's own path must run (see the module docstring)."""
        head = model.get_output_embeddings()
        if (parallel_active or autocast is not None or type(head) is not torch.nn.Linear or head.bias is not None
                or parametrize.is_parametrized(head) or head.weight.dtype != torch.float32
                or head._forward_hooks or head._forward_pre_hooks):
            return None
        return cls(head.weight, min(vocab, head.weight.shape[0]))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(C, H) -> (C, V') logits as a leaf: the loss's backward leaves their gradient in ``.grad``."""
        with torch.no_grad():
            z = x.detach() @ self.weight[:self.vocab].t()  # (C, V')
        return z.requires_grad_(x.requires_grad or self.weight.requires_grad)

    def backward(self, x: torch.Tensor, logits: torch.Tensor, x_grad: torch.Tensor | None) -> None:
        """Route ``logits.grad`` (C, V') into the weight's gradient and into ``x_grad`` (C, H), a view of the
        (N, H) input gradient."""
        g = logits.grad
        if g is None:
            return
        w = self.weight
        with torch.no_grad():
            if w.requires_grad:
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
                elif w.grad.is_sparse:  # a tied embedding's lookup gradient of an earlier micro-batch
                    w.grad = w.grad.to_dense()
                w.grad[:self.vocab].addmm_(g.t(), x.detach())  # (V', H) += (V', C) @ (C, H)
            if x_grad is not None:
                torch.mm(g, w[:self.vocab], out=x_grad)  # (C, H)
