"""A GGUF file run by llama.cpp through `llama-cpp-python` (optional: ``pip install 'kdforge[llamacpp]'``).

llama-cpp-python has no binary wheel for this platform and builds llama.cpp from source on install
(~6-10 minutes on 2 cores; ``CMAKE_ARGS="-DGGML_NATIVE=ON"`` tunes it for the local CPU). Everything
here imports it lazily, so kdforge works without it.

A quantised file is scored, sampled and timed on the weights and kernels it ships with (llama.cpp's
CPU kernels also round activations to 8 bits, which transformers' GGUF loader, dequantising to fp32,
does not show). The Python binding's ``Llama`` object holds one sequence, so this runtime decodes one
sequence at a time (``max_batch = 1``). It opens up to three ``Llama`` contexts over the same
memory-mapped file, each when first needed:

- the decoder (``context`` tokens, last-position logits only): ``generate``;
- the scorer (logits at every position, ``n_ctx × V`` floats, sized to the longest sequence asked
  for): ``target_logits`` and ``sequence_logits``; ``release_scoring`` frees it;
- a vocabulary-only one: ``tokenize`` and ``vocab_rows``.
``decode_speed`` times a fresh context holding exactly the prompt and the new tokens.

Tokens are chosen by `kdforge.runtime.sampling.sample_token` on llama.cpp's logits (never by
llama.cpp's own sampler), as in every other runtime; text goes through the HF tokenizer read from
the same file (the export checks both tokenizers give the same ids).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge.config import ConfigError
from kdforge.models.forward import target_positions
from kdforge.models.loading import ModelLoadError, end_of_turn_ids, load_tokenizer, resolve_model
from kdforge.runtime.base import LLAMA_CPP, CausalLM, check_batch
from kdforge.runtime.sampling import SamplingParams, make_generator, sample_token

INSTALL_HINT = ("pip install 'kdforge[llamacpp]' (or llama-cpp-python; it compiles llama.cpp, several minutes; "
                "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" for this CPU)")
GENERATE_CONTEXT = 4096  # default decoder context: prompt + answer tokens one generation may hold
SCORE_CONTEXT_STEP = 256  # the scorer's context grows in these steps (its buffer is n_ctx × V floats)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def import_llama_cpp():
    """The llama_cpp module, or a ModelLoadError saying how to install it."""
    try:
        import llama_cpp

        llama_cpp.Llama  # noqa: B018  (a broken or stub install has no Llama)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"running GGUF files in llama.cpp needs llama-cpp-python: {INSTALL_HINT} ({e})") from e
    return llama_cpp


def load_llama(path: str | Path, n_ctx: int, threads: int | None = None, logits_all: bool = False,
               vocab_only: bool = False):
    """A ``llama_cpp.Llama`` over ``path``; ``n_ctx`` 0 means the model's training context, ``threads``
    None llama-cpp-python's default. ``logits_all`` keeps an (n_ctx, V) logit buffer (``Llama.scores``)."""
    llama_cpp = import_llama_cpp()
    kw: dict[str, Any] = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512) if n_ctx else 512,
                           logits_all=logits_all, vocab_only=vocab_only, seed=0, verbose=False, **kw)


def last_logits(llm) -> np.ndarray:
    """(V,) logits after the last evaluated token: a view of llama.cpp's buffer (copy before the next eval).

    llama-cpp-python >= 0.3 keeps no logits in ``Llama.scores`` unless logits_all=True (an (n_ctx, V)
    array: 1.6 GB for SmolLM2's 8k context), so the last row is read from the context itself.
    """
    llama_cpp = import_llama_cpp()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def gguf_parameters(path: str | Path) -> int:
    """Weights in a GGUF file: the element count of its tensors (read from the header, memory-mapped)."""
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def gguf_path(spec: str) -> Path:
    """The .gguf file a spec names, or a ModelLoadError."""
    src = resolve_model(spec)
    if not src.gguf_file:
        raise ModelLoadError(f"{src.display} is not a GGUF file; the llama.cpp backend reads .gguf files only")
    return src.folder / src.gguf_file


class LlamaCppRuntime(CausalLM):
    """One GGUF file in llama.cpp (CPU unless llama-cpp-python was built with a GPU backend)."""

    backend = LLAMA_CPP
    max_batch = 1

    def __init__(self, path: str | Path, threads: int | None = None, context: int | None = None,
                 tokenizer: Any = None, spec: str | None = None) -> None:
        self.path = Path(path)
        self.spec = spec or str(self.path)
        self.threads = threads or torch.get_num_threads()  # the cores torch would use (affinity, cgroups)
        self.context = GENERATE_CONTEXT if context is None else context
        self._tokenizer = tokenizer
        self._decoder = self._scorer = self._vocab = None
        self._vocab_rows: int | None = None

    @classmethod
    def load(cls, spec: str, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
             context: int | None = None, trust_remote_code: bool = False,
             placement: dict[str, Any] | None = None) -> LlamaCppRuntime:
        """Open a .gguf spec; ``device``/``dtype``/``trust_remote_code`` do not apply (llama.cpp runs the
        file's own types on the device it was built for), and a ``placement`` beyond the default is refused."""
        defaults = {"precision": "auto", "dtype": "auto", "device": "auto"}  # else None: not asked for
        asked = sorted(k for k, v in (placement or {}).items() if v != defaults.get(k))
        if asked:
            raise ConfigError(f"{spec}: {', '.join(asked)} need the transformers backend (llama.cpp runs the GGUF "
                              "file's own types on its own device); use backend transformers")
        import_llama_cpp()  # fail now, with the install hint, not at the first use
        return cls(gguf_path(spec), threads, context, spec=spec)

    # ---- llama.cpp contexts (tests replace _open and _read_last with fakes) ------------------
    def _open(self, n_ctx: int, logits_all: bool = False, vocab_only: bool = False):
        return load_llama(self.path, n_ctx, self.threads, logits_all=logits_all, vocab_only=vocab_only)

    def _read_last(self, llm) -> np.ndarray:
        return last_logits(llm)

    def _vocab_llm(self):
        if self._vocab is None:
            self._vocab = self._open(8, vocab_only=True)
        return self._vocab

    def _scorer_for(self, length: int):
        """The all-positions context, re-opened larger when a sequence does not fit."""
        if self._scorer is not None and int(self._scorer.n_ctx()) < length:
            self.release_scoring()
        if self._scorer is None:
            n_ctx = -(-max(length, 1) // SCORE_CONTEXT_STEP) * SCORE_CONTEXT_STEP
            self._scorer = self._open(n_ctx, logits_all=True)
        return self._scorer

    def _decoder_llm(self):
        if self._decoder is None:
            self._decoder = self._open(self.context)
        return self._decoder

    # ---- the interface -----------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:  # read from the file only when asked (slow for a large vocabulary)
            self._tokenizer = load_tokenizer(self.spec)
        return self._tokenizer

    @property
    def vocab_rows(self) -> int:  # type: ignore[override]
        if self._vocab_rows is None:
            self._vocab_rows = int(self._vocab_llm().n_vocab())
        return self._vocab_rows

    def stop_ids(self, tokenizer: Any = None) -> list[int]:
        return end_of_turn_ids(tokenizer or self.tokenizer)

    def _all_logits(self, ids: list[int]) -> np.ndarray:
        """(T, V) float32 logits at every position of ``ids``."""
        llm = self._scorer_for(len(ids))
        llm.reset()  # no KV prefix from the previous sequence
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    def target_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      vocab: int) -> torch.Tensor:
        # One unpadded conversation at a time: its real tokens, all-position logits, then the rows whose
        # next token is a target, in the order of the (B, T-1) target mask.
        mask = target_positions(labels.cpu())  # (B, T-1)
        rows = []
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].cpu().bool()  # (T,)
            logits = torch.from_numpy(self._all_logits(input_ids[b].cpu()[real].tolist()))[:, :vocab]  # (T_b, vocab)
            rank = torch.cumsum(real.long(), 0) - 1  # (T,) index of each real position among them
            wanted = mask[b].nonzero()[:, 0]  # positions p whose token p+1 is a target
            rows.append(logits[rank[wanted]])
        return torch.cat(rows)  # (N, vocab)

    def sequence_logits(self, ids: list[int]) -> torch.Tensor:
        return torch.from_numpy(self._all_logits(ids))  # (T, V)

    def tokenize(self, text: str) -> list[int]:
        # add_bos follows the file's tokenizer.ggml.add_bos_token, as an HF tokenizer follows its own flag.
        llm = self._vocab_llm()
        add_bos = str((llm.metadata or {}).get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def generate(self, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
                 generators: list[torch.Generator] | None = None, batch_size: int = 16,
                 vocab: int | None = None) -> list[list[int]]:
        if params.ignore_eos:
            raise ValueError("generate stops at stop_ids; ignore_eos is for the serve engines")
        if generators is not None and len(generators) != len(prompts):
            raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
        llm = self._decoder_llm()
        n_ctx = int(llm.n_ctx())
        if vocab is None:  # the tokenizer's length when it is loaded (reading it from the file is slow)
            vocab = min(len(self._tokenizer), self.vocab_rows) if self._tokenizer is not None else self.vocab_rows
        stops = set(stop_ids)
        out: list[list[int]] = []
        for i, prompt in enumerate(prompts):  # batch_size is moot: one sequence at a time
            if len(prompt) >= n_ctx:
                raise ValueError(f"a prompt of {len(prompt)} tokens does not fit the llama.cpp context ({n_ctx} "
                                 "tokens)")
            generator = generators[i] if generators is not None else make_generator(params.seed)
            llm.reset()
            llm.eval(prompt)
            answer: list[int] = []
            for _ in range(min(params.max_tokens, n_ctx - len(prompt))):
                logits = torch.from_numpy(np.array(self._read_last(llm)[:vocab], dtype=np.float32))  # (vocab,)
                token = sample_token(logits, params, generator)
                if token in stops:
                    break
                answer.append(token)
                llm.eval([token])
            out.append(answer)
        return out

    def decode_speed(self, prompt_ids: list[int], new_tokens: int, batch: int = 1,
                     repeats: int = 2) -> dict[str, Any]:
        check_batch(self, batch)
        llm = self._open(len(prompt_ids) + new_tokens + 8)  # a context of exactly this run's size

        def timed(n: int) -> tuple[float, float]:
            # generate() would reuse the KV cache of a previous call's matching prefix and evaluate only
            # the last prompt token: empty it, so that every run pays for the whole prompt.
            llm.reset()
            t0 = time.perf_counter()
            first = 0.0
            count = 0
            # generate() yields one token per step and never stops by itself (no EOS check), so exactly
            # n tokens are decoded, as with min_new_tokens in the transformers measurement.
            for _ in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                count += 1
                if count == 1:
                    first = time.perf_counter() - t0
                if count == n:
                    break
            return first, time.perf_counter() - t0

        try:
            timed(4)  # warm-up
            runs = [timed(new_tokens) for _ in range(repeats)]
        finally:
            _close(llm)
        ttft = min(r[0] for r in runs)
        best = min(runs, key=lambda r: r[1] - r[0])
        return {"ttft_s": ttft, "decode_tokens_per_s": (new_tokens - 1) / max(best[1] - best[0], 1e-9),
                "threads": self.threads}

    def num_parameters(self) -> int:
        return gguf_parameters(self.path)

    def release_scoring(self) -> None:
        _close(self._scorer)
        self._scorer = None

    def close(self) -> None:
        self.release_scoring()
        for llm in (self._decoder, self._vocab):
            _close(llm)
        self._decoder = self._vocab = None


def _close(llm) -> None:
    close = getattr(llm, "close", None)
    if close is not None:
        close()
