"""Continuous batching on a transformers model: one KV cache row per sequence, one forward per step.

State between steps is a single batched ``DynamicCache`` whose layers hold keys/values of shape
(B, H_kv, T, D), *left*-padded: every row's real tokens end at column T-1, so one new token per row
is always appended at column T. ``self._mask`` (B, T) marks real columns; position ids are kept per
sequence, so RoPE sees each sequence's own positions whatever padding sits in front of it.

Each step:
  1. rows whose client went away are dropped (``index_select`` on the batch dimension), and
     leading columns that are padding in every remaining row are cut off;
  2. waiting requests are prefilled one by one on their own unpadded cache (exact, and the
     logits of its last position give the first answer token), then stacked into the batch after
     left-padding either side to the longer length;
  3. one decode forward over all rows: input (B, 1), mask (B, T+1), positions (B, 1) -> logits
     (B, V); each row samples with its own parameters and generator; finished rows leave.

A decode step of a small model on a CPU is bound by reading the weights, which costs the same for
one row as for sixteen, so tokens/s grows almost linearly with the number of concurrent clients.

Prompt log-probabilities (:meth:`TransformersEngine._score`) run the prompts of a scoring job through
the same forward kdforge's labelling uses (`kdforge.models.forward.target_hidden`: a right-padded
batch, packed into rows without padding compute), up to ``prefill_budget`` tokens per pass, then the
output projection and an fp32 ``log_softmax`` a bounded slice of positions at a time.
"""

from __future__ import annotations

import inspect

import torch

from kdforge.data.chat import IGNORE_INDEX
from kdforge.models.forward import DEFAULT_PACK_LENGTH, project, target_hidden
from kdforge.runtime.base import TRANSFORMERS
from kdforge.runtime.sampling import sample_token
from kdforge.serve.engine import BaseEngine, Sequence, log
from kdforge.serve.scoring import PromptScores, scores_from_rows


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, n + T, D) with zeros in front (masked, so their value is irrelevant)."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


class TransformersEngine(BaseEngine):
    backend = TRANSFORMERS

    def __init__(self, model, tokenizer, eot_ids: list[int], max_batch: int = 16,
                 max_model_len: int | None = None, max_tokens_cap: int | None = None,
                 prefill_budget: int = 4096):
        ctx = getattr(model.config, "max_position_embeddings", None) or 2048
        super().__init__(tokenizer, eot_ids, min(ctx, max_model_len or ctx), max_batch, max_tokens_cap)
        self.model = model
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache (the old name still works, with a warning).
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        # Embedding matrices are often padded past the tokenizer (Qwen2.5): never sample those rows.
        self._vocab = min(len(tokenizer), model.config.vocab_size)
        self.prefill_budget = prefill_budget  # prompt tokens prefilled per step before decoding again
        self._active: list[Sequence] = []
        self._cache = None  # DynamicCache, layers (B, H_kv, T, D), or None when no sequence is active
        self._mask: torch.Tensor | None = None  # (B, T) long, 1 = real token

    @property
    def num_active(self) -> int:
        return len(self._active)

    # ---- model calls -------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """(B, L) ids -> (B, V) fp32 CPU logits of the last position; ``cache`` grows by L columns."""
        kw = {self._cache_kw: cache, "use_cache": True}
        if self._logits_to_keep:
            kw["logits_to_keep"] = 1  # the (B, L, V) projection of a long prompt is mostly wasted
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), **kw)
        return out.logits[:, -1, : self._vocab].float().cpu()

    def _prefill(self, seq: Sequence):
        from transformers import DynamicCache

        n = len(seq.prompt_ids)
        cache = DynamicCache()  # no config: every layer a plain DynamicLayer, so rows stack uniformly
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long)  # (1, L)
        logits = self._forward(ids, torch.ones(1, n, dtype=torch.long), torch.arange(n).unsqueeze(0), cache)
        self.stats.prompt_tokens += n
        return cache, logits[0]  # (V,)

    @torch.inference_mode()
    def _score(self, prompts: list[list[int]], top: int) -> list[PromptScores]:
        out: list[PromptScores] = []
        group: list[list[int]] = []
        for p in prompts:  # consecutive prompts up to prefill_budget tokens per forward (a longer one alone)
            if group and sum(len(g) + 1 for g in group) + len(p) + 1 > self.prefill_budget:
                out += self._score_group(group, top)
                group = []
            group.append(p)
        return out + self._score_group(group, top)

    def _score_group(self, prompts: list[list[int]], top: int) -> list[PromptScores]:
        # Each prompt is followed by a placeholder token, so that its last position is a "target" too:
        # target_hidden then returns the hidden state at every prompt position, the last one included
        # (its logits give the first answer token). The placeholder only sees itself and the prompt.
        width = max(len(p) for p in prompts) + 1
        ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, W), right-padded
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for b, p in enumerate(prompts):
            n = len(p)
            ids[b, :n] = labels[b, :n] = torch.tensor(p)
            ids[b, n] = labels[b, n] = 0  # the placeholder
            mask[b, : n + 1] = 1
        dev = self.device
        hidden, _ = target_hidden(self.model, ids.to(dev), mask.to(dev), labels.to(dev), DEFAULT_PACK_LENGTH)
        # hidden: (sum of L, H), prompt by prompt, position by position
        return scores_from_rows(prompts, hidden, top, self._vocab, lambda h: project(self.model, h, self._vocab))

    # ---- batch bookkeeping -------------------------------------------------------------------
    def _join(self, seq: Sequence, cache) -> None:
        """Stack a freshly prefilled (1, H, L, D) cache under the running (B, H, T, D) batch."""
        n = len(seq.prompt_ids)
        row_mask = torch.ones(1, n, dtype=torch.long)
        if not self._active:
            self._cache, self._mask = cache, row_mask
        else:
            width = self._mask.shape[1]
            total = max(width, n)
            for mine, new in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([_pad_left(mine.keys, total - width), _pad_left(new.keys, total - n)])
                mine.values = torch.cat([_pad_left(mine.values, total - width), _pad_left(new.values, total - n)])
            self._mask = torch.cat([
                torch.nn.functional.pad(self._mask, (total - width, 0)),
                torch.nn.functional.pad(row_mask, (total - n, 0)),
            ])
        self._active.append(seq)

    def _keep_rows(self, keep: list[int]) -> None:
        """Drop the rows not in ``keep`` and the padding columns no remaining row needs."""
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        mask = self._mask[idx]  # (B', T)
        first = int(torch.nonzero(mask.sum(0))[0])  # first column some row still uses
        mask = mask[:, first:]
        dev_idx = idx.to(self.device)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, dev_idx)[:, :, first:]
            layer.values = layer.values.index_select(0, dev_idx)[:, :, first:]
        self._mask = mask

    def _fail_all(self, message: str) -> None:
        for seq in self._active:
            seq.finish("error", error=message)
        self._active, self._cache, self._mask = [], None, None
        super()._fail_all(message)

    # ---- one engine step ---------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self) -> None:
        # 1. Cancelled requests leave before any compute is spent on them.
        self._drop_cancelled_waiting()
        keep = []
        for i, seq in enumerate(self._active):
            if seq.handle.cancelled:
                self._cancelled(seq)
            else:
                keep.append(i)
        self._keep_rows(keep)

        # 2. Admit waiting requests while there are free rows and prefill budget.
        budget = self.prefill_budget
        while self._waiting and len(self._active) < self.max_batch and (budget > 0 or not self._active):
            seq = self._waiting.popleft()
            budget -= len(seq.prompt_ids)
            try:
                cache, logits = self._prefill(seq)
                finished = seq.accept(sample_token(logits, seq.params, seq.generator), logits)
            except Exception as e:  # e.g. out of memory on a long prompt: fail this request only
                log.exception("prefill failed")
                self.stats.errors += 1
                seq.finish("error", error=f"{type(e).__name__}: {e}")
                continue
            if finished:
                self._done(seq)  # finished on its first token (end of turn, max_tokens=1, a stop string)
            else:
                self._join(seq, cache)
        if not self._active:
            return

        # 3. One decode step over every active sequence.
        n = len(self._active)
        ids = torch.tensor([[s.last_token] for s in self._active], dtype=torch.long)  # (B, 1)
        positions = torch.tensor([[s.position] for s in self._active], dtype=torch.long)  # (B, 1)
        mask = torch.cat([self._mask, torch.ones(n, 1, dtype=torch.long)], dim=1)  # (B, T + 1)
        logits = self._forward(ids, mask, positions, self._cache)  # (B, V)
        self._mask = mask
        self.stats.decode_steps += 1
        self.stats.batch_sizes[n] += 1
        self.stats.max_active = max(self.stats.max_active, n)
        keep = []
        for i, seq in enumerate(self._active):
            seq.position += 1
            if seq.accept(sample_token(logits[i], seq.params, seq.generator), logits[i]):
                self._done(seq)
            else:
                keep.append(i)
        self._keep_rows(keep)
