"""The serving engine for ONNX Runtime GenAI folders (``kdforge export --to onnx``; the ``onnx`` extra).

The model runs in ORT GenAI's ``Generator``, opened through `kdforge.runtime.onnx.OnnxRuntime` (the same
folder reading, session options and thread count every ONNX use in kdforge goes through): a request's
prompt is appended to a fresh generator, and every step's (vocab,) logits go through
:func:`kdforge.runtime.sampling.sample_token` (never ORT GenAI's own search), whose token is appended in
turn. So seeds, temperature, top-p, stop strings, log-probabilities and the streamed deltas mean what they
mean on the transformers and llama.cpp engines; the HF tokenizer in the folder renders the chat template
and detokenizes.

What it does not do, and why:

- **Batching**: one sequence at a time (``max_batch`` 1), first come, first served; concurrent requests
  queue and are answered in turn (their tokens/s do not add up as on the transformers engine). ORT GenAI
  0.18's Python ``Generator`` decodes a batch only of prompts given together at its start, with no way
  to add or drop a sequence between steps, which continuous batching needs.
- **KV reuse across requests**: every request prefills its whole prompt (a multi-turn chat re-reads the
  conversation). The folder's GroupQueryAttention shares one past/present buffer sized to the generator's
  ``max_length`` up front, so a generator kept for the whole context would hold that buffer for every
  request (the teacher: ~380 MB at 8192 tokens); each request's generator is sized to its prompt plus
  ``max_tokens``.
- Devices other than the CPU (the folder is built for the CPU execution provider).

Prompt log-probabilities (echo, ``prompt_logprobs``, lm-eval's loglikelihood requests) come from the plain
onnxruntime session over the same ``model.onnx`` with an empty KV cache
(`kdforge.runtime.onnx.OnnxRuntime.sequence_logits`), one prompt at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdforge.runtime.base import ONNX_GENAI
from kdforge.runtime.onnx import OnnxRuntime
from kdforge.runtime.sampling import sample_token
from kdforge.serve.engine import BaseEngine, Sequence, log
from kdforge.serve.scoring import PromptScores, scores_from_rows


class OnnxEngine(BaseEngine):
    backend = ONNX_GENAI

    def __init__(self, runtime: OnnxRuntime, eot_ids: list[int] | None = None, max_model_len: int | None = None,
                 max_tokens_cap: int | None = None):
        tok = runtime.tokenizer
        ctx = runtime.context
        super().__init__(tok, runtime.stop_ids(tok) if eot_ids is None else eot_ids, min(ctx, max_model_len or ctx),
                         max_batch=1, max_tokens_cap=max_tokens_cap)
        self.runtime = runtime
        self._vocab = min(len(tok), runtime.vocab_rows)
        self._current: Sequence | None = None
        self._gen: Any = None  # the current sequence's og.Generator

    @classmethod
    def from_folder(cls, spec: str, max_model_len: int | None = None, max_tokens_cap: int | None = None,
                    device: str = "auto", threads: int | None = None) -> OnnxEngine:
        """Open the folder (the CPU only: another ``device`` is refused) and its ORT GenAI model now, so a
        broken folder or install fails before the server listens."""
        runtime = OnnxRuntime.load(spec, device=device, threads=threads)
        runtime.genai_model()
        return cls(runtime, max_model_len=max_model_len, max_tokens_cap=max_tokens_cap)

    @property
    def num_active(self) -> int:
        return 1 if self._current is not None else 0

    def _logits(self) -> torch.Tensor:
        """(vocab,) fp32 logits after the last appended token (copied out of ORT GenAI's buffer)."""
        row = self.runtime.last_logits(self._gen)
        return torch.from_numpy(np.array(row[: self._vocab], dtype=np.float32))

    def _prefill(self, seq: Sequence) -> None:
        n = len(seq.prompt_ids)
        # The prompt, then at most max_tokens - 1 sampled tokens are appended (the last one ends the sequence).
        self._gen = self.runtime.new_generator(min(self.context_length, n + seq.params.max_tokens))
        self._gen.append_tokens(seq.prompt_ids)
        self.stats.prompt_tokens += n

    def _score(self, prompts: list[list[int]], top: int) -> list[PromptScores]:
        out = []
        for p in prompts:  # the scoring session reads one unpadded sequence per pass
            logits = self.runtime.sequence_logits(p)[:, : self._vocab]  # (L, vocab) fp32
            out += scores_from_rows([p], logits, top, self._vocab, lambda rows: rows)
        return out

    def _finish_current(self) -> None:
        self._current = None
        self._gen = None

    def _fail_all(self, message: str) -> None:
        if self._current is not None:
            self._current.finish("error", error=message)
            self._finish_current()
        super()._fail_all(message)

    def shutdown(self, timeout: float = 10.0) -> None:
        super().shutdown(timeout)
        self._gen = None
        self.runtime.close()

    def _step(self) -> None:
        self._drop_cancelled_waiting()
        seq = self._current
        if seq is not None and seq.handle.cancelled:
            self._cancelled(seq)
            self._finish_current()
            seq = None
        if seq is None:
            if not self._waiting:
                return
            seq = self._waiting.popleft()
            try:
                self._prefill(seq)
            except Exception as e:  # e.g. a prompt the generator refuses: fail this request only
                log.exception("prefill failed")
                self.stats.errors += 1
                seq.finish("error", error=f"{type(e).__name__}: {e}")
                self._gen = None
                return
        else:
            self._gen.append_tokens([seq.last_token])
            seq.position += 1
            self.stats.decode_steps += 1
            self.stats.batch_sizes[1] += 1
            self.stats.max_active = 1
        self._current = seq
        logits = self._logits()
        if seq.accept(sample_token(logits, seq.params, seq.generator), logits):
            self._done(seq)
            self._finish_current()
