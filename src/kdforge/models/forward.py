"""Forward passes that compute the vocabulary projection only where a loss or metric needs it.

The output projection is about a third of a small model's FLOPs and its (B, T, V) output dominates
memory; prompt and padding positions never need it. We run the decoder, gather the hidden states
at target positions, and project only those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kdforge.data.chat import IGNORE_INDEX


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T-1) bool mask of positions whose next token is a target."""
    return labels[:, 1:] != IGNORE_INDEX


def target_hidden(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the N target positions, (N, H), and the target ids, (N,)."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    mask = target_positions(labels)  # (B, T-1)
    return hidden[:, :-1][mask], labels[:, 1:][mask]


def project(model, h: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """(N, H) hidden states -> (N, V') logits, cut to the shared tokenizer length ``vocab_size``.

    Embedding matrices are often padded beyond the tokenizer (e.g. Qwen2.5's 151,936 or 152,064
    rows for 151,665 tokens); the padded rows never take part in a divergence.
    """
    logits = model.get_output_embeddings()(h)  # (N, V)
    return logits[:, :vocab_size] if vocab_size is not None else logits


def target_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the N target positions, (N, V'), and the target ids, (N,)."""
    h, targets = target_hidden(model, input_ids, attention_mask, labels)
    return project(model, h, vocab_size), targets


@contextlib.contextmanager
def capture(model, layers: list[int], hidden: bool, attention: bool) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Record the outputs of decoder ``layers`` (hidden states (B, T, H); attention probs (B, h, T, T))."""
    store: dict[str, dict[int, torch.Tensor]] = {"hidden": {}, "attention": {}}
    handles = []
    decoder_layers = model.get_decoder().layers
    for i in layers:
        if hidden:
            def keep_hidden(_m, _inp, out, i=i):
                store["hidden"][i] = out[0] if isinstance(out, tuple) else out
            handles.append(decoder_layers[i].register_forward_hook(keep_hidden))
        if attention:
            def keep_attn(_m, _inp, out, i=i):
                if not isinstance(out, tuple) or out[1] is None:
                    raise RuntimeError("attention weights are not returned: load the model with eager attention")
                store["attention"][i] = out[1]
            handles.append(decoder_layers[i].self_attn.register_forward_hook(keep_attn))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
