"""Weight quantisation in PyTorch: torchao int8/int4 (CPU and CUDA), bitsandbytes NF4/int8 (CUDA only).

Methods (``kdforge quantize --method``):

- ``int8``: torchao ``Int8WeightOnlyConfig``: every Linear weight int8 with one scale per output row;
  activations stay float. Halves-to-quarters the size; on CPU it is *slower* than fp32 at batch 1
  (torchao's int8 weight-only matmul has no fast CPU kernel; see docs/export-and-quantize.md).
- ``int8-dynamic``: torchao ``Int8DynamicActivationInt8WeightConfig``: int8 weights and activations
  quantised per token at run time.
- ``int4``: torchao ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``: int4
  values with a scale and zero point per 32 weights. This is the int4 config that runs on CPU with
  torchao 0.18; it stores each int4 value in one byte (``IntxUnpackedToInt8Tensor``), so the file is
  no smaller than int8. torchao's packed ``Int4WeightOnlyConfig`` needs CUDA and bf16 (tinygemm) or
  the ``mslk`` kernels; it is not offered here.
- ``int8-int4``: torchao ``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4)``: int4 group
  weights with int8 dynamic activations (the ExecuTorch/XNNPACK-style recipe); same storage as int4.
- ``nf4`` / ``bnb-int8``: bitsandbytes 4-bit NF4 (double quantisation, bf16 compute) and LLM.int8()
  8-bit loading. CUDA only: on a machine without a GPU they raise a clear error.

Embeddings and the (tied) output projection are not quantised by any method (transformers skips
``lm_head`` and torchao's Linear configs do not touch ``nn.Embedding``).

Saving: every torchao method saves with ``save_pretrained`` as safetensors (transformers flattens
torchao's tensor subclasses), with the ``quantization_config`` in ``config.json``; a plain
``AutoModelForCausalLM.from_pretrained(folder)`` reloads it (torchao must be installed). bitsandbytes
models save as safetensors too and reload only on CUDA.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kdforge.errors import UserError
from kdforge.export.formats import BNB_METHODS, METHODS, TORCHAO_METHODS
from kdforge.quiet import quiet_torchao


class QuantizeError(UserError):
    """A quantisation method cannot run here (missing package, no CUDA, unsupported model)."""


def torchao_config(method: str, group_size: int = 32):
    """The torchao config object for ``method`` (see the module docstring)."""
    quiet_torchao()
    try:
        from torchao import quantization as q
        from torchao.quantization.granularity import PerGroup
    except ImportError as e:
        raise QuantizeError(f"--method {method} needs torchao: pip install torchao ({e})") from e
    if method == "int8":
        return q.Int8WeightOnlyConfig()
    if method == "int8-dynamic":
        return q.Int8DynamicActivationInt8WeightConfig()
    if method == "int4":
        return q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    if method == "int8-int4":
        return q.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                       weight_granularity=PerGroup(group_size))
    raise QuantizeError(f"unknown torchao method {method!r}; choose from {', '.join(TORCHAO_METHODS)}")


def quantization_config(method: str, group_size: int = 32):
    """A transformers ``quantization_config`` for ``from_pretrained``."""
    if method in TORCHAO_METHODS:
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=torchao_config(method, group_size))
    if method in BNB_METHODS:
        if not torch.cuda.is_available():
            raise QuantizeError(
                f"--method {method} is bitsandbytes loading, which needs a CUDA GPU; this machine has none. "
                "On CPU use --method int8 or int4 (torchao), or `kdforge export --to gguf` for llama.cpp"
            )
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise QuantizeError(f"--method {method} needs bitsandbytes: pip install bitsandbytes ({e})") from e
        if method == "nf4":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
        return BitsAndBytesConfig(load_in_8bit=True)
    raise QuantizeError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@contextmanager
def _hf_folder(spec: str):
    """An HF folder for ``spec``: itself, the embedded teacher's cache, or a GGUF file converted to a
    temporary folder (transformers cannot combine ``gguf_file`` with a quantization_config)."""
    from kdforge.models.loading import load_model, resolve_model

    src = resolve_model(spec)
    if not src.gguf_file:
        yield src.folder
        return
    model, tok = load_model(spec, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory(prefix="kdforge-quant-src-") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        yield Path(tmp)


def load_quantized(spec: str, method: str, group_size: int = 32, device: str = "auto",
                   trust_remote_code: bool = False):
    """Load ``spec`` with ``method`` applied: (model, tokenizer). fp32 on CPU (no bf16 hardware here),
    bf16 on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.models.loading import pick_device, pick_dtype

    qconfig = quantization_config(method, group_size)
    dev = pick_device(device)
    if method in BNB_METHODS:
        dev = torch.device("cuda")
    dtype = pick_dtype("auto", dev)
    if method == "bnb-int8":
        # LLM.int8's kernels take fp16 inputs: with bf16 activations bitsandbytes casts (and warns) at every matmul.
        dtype = torch.float16
    with _hf_folder(spec) as folder:
        kwargs: dict[str, Any] = {"device_map": {"": str(dev)}} if dev.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qconfig, dtype=dtype,
                                                     trust_remote_code=trust_remote_code, **kwargs)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if dev.type != "cuda":
        model.to(dev)
    return model.eval(), tok


def save_quantized(model, tokenizer, folder: str | Path) -> None:
    """safetensors + config.json with the quantization_config; reload with `reload_quantized`."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def reload_quantized(folder: str | Path, device: str = "auto"):
    """Load a folder written by `save_quantized` (torchao needs to be installed; bnb needs CUDA)."""
    from transformers import AutoModelForCausalLM

    from kdforge.models.loading import pick_device

    quiet_torchao()
    dev = pick_device(device)
    kwargs: dict[str, Any] = {"device_map": {"": str(dev)}} if dev.type == "cuda" else {}
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def folder_bytes(folder: str | Path, pattern: str = "*.safetensors") -> int:
    """Bytes of the weight files in a folder (what a quantised model costs on disk)."""
    return sum(p.stat().st_size for p in Path(folder).glob(pattern))
