"""A transformers causal LM as a runtime: one loaded ``PreTrainedModel`` on one device.

Generation keeps transformers' batched ``generate`` (left padding, KV cache, stopping) but chooses
every sampled token with kdforge's own sampler: a logits processor draws each row's token with
`kdforge.runtime.sampling.sample_token` and that row's generator, and hands greedy search scores
that are -inf everywhere except the drawn token. transformers' own sampler (``do_sample=True``)
is never used, so a seeded request gives the tokens llama.cpp (or the serve engines) would give on
the same logits. Greedy requests run plain greedy ``generate``, bit for bit as before.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from kdforge.data.batching import left_pad
from kdforge.models.forward import DEFAULT_PACK_LENGTH
from kdforge.models.forward import target_logits as forward_target_logits
from kdforge.models.loading import count_parameters, end_of_turn_ids, input_device, load_model
from kdforge.runtime.base import TRANSFORMERS, CausalLM, check_batch
from kdforge.runtime.sampling import SamplingParams, make_generator, sample_token


class _KdforgeSampler(LogitsProcessor):
    """Row r's next token is ``sample_token(scores[r, :vocab], params, generators[r])``; the returned
    (B, V) scores are 0 at that token and -inf elsewhere, so greedy search takes exactly it."""

    def __init__(self, params: SamplingParams, generators: list[torch.Generator], vocab: int) -> None:
        self.params, self.generators, self.vocab = params, generators, vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = scores[:, : self.vocab].float().cpu()  # (B, vocab): the sampler works on CPU fp32 rows
        out = torch.full_like(scores, -float("inf"))  # (B, V)
        for r, generator in enumerate(self.generators):
            out[r, sample_token(rows[r], self.params, generator)] = 0.0
        return out


class TransformersRuntime(CausalLM):
    """A loaded transformers model (and its tokenizer, when known)."""

    backend = TRANSFORMERS
    hf_model = True

    def __init__(self, model, tokenizer: Any = None) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self.device = input_device(model)  # where inputs go (a device-mapped model spans several)

    @classmethod
    def load(cls, spec: str, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
             context: int | None = None, trust_remote_code: bool = False,
             placement: dict[str, Any] | None = None) -> TransformersRuntime:
        """Load a model spec (HF folder, GGUF file through transformers' loader, ``embedded:NAME``);
        ``threads``/``context`` do not apply (torch's threads are the process's). ``placement``: a device
        map and/or precision (load_model's keyword arguments)."""
        model, tok = load_model(spec, device, dtype, trust_remote_code, **(placement or {}))
        return cls(model, tok)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise ValueError("this transformers runtime was made without a tokenizer; pass one")
        return self._tokenizer

    @property
    def vocab_rows(self) -> int:  # type: ignore[override]
        return int(self.model.get_output_embeddings().weight.shape[0])

    def stop_ids(self, tokenizer: Any = None) -> list[int]:
        # The model's generation_config may name more end-of-turn ids than the tokenizer does.
        return end_of_turn_ids(tokenizer or self.tokenizer, self.model)

    def _pad_id(self) -> int:
        pad = self._tokenizer.pad_token_id if self._tokenizer is not None else self.model.config.pad_token_id
        return int(pad) if pad is not None else 0

    def _sample_vocab(self) -> int:
        # Embedding matrices are often padded past the tokenizer (Qwen2.5): never sample those rows.
        return min(len(self._tokenizer), self.vocab_rows) if self._tokenizer is not None else self.vocab_rows

    @torch.inference_mode()
    def target_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      vocab: int) -> torch.Tensor:
        # Packed rows (no padding compute); the rows come out in the padded batch's target order.
        dev = self.device
        return forward_target_logits(self.model, input_ids.to(dev), attention_mask.to(dev), labels.to(dev), vocab,
                                     DEFAULT_PACK_LENGTH)[0]  # (N, vocab)

    @torch.inference_mode()
    def sequence_logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu()  # (T, V)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
                 generators: list[torch.Generator] | None = None, batch_size: int = 16,
                 vocab: int | None = None, keep_stop: bool = False) -> list[list[int]]:
        """As :meth:`CausalLM.generate`; ``keep_stop``: an answer ended by a stop token keeps it as its last
        token (on-policy distillation trains on the end-of-turn the student chose)."""
        if params.ignore_eos:
            raise ValueError("generate stops at stop_ids; ignore_eos is for the serve engines")
        if not params.greedy and generators is None:
            generators = [make_generator(params.seed) for _ in prompts]
        if generators is not None and len(generators) != len(prompts):
            raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
        pad = self._pad_id()
        # do_sample stays False on both paths: sampled tokens come from _KdforgeSampler.
        cfg = GenerationConfig(max_new_tokens=params.max_tokens, do_sample=False, temperature=None, top_p=None,
                               top_k=None, num_return_sequences=1, eos_token_id=list(stop_ids), pad_token_id=pad)
        stops = set(stop_ids)
        vocab = vocab or self._sample_vocab()
        out: list[list[int]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids, attn = left_pad(chunk, pad)  # (B, W), every prompt ends at column W-1
            kw = {}
            if not params.greedy:
                rows = generators[start:start + len(chunk)]
                kw["logits_processor"] = LogitsProcessorList([_KdforgeSampler(params, rows, vocab)])
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                      generation_config=cfg, **kw)  # (B, W + new)
            for row in gen[:, ids.shape[1]:].tolist():
                end = next((j for j, t in enumerate(row) if t in stops), None)
                out.append(row if end is None else row[:end + keep_stop])
        return out

    @torch.inference_mode()
    def decode_speed(self, prompt_ids: list[int], new_tokens: int, batch: int = 1,
                     repeats: int = 2) -> dict[str, Any]:
        check_batch(self, batch)
        ids = torch.tensor([prompt_ids] * batch, device=self.device)  # (B, T): identical rows, no padding
        attn = torch.ones_like(ids)
        kw = {"do_sample": False, "pad_token_id": self._pad_id(), "eos_token_id": None}

        def timed(n: int) -> float:
            t = time.perf_counter()
            self.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, **kw)
            return time.perf_counter() - t

        timed(4)  # warm-up: first-call allocations and kernel selection
        ttft = min(timed(1) for _ in range(repeats))
        full = min(timed(new_tokens) for _ in range(repeats))
        return {"ttft_s": ttft, "decode_tokens_per_s": batch * (new_tokens - 1) / max(full - ttft, 1e-9),
                "threads": torch.get_num_threads()}

    def num_parameters(self) -> int:
        return count_parameters(self.model)
