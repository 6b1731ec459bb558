"""Run a GGUF file with llama.cpp through `llama-cpp-python` (optional: ``pip install 'kdforge[llamacpp]'``).

llama-cpp-python has no binary wheel for this platform and builds llama.cpp from source on install
(~6-10 minutes on 2 cores; ``CMAKE_ARGS="-DGGML_NATIVE=ON"`` tunes it for the local CPU). Everything
here imports it lazily, so kdforge works without it.

A small wrapper: tokenize, full logits of a sequence, and greedy batch-1 decode speed measured the
way `kdforge.eval.metrics.decode_speed` measures PyTorch models (time to first token, then decode
tokens/s after it, best of ``repeats``). Used by `benchmarks/quant_speed.py` and the export round trip.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.errors import UserError

INSTALL_HINT = ("pip install 'kdforge[llamacpp]' (or llama-cpp-python; it compiles llama.cpp, several minutes; "
                "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" for this CPU)")


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _import():
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError(f"running GGUF files needs llama-cpp-python: {INSTALL_HINT} ({e})") from e
    return llama_cpp


class LlamaCppModel:
    """One GGUF file loaded in llama.cpp (CPU unless llama-cpp-python was built with a GPU backend)."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, n_threads: int | None = None,
                 logits_all: bool = False, vocab_only: bool = False, seed: int = 0) -> None:
        llama_cpp = _import()
        self.path = Path(path)
        self.n_threads = n_threads or min(os.cpu_count() or 1, 16)
        self.llm = llama_cpp.Llama(
            model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=self.n_threads,
            n_threads_batch=self.n_threads, logits_all=logits_all, vocab_only=vocab_only, seed=seed, verbose=False,
        )
        meta = self.llm.metadata or {}
        self.add_bos = str(meta.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids as llama.cpp makes them; ``special`` parses ``<|im_start|>`` etc. as one token.
        ``add_bos=None`` follows the file's ``tokenizer.ggml.add_bos_token``."""
        bos = self.add_bos if add_bos is None else add_bos
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special))

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of ``ids``, (T, V) float32 (needs ``logits_all=True``)."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def decode_speed(self, prompt_ids: list[int], new_tokens: int, repeats: int = 2) -> dict[str, Any]:
        """Greedy batch-1 decoding: time to first token and decode tokens/s after it (best of ``repeats``)."""

        def timed(n: int) -> tuple[float, float]:
            # generate() would reuse the KV cache of a previous call's matching prefix and evaluate only
            # the last prompt token: empty it, so that every run pays for the whole prompt.
            self.llm.reset()
            t0 = time.perf_counter()
            first = 0.0
            count = 0
            # generate() yields one token per step and never stops by itself (no EOS check), so exactly
            # n tokens are decoded, as with min_new_tokens in the PyTorch measurement.
            for _ in self.llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                count += 1
                if count == 1:
                    first = time.perf_counter() - t0
                if count == n:
                    break
            return first, time.perf_counter() - t0

        timed(4)  # warm-up
        runs = [timed(new_tokens) for _ in range(repeats)]
        ttft = min(r[0] for r in runs)
        best = min(runs, key=lambda r: r[1] - r[0])
        return {"ttft_s": ttft, "decode_tokens_per_s": (new_tokens - 1) / max(best[1] - best[0], 1e-9),
                "threads": self.n_threads}

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
