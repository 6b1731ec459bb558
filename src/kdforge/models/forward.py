"""Forward passes that compute the vocabulary projection only where a loss or metric needs it.

The output projection is about a third of a small model's FLOPs and its (B, T, V) output dominates
memory; prompt and padding positions never need it. We run the decoder, gather the hidden states
at target positions, and project only those.

Padding is the other waste: a batch of conversations padded to its longest one is ~25% padding on
chat data. With ``pack=True`` the conversations are laid end to end in rows of at most
``pack_length`` tokens, each attending only to itself (a block-diagonal causal mask, positions
restarting at 0), so the decoder runs on real tokens only. Targets come out in the same order as
from the padded batch (conversation by conversation), so a cached teacher's rows still line up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kdforge.data.chat import IGNORE_INDEX


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T-1) bool mask of positions whose next token is a target."""
    return labels[:, 1:] != IGNORE_INDEX


DEFAULT_PACK_LENGTH = 256  # tokens per packed row (attention cost grows with its square)
PACKABLE_ATTENTION = ("sdpa", "eager")  # implementations that take an explicit (R, 1, L, L) mask


def can_pack(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) in PACKABLE_ATTENTION


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
              pack_length: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) batch -> packed rows (R, L): input_ids, labels, position_ids, ``real``
    (False at row padding) and a bool attention mask (R, 1, L, L), True where a query may attend to a key.

    Conversations keep their order and are never split; a row takes conversations while they fit in
    ``max(pack_length, longest conversation)`` tokens. Row padding attends to itself only (a fully
    masked row would make attention NaN).
    """
    lengths = attention_mask.sum(1).tolist()
    cap = max(pack_length, max(lengths))
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if rows[-1] and used + n > cap:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    width = max(sum(lengths[i] for i in r) for r in rows)
    n_rows = len(rows)
    ids = input_ids.new_zeros(n_rows, width)
    lab = labels.new_full((n_rows, width), IGNORE_INDEX)
    pos = torch.zeros(n_rows, width, dtype=torch.long, device=input_ids.device)
    seg = torch.full((n_rows, width), -1, dtype=torch.long, device=input_ids.device)  # -1: row padding
    for r, members in enumerate(rows):
        off = 0
        for i in members:
            n = lengths[i]
            ids[r, off:off + n] = input_ids[i, :n]
            lab[r, off:off + n] = labels[i, :n]
            lab[r, off] = IGNORE_INDEX  # a conversation's first token is never a target of the one before
            pos[r, off:off + n] = torch.arange(n, device=input_ids.device)
            seg[r, off:off + n] = i
            off += n
    causal = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()  # (L, L)
    same = seg[:, :, None] == seg[:, None, :]  # (R, L, L)
    pad = seg < 0
    eye = torch.eye(width, dtype=torch.bool, device=input_ids.device)
    mask = causal & same & ~pad[:, None, :] | (eye & pad[:, :, None])  # (R, L, L)
    return {"input_ids": ids, "labels": lab, "position_ids": pos, "attention_mask": mask[:, None], "real": ~pad}


def target_hidden(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    pack_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the N target positions, (N, H), and the target ids, (N,).

    ``pack_length``: run the decoder on packed rows (see the module docstring) when the batch has
    padding and the model's attention takes an explicit mask; None runs the padded batch.
    """
    decoder = model.get_decoder()
    if pack_length is not None and input_ids.shape[0] > 1 and not bool(attention_mask.all()) and can_pack(model):
        p = pack_rows(input_ids, attention_mask, labels, pack_length)
        hidden = decoder(input_ids=p["input_ids"], attention_mask=p["attention_mask"],
                         position_ids=p["position_ids"], use_cache=False).last_hidden_state  # (R, L, H)
        labels = p["labels"]
    else:
        # No K/V cache: one pass over the whole sequence needs none (building it copies every layer's K/V).
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         use_cache=False).last_hidden_state  # (B, T, H)
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
    pack_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the N target positions, (N, V'), and the target ids, (N,)."""
    h, targets = target_hidden(model, input_ids, attention_mask, labels, pack_length)
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
