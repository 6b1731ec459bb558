"""The serving engine for GGUF files in llama.cpp (``pip install llama-cpp-python``), imported only when used.

llama.cpp runs the forward passes on its quantized weights, loaded and read through
`kdforge.runtime.llamacpp` (the same loader and last-row logit reader every llama.cpp use in kdforge
goes through); everything else is shared with the transformers engine: the HF tokenizer read from
the same GGUF file renders the chat template and detokenizes, and sampling uses
:func:`kdforge.runtime.sampling.sample_token` on llama.cpp's logits, so seeds and parameters mean the
same on both backends. llama-cpp-python's high-level ``Llama`` object holds one sequence, so this
engine runs requests one at a time (first come, first served); it keeps the previous request's KV
cache and re-evaluates only the part of a new prompt that differs (a multi-turn chat re-reads only
the newest turn).

Prompt log-probabilities need logits at every position, which the decoding context does not keep (an
n_ctx x V buffer): they come from a second, scoring context over the same memory-mapped file
(`kdforge.runtime.llamacpp.LlamaCppRuntime.sequence_logits`, opened when first needed and sized to
the longest prompt), one prompt at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kdforge.models.loading import end_of_turn_ids, load_tokenizer
from kdforge.runtime.base import LLAMA_CPP
from kdforge.runtime.llamacpp import LlamaCppRuntime, gguf_path, import_llama_cpp, last_logits, load_llama
from kdforge.runtime.sampling import sample_token
from kdforge.serve.engine import BaseEngine, Sequence
from kdforge.serve.scoring import PromptScores, ScoringUnavailable, scores_from_rows


class LlamaCppEngine(BaseEngine):
    backend = LLAMA_CPP

    def __init__(self, llm, tokenizer, eot_ids: list[int], max_tokens_cap: int | None = None,
                 read_logits: Callable[[], np.ndarray] | None = None, scorer=None):
        """``scorer``: what computes all-position logits for prompt log-probabilities (an object with
        ``sequence_logits(ids) -> (T, V)`` fp32 CPU tensor and ``close()``); None: they are refused."""
        super().__init__(tokenizer, eot_ids, int(llm.n_ctx()), max_batch=1, max_tokens_cap=max_tokens_cap)
        self.llm = llm
        self._n_vocab = int(llm.n_vocab())
        self._vocab = min(len(tokenizer), self._n_vocab)
        self._read_logits = read_logits or self._llama_logits
        self._current: Sequence | None = None
        self._scorer = scorer

    @classmethod
    def from_gguf(cls, spec: str, max_model_len: int | None = None, max_tokens_cap: int | None = None,
                  n_threads: int | None = None) -> LlamaCppEngine:
        import_llama_cpp()  # the install hint before a missing file's error
        # n_ctx 0: the model's own context; n_threads None: llama-cpp-python's default.
        path = gguf_path(spec)
        llm = load_llama(path, n_ctx=max_model_len or 0, threads=n_threads)
        tok = load_tokenizer(spec)
        scorer = LlamaCppRuntime(path, threads=n_threads, tokenizer=tok, spec=spec)  # opens nothing until used
        return cls(llm, tok, end_of_turn_ids(tok), max_tokens_cap=max_tokens_cap, scorer=scorer)

    @property
    def num_active(self) -> int:
        return 1 if self._current is not None else 0

    def _llama_logits(self) -> np.ndarray:
        return last_logits(self.llm)  # (V,) view of llama.cpp's buffer

    def _logits(self) -> torch.Tensor:
        """(V,) fp32 logits after the last evaluated token (copied: llama.cpp reuses its buffer)."""
        row = np.asarray(self._read_logits(), dtype=np.float32)
        return torch.from_numpy(row[: self._vocab].copy())

    def _prefill(self, prompt: list[int]) -> None:
        # Reuse the cached prefix the new prompt shares with what llama.cpp holds; evaluate the rest
        # (at least the last prompt token, whose logits give the first answer token).
        held = list(self.llm.input_ids[: self.llm.n_tokens])
        common = 0
        for a, b in zip(held, prompt[:-1]):
            if a != b:
                break
            common += 1
        if common == 0:
            self.llm.reset()
        else:
            self.llm.n_tokens = common  # eval() drops the KV entries from here on before appending
        self.llm.eval(prompt[common:])
        self.stats.prompt_tokens += len(prompt) - common

    def _score(self, prompts: list[list[int]], top: int) -> list[PromptScores]:
        if self._scorer is None:
            raise ScoringUnavailable("this llama.cpp engine has no scoring context")
        out = []
        for p in prompts:  # the binding's Llama holds one sequence: one prompt per pass
            logits = self._scorer.sequence_logits(p)[:, : self._vocab]  # (L, V) fp32
            out += scores_from_rows([p], logits, top, self._vocab, lambda rows: rows)
        return out

    def shutdown(self, timeout: float = 10.0) -> None:
        super().shutdown(timeout)
        if self._scorer is not None:
            self._scorer.close()  # frees its n_ctx x V logit buffer

    def _fail_all(self, message: str) -> None:
        if self._current is not None:
            self._current.finish("error", error=message)
            self._current = None
        self.llm.reset()
        super()._fail_all(message)

    def _step(self) -> None:
        self._drop_cancelled_waiting()
        seq = self._current
        if seq is not None and seq.handle.cancelled:
            self._cancelled(seq)
            self._current = seq = None
        if seq is None:
            if not self._waiting:
                return
            seq = self._waiting.popleft()
            self._prefill(seq.prompt_ids)
        else:
            self.llm.eval([seq.last_token])
            seq.position += 1
            self.stats.decode_steps += 1
            self.stats.batch_sizes[1] += 1
            self.stats.max_active = 1
        self._current = seq
        logits = self._logits()
        if seq.accept(sample_token(logits, seq.params, seq.generator), logits):
            self._done(seq)
            self._current = None
