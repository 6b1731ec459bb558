"""Turn encoded conversations into padded tensors."""

from __future__ import annotations

import torch

from kdforge.data.chat import IGNORE_INDEX, EncodedConversation
from kdforge.errors import UserError


def collate(examples: list[EncodedConversation], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists for generation: (input_ids, attention_mask), each (B, W). Every prompt
    ends at the same column, so the new tokens of all rows line up after it."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    return input_ids, attention_mask


def shared_vocab_size(tokenizer, *models) -> int:
    """Length of the tokenizer's vocabulary, which every model's logits must cover."""
    n = len(tokenizer)
    for m in models:
        rows = getattr(m, "vocab_rows", None) or m.get_output_embeddings().weight.shape[0]  # llama.cpp: n_vocab
        if rows < n:
            raise UserError(f"a model has {rows} output rows but its tokenizer has {n} tokens: this tokenizer does "
                            "not go with the model (after adding tokens, resize the model's embeddings)")
    return n
