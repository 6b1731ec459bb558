"""The causal-LM interface every stage and component talks to, whatever runs the model.

A runtime is one loaded model with the operations kdforge needs from it: logits at the positions a
metric needs (agreement, round trips), generation through the one sampler
(:mod:`kdforge.runtime.sampling`), a decode-speed measurement, its size, and close. Callers never
ask which backend it is; what differs between backends is declared as data (``max_batch``,
``hf_model``) so a caller can check a capability without comparing names.

Shapes: B sequences per batch, T tokens per sequence, V logit columns (``vocab_rows``; the caller
cuts them to the tokenizer's length ``vocab``), N target positions in a batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from kdforge.runtime.sampling import SamplingParams

# The backends' names: what reports show and configs choose. Compare capabilities, not these.
TRANSFORMERS = "transformers"
LLAMA_CPP = "llama.cpp"
SERVED = "served"  # a model behind a vLLM-compatible server (runtime/served.py)
ONNX_GENAI = "onnxruntime-genai"  # an ONNX Runtime GenAI model folder (runtime/onnx.py)


class CausalLM(ABC):
    """One causal language model behind kdforge's operations. Use as a context manager to close it."""

    backend: ClassVar[str]  # the runtime's name, as reports show it ("transformers", ...)
    # Sequences one forward pass may hold in `generate` / `decode_speed` (None: no limit). llama.cpp's
    # Python binding holds one sequence.
    max_batch: ClassVar[int | None] = None
    # True when the runtime holds a transformers module (``.model``) that HF-only tools can take
    # (lm-evaluation-harness); those tools refuse the other runtimes before loading them.
    hf_model: ClassVar[bool] = False

    vocab_rows: int  # logit columns the model computes (embedding matrices may be padded past the tokenizer)
    threads: int | None = None  # CPU threads the runtime computes with (None: torch's default)

    @classmethod
    @abstractmethod
    def load(cls, spec: str, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
             context: int | None = None, trust_remote_code: bool = False,
             placement: dict[str, Any] | None = None) -> CausalLM:
        """Load a model spec. Every runtime takes every option and ignores those that do not apply
        (transformers: device, dtype, trust_remote_code; llama.cpp: threads, context). ``placement``:
        `kdforge.models.loading.load_model`'s precision / device_map / max_memory / offload_folder; a
        runtime that cannot place a model refuses one that asks for more than the default."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The HF tokenizer that goes with the model (renders chat templates, decodes answers)."""

    @abstractmethod
    def stop_ids(self, tokenizer: Any = None) -> list[int]:
        """Token ids that end an assistant turn for ``tokenizer`` (default: the runtime's own)."""

    @abstractmethod
    def target_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      vocab: int) -> torch.Tensor:
        """(N, vocab) fp32-or-model-dtype logits at the positions whose next token is a target.

        ``input_ids``, ``attention_mask``, ``labels``: a right-padded (B, T) batch (on any device). Row n
        belongs to the n-th True of the (B, T-1) mask ``labels[:, 1:] != IGNORE_INDEX`` in row-major
        order, exactly what `kdforge.models.forward.target_logits` returns, so rows of different
        runtimes line up. The result lies on the runtime's device.
        """

    def topk_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      vocab: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely next tokens at the target positions: log-probabilities (N, k) fp32 and
        token ids (N, k), rows ordered as in :meth:`target_logits`."""
        logp = torch.log_softmax(self.target_logits(input_ids, attention_mask, labels, vocab).float(), dim=-1)
        values, ids = logp.topk(k, dim=-1)  # (N, k), (N, k)
        return values, ids

    @abstractmethod
    def sequence_logits(self, ids: list[int]) -> torch.Tensor:
        """(T, V) fp32 CPU logits at every position of one unpadded sequence (round-trip checks)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as the runtime's own tokenizer makes them (special tokens parsed,
        BOS as the model's tokenizer adds it). llama.cpp tokenizes itself; the export checks it agrees."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
                 generators: list[torch.Generator] | None = None, batch_size: int = 16,
                 vocab: int | None = None) -> list[list[int]]:
        """Answer ids per prompt, without the stop token: at most ``params.max_tokens`` each, ended by
        the first token in ``stop_ids`` (unless ``params.ignore_eos``).

        Every token is chosen by `kdforge.runtime.sampling.sample_token` on the (vocab,) logits of
        that sequence with ``generators[i]`` (greedy when ``params.greedy``; None: one generator per
        prompt from ``params.seed``), so equal logits and seeds give equal answers on every backend.
        ``vocab``: sample among the first ``vocab`` logit columns only (the caller's tokenizer length;
        default: the runtime tokenizer's, when loaded), never the rows an embedding is padded with.
        ``batch_size``: consecutive prompts decoded together (batch composition can move greedy answers
        by float noise, so callers that compare with another tool fix it). ``params.stop`` strings are
        the serve engine's business (they need the detokenizer) and are not applied here.
        """

    @abstractmethod
    def decode_speed(self, prompt_ids: list[int], new_tokens: int, batch: int = 1,
                     repeats: int = 2) -> dict[str, Any]:
        """Greedy decoding of ``batch`` copies of one prompt, exactly ``new_tokens`` tokens each:
        ``{"ttft_s", "decode_tokens_per_s", "threads"}``, best of ``repeats`` after a warm-up.

        ``ttft_s``: prefill plus one step; ``decode_tokens_per_s``: batch × (n − 1) / (t(n) − t(1)).
        ``batch`` above ``max_batch`` raises ValueError.
        """

    @abstractmethod
    def num_parameters(self) -> int:
        """Weights in the model (a tied embedding and output projection count once)."""

    def release_scoring(self) -> None:
        """Free what only :meth:`target_logits` / :meth:`sequence_logits` needed (llama.cpp keeps a
        context × vocab logit buffer for them); later calls re-create it. A no-op where nothing is held."""
        return None

    def close(self) -> None:
        """Free the model; the runtime is unusable afterwards (the default drops nothing: a wrapped
        module belongs to its caller)."""
        return None

    def __enter__(self) -> CausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_batch(runtime: CausalLM, batch: int) -> None:
    """Raise ValueError when ``batch`` sequences do not fit the runtime's ``max_batch``."""
    if runtime.max_batch is not None and batch > runtime.max_batch:
        raise ValueError(f"the {runtime.backend} runtime decodes at most {runtime.max_batch} sequence(s) at once, "
                         f"not {batch}")
