"""An ONNX Runtime GenAI model folder as a runtime (optional: ``pip install 'kdforge[onnx]'``).

The folder is what ``kdforge export --to onnx`` writes (`kdforge.export.onnx`): the model builder's
``model.onnx`` (+ ``model.onnx.data``) and ``genai_config.json``, the source's HF tokenizer and
``config.json``, and ``kdforge.json`` (source, quantisation, parameter count). A spec is such a folder,
recognised by its ``genai_config.json``. Everything here imports onnxruntime(-genai) lazily, so kdforge
works without them.

- ``generate`` and ``decode_speed`` run ORT GenAI's ``Generator`` one sequence at a time
  (``max_batch = 1``): the prompt is appended, then each step's (vocab,) logits go through
  `kdforge.runtime.sampling.sample_token` (never ORT GenAI's own search) and the chosen token is
  appended, so equal logits give the answers every other runtime gives.
- ``target_logits`` / ``sequence_logits`` run plain ``onnxruntime`` on the same ``model.onnx`` with an
  empty KV cache (past length 0), which returns logits at every position; that session is opened when
  first needed and ``release_scoring`` frees it. One unpadded sequence per call.
- `kdforge serve` runs the same generator one request at a time (`kdforge.serve.onnx.OnnxEngine`).
- Not done: batched decoding (ORT GenAI batches only prompts of one length here), KV reuse across
  calls, devices other than the CPU (the folder is built for the CPU execution provider).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge.config import ConfigError
from kdforge.models.forward import target_positions
from kdforge.models.loading import ModelLoadError, end_of_turn_ids
from kdforge.runtime.base import ONNX_GENAI, CausalLM, check_batch
from kdforge.runtime.sampling import SamplingParams, make_generator, sample_token

INSTALL_HINT = "pip install 'kdforge[onnx]' (onnxruntime-genai, onnxruntime; binary wheels)"
GENAI_CONFIG = "genai_config.json"
KDFORGE_INFO = "kdforge.json"  # written by the export: source, quant, parameters


def onnx_genai_available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def is_onnx_folder(spec: str) -> bool:
    """True for a folder holding an ONNX Runtime GenAI model (its genai_config.json)."""
    if "://" in spec or spec.startswith("embedded:"):
        return False
    return (Path(spec).expanduser() / GENAI_CONFIG).is_file()


def import_genai():
    """The onnxruntime_genai module, or a ModelLoadError saying how to install it."""
    try:
        import onnxruntime_genai as og

        og.Model  # noqa: B018  (a broken install has no Model)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"running ONNX model folders needs onnxruntime-genai: {INSTALL_HINT} ({e})") from e
    return og


def decoder_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]


class OnnxRuntime(CausalLM):
    """One ONNX Runtime GenAI model folder on the CPU."""

    backend = ONNX_GENAI
    max_batch = 1

    def __init__(self, folder: str | Path, threads: int | None = None, tokenizer: Any = None) -> None:
        self.folder = Path(folder)
        self.threads = threads or torch.get_num_threads()
        self.config = decoder_config(self.folder)
        self.context = int(self.config.get("context_length") or 4096)
        self._tokenizer = tokenizer
        self._model = None  # og.Model, opened on first generate
        self._session = None  # onnxruntime.InferenceSession, opened on first scoring call

    @classmethod
    def load(cls, spec: str, *, device: str = "auto", dtype: str = "auto", threads: int | None = None,
             context: int | None = None, trust_remote_code: bool = False,
             placement: dict[str, Any] | None = None) -> OnnxRuntime:
        """Open an ONNX Runtime GenAI folder; ``dtype``/``context``/``trust_remote_code`` do not apply (the
        folder's own types and context), a device other than the CPU and a non-default placement are refused."""
        defaults = {"precision": "auto", "dtype": "auto", "device": "auto"}
        asked = sorted(k for k, v in (placement or {}).items() if v != defaults.get(k))
        if asked or device not in ("auto", "cpu"):
            raise ConfigError(f"{spec}: the ONNX runtime runs the folder's own types on the CPU; "
                              f"{', '.join(asked) or 'device ' + device} need the transformers backend")
        if not is_onnx_folder(spec):
            raise ModelLoadError(f"{spec} is no ONNX Runtime GenAI folder (no {GENAI_CONFIG})")
        import_genai()  # fail now, with the install hint
        return cls(Path(spec).expanduser(), threads)

    # ---- sessions ----------------------------------------------------------------------------
    def genai_model(self):
        """The og.Model, opened on first use (CPU execution provider, ``threads`` intra-op threads)."""
        if self._model is None:
            og = import_genai()
            cfg = og.Config(str(self.folder))
            cfg.clear_providers()  # the CPU execution provider
            # ORT GenAI's session threads (its default is every core), as llama.cpp's n_threads
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": self.threads}}}}))
            self._model = og.Model(cfg)
        return self._model

    def _scorer(self):
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.folder / self.config["decoder"]["filename"]), opts,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    # ---- the interface -----------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
        return self._tokenizer

    @property
    def vocab_rows(self) -> int:  # type: ignore[override]
        return int(self.config["vocab_size"])

    def stop_ids(self, tokenizer: Any = None) -> list[int]:
        ids = set(end_of_turn_ids(tokenizer or self.tokenizer))
        try:  # the export lists every end-of-turn id in generation_config.json, as HF folders do
            eos = json.loads((self.folder / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
            ids |= {eos} if isinstance(eos, int) else set(eos or [])
        except (OSError, ValueError):
            pass
        return sorted(ids)

    def sequence_logits(self, ids: list[int]) -> torch.Tensor:
        sess = self._scorer()
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([ids], dtype=np.int64),
                                        "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        dec = self.config["decoder"]
        for inp in sess.get_inputs():
            if inp.name.startswith("past_key_values"):  # (1, kv_heads, 0, head_size): an empty cache
                dtype = np.float16 if "float16" in inp.type else np.float32
                feeds[inp.name] = np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]), dtype=dtype)
        logits = sess.run(["logits"], feeds)[0][0]  # (T, V)
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def target_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      vocab: int) -> torch.Tensor:
        # One unpadded sequence at a time, then the rows whose next token is a target (as llama.cpp's).
        mask = target_positions(labels.cpu())  # (B, T-1)
        rows = []
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].cpu().bool()  # (T,)
            logits = self.sequence_logits(input_ids[b].cpu()[real].tolist())[:, :vocab]  # (T_b, vocab)
            rank = torch.cumsum(real.long(), 0) - 1
            rows.append(logits[rank[mask[b].nonzero()[:, 0]]])
        return torch.cat(rows)  # (N, vocab)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def new_generator(self, max_length: int):
        """A fresh og.Generator for one sequence of at most ``max_length`` tokens (prompt included; the
        folder's GroupQueryAttention allocates its KV buffer for all of them up front)."""
        og = import_genai()
        model = self.genai_model()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return og.Generator(model, params)

    @staticmethod
    def last_logits(gen) -> np.ndarray:
        return np.asarray(gen.get_logits())[0, -1]  # (V,) logits after the last appended token

    def generate(self, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
                 generators: list[torch.Generator] | None = None, batch_size: int = 16,
                 vocab: int | None = None) -> list[list[int]]:
        if params.ignore_eos:
            raise ValueError("generate stops at stop_ids; ignore_eos is for the serve engines")
        if generators is not None and len(generators) != len(prompts):
            raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
        if vocab is None:
            vocab = min(len(self.tokenizer), self.vocab_rows)
        stops = set(stop_ids)
        out: list[list[int]] = []
        for i, prompt in enumerate(prompts):  # one sequence at a time (max_batch 1)
            if len(prompt) >= self.context:
                raise ValueError(f"a prompt of {len(prompt)} tokens does not fit the ONNX model's context "
                                 f"({self.context} tokens)")
            generator = generators[i] if generators is not None else make_generator(params.seed)
            steps = min(params.max_tokens, self.context - len(prompt))
            gen = self.new_generator(len(prompt) + steps)
            gen.append_tokens(prompt)
            answer: list[int] = []
            for step in range(steps):
                logits = torch.from_numpy(np.array(self.last_logits(gen)[:vocab], dtype=np.float32))  # (vocab,)
                token = sample_token(logits, params, generator)
                if token in stops:
                    break
                answer.append(token)
                if step + 1 < steps:
                    gen.append_tokens([token])
            out.append(answer)
            del gen
        return out

    def decode_speed(self, prompt_ids: list[int], new_tokens: int, batch: int = 1,
                     repeats: int = 2) -> dict[str, Any]:
        check_batch(self, batch)

        def timed(n: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            gen = self.new_generator(len(prompt_ids) + n)
            gen.append_tokens(prompt_ids)
            token = int(self.last_logits(gen).argmax())
            first = time.perf_counter() - t0
            for _ in range(n - 1):
                gen.append_tokens([token])
                token = int(self.last_logits(gen).argmax())
            return first, time.perf_counter() - t0

        timed(4)  # warm-up
        runs = [timed(new_tokens) for _ in range(repeats)]
        ttft = min(r[0] for r in runs)
        best = min(runs, key=lambda r: r[1] - r[0])
        return {"ttft_s": ttft, "decode_tokens_per_s": (new_tokens - 1) / max(best[1] - best[0], 1e-9),
                "threads": self.threads}

    def num_parameters(self) -> int:
        info = self.folder / KDFORGE_INFO
        if info.is_file():
            n = json.loads(info.read_text(encoding="utf-8")).get("parameters")
            if n:
                return int(n)
        return onnx_parameters(self.folder / self.config["decoder"]["filename"])

    def release_scoring(self) -> None:
        self._session = None

    def close(self) -> None:
        self._session = None
        self._model = None


def onnx_parameters(path: str | Path) -> int:
    """Weights in an ONNX graph without kdforge.json: initializer elements, a MatMulNBits weight counted as
    its K × N (its scales and zero points not at all). A tied embedding written twice counts twice."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nbits: dict[str, int] = {}
    skip: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            nbits[node.input[1]] = attrs.get("K", 0) * attrs.get("N", 0)
            skip.update(node.input[2:])
    total = 0
    for init in model.graph.initializer:
        if init.name in nbits:
            total += nbits[init.name]
        elif init.name not in skip:
            total += int(np.prod(init.dims)) if len(init.dims) else 1
    return total
