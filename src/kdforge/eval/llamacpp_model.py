"""A GGUF student run by llama.cpp inside `kdforge eval` (``backend: llama.cpp``; needs llama-cpp-python).

Eval treats a model as an HF causal LM: forward passes for the agreement measures, ``generate``
for the task set and the stability probe, a parameter count, a speed run in its own process. This
adapter gives the same from llama.cpp, so a quantised file is scored and timed on the weights and
kernels it ships with (llama.cpp's CPU kernels also round activations to 8 bits, which
transformers' GGUF loader, dequantising to fp32, does not show). The Python binding holds one
sequence, so everything runs one conversation at a time; text goes through the HF tokenizer read
from the same file, as in the serve stage's llama.cpp engine (the export checks both tokenizers give
the same ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdforge.config import ConfigError
from kdforge.export.llamacpp import INSTALL_HINT, LlamaCppModel, llama_cpp_available
from kdforge.models.forward import target_positions
from kdforge.models.loading import ModelLoadError, is_gguf_file, resolve_model

BACKENDS = ("auto", "transformers", "llama.cpp")
GENERATE_CONTEXT = 4096  # prompt + answer tokens a generation may hold


def backend_for(spec: str, backend: str) -> str:
    """The runtime a student runs on: llama.cpp only for GGUF files (``auto``: when it is installed, as
    the serve stage chooses)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if not is_gguf_file(spec) or backend == "transformers":
        return "transformers"
    installed = llama_cpp_available()
    if backend == "llama.cpp" and not installed:
        raise ConfigError(f"backend llama.cpp for {spec} needs llama-cpp-python: {INSTALL_HINT}, "
                          "or use backend transformers")
    return "llama.cpp" if installed else "transformers"


def gguf_parameters(path: str | Path) -> int:
    """Weights in a GGUF file: the element count of its tensors (read from the header, memory-mapped)."""
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


class LlamaCppLM:
    """One GGUF file in llama.cpp with the methods eval calls on a model."""

    backend = "llama.cpp"

    def __init__(self, spec: str, score_context: int, threads: int | None = None) -> None:
        src = resolve_model(spec)
        if not src.gguf_file:
            raise ModelLoadError(f"{src.display} is not a GGUF file; the llama.cpp backend reads .gguf files only")
        self.path = src.folder / src.gguf_file
        self.threads = threads or torch.get_num_threads()  # the cores torch would use (affinity, cgroups)
        self.score_context = score_context
        self._scorer = None  # logits at every position (agreement): n_ctx × V floats, freed after use
        self._generator = None  # last-position logits only (tasks, stability)
        vocab_only = LlamaCppModel(self.path, n_ctx=8, vocab_only=True)
        self.vocab_rows = vocab_only.llm.n_vocab()
        vocab_only.close()

    def _model(self, logits_all: bool):
        if logits_all and self._scorer is None:
            self._scorer = LlamaCppModel(self.path, n_ctx=self.score_context, n_threads=self.threads, logits_all=True)
        if not logits_all and self._generator is None:
            self._generator = LlamaCppModel(self.path, n_ctx=GENERATE_CONTEXT, n_threads=self.threads)
        return self._scorer if logits_all else self._generator

    def num_parameters(self) -> int:
        return gguf_parameters(self.path)

    def target_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      vocab: int) -> torch.Tensor:
        """(N, vocab) logits at the positions whose next token is a target, in the row-major order of
        the (B, T-1) target mask, as `kdforge.models.forward.target_logits` returns them."""
        scorer = self._model(logits_all=True)
        mask = target_positions(labels.cpu())  # (B, T-1)
        rows = []
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].cpu().bool()  # (T,)
            ids = input_ids[b].cpu()[real].tolist()
            if len(ids) > self.score_context:
                raise ValueError(f"a conversation of {len(ids)} tokens exceeds the llama.cpp context "
                                 f"{self.score_context}")
            logits = torch.from_numpy(scorer.logits(ids))[:, :vocab]  # (T_b, vocab) at the real positions
            rank = torch.cumsum(real.long(), 0) - 1  # (T,) index of each real position among them
            wanted = mask[b].nonzero()[:, 0]  # positions p whose token p+1 is a target
            rows.append(logits[rank[wanted]])
        return torch.cat(rows)

    def release_scorer(self) -> None:
        """Free the all-positions logit buffer once the agreement pass is done."""
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int], vocab: int,
                     temperature: float | None = None, top_p: float = 1.0,
                     generator: torch.Generator | None = None) -> list[int]:
        """Answer token ids (without the stop token): greedy, or sampled at ``temperature`` / ``top_p``
        with ``generator`` (the serve stage's sampler, so seeds mean the same as there)."""
        from kdforge.serve.sampling import SamplingParams, sample_token

        llm = self._model(logits_all=False).llm
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature or 1.0, top_p=top_p)
        if len(prompt_ids) >= GENERATE_CONTEXT:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens does not fit the llama.cpp generation context "
                             f"({GENERATE_CONTEXT} tokens)")
        budget = min(max_new_tokens, GENERATE_CONTEXT - len(prompt_ids))
        llm.reset()
        llm.eval(prompt_ids)
        out: list[int] = []
        for _ in range(budget):
            logits = torch.from_numpy(np.array(self._last_logits(llm)[:vocab], dtype=np.float32))  # (vocab,)
            if temperature is None:
                token = int(logits.argmax())
            else:
                token = sample_token(logits, params, generator)
            if token in stop_ids:
                break
            out.append(token)
            llm.eval([token])
        return out

    @staticmethod
    def _last_logits(llm) -> np.ndarray:
        """(V,) logits after the last evaluated token, a view of llama.cpp's buffer (copy before the next
        eval). Without logits_all, llama-cpp-python keeps none in ``Llama.scores``."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))

    def close(self) -> None:
        self.release_scorer()
        if self._generator is not None:
            self._generator.close()
            self._generator = None
