"""vLLM-loadable quantised checkpoints: compressed-tensors HF folders written by the vLLM project's llmcompressor.

One folder per scheme (``vllm-<scheme>/`` in the export folder), each an ordinary HF folder (config.json with a
``quantization_config`` of ``quant_method: compressed-tensors``, safetensors, the source's tokenizer and chat
template, every end-of-turn id in generation_config.json) that ``vllm serve FOLDER`` and
``AutoModelForCausalLM.from_pretrained(FOLDER)`` (with the compressed-tensors package) both read:

- ``w4a16``: int4 weights, symmetric, one scale per group of ``group_size`` input weights (128, or the largest of
  64/32 that divides every quantised Linear's input size), fp16/bf16 activations; rounded by GPTQ (default) or
  AWQ on calibration text; the ``pack-quantized`` format (vLLM's Marlin/Machete kernels).
- ``w8a8``: int8 weights, one scale per output channel, GPTQ-rounded; int8 activations, one dynamic scale per
  token (nothing stored); the ``int-quantized`` format (vLLM's CUTLASS int8 kernels).
- ``fp8``: FP8 E4M3 weights, one scale per output channel, rounded to nearest; FP8 activations, dynamic per
  token: llmcompressor's FP8_DYNAMIC, no calibration; the ``float-quantized`` format.

Every Linear of the decoder is quantised; the embedding and the output projection (``lm_head``, tied or not)
are not, as vLLM expects. Calibration text is what the GGUF export's calibrated rounding uses
(`kdforge.export.calibration.calibration_ids`): the model's own greedy answers to the bundled training prompts
by default. Round trip: the folder loaded back by transformers (compressed-tensors decompresses the weights and
fake-quantises the activations as the scheme says, so the W8A8/FP8 figures include the activation rounding
vLLM does) against the source on the export's validation texts (`kdforge.export.roundtrip`).

llmcompressor pins transformers tightly (0.14.0.1: transformers 5.15-5.17), hence an optional extra of its own
(``kdforge[vllm]``); this module imports it only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from kdforge.artifacts import atomic_dir, atomic_write_json
from kdforge.config import ConfigError

VLLM_SCHEMES = ("w4a16", "w8a8", "fp8")
W4A16_METHODS = ("gptq", "awq")
GROUP_SIZES = (128, 64, 32)  # what vLLM's int4 kernels take; 128 is llmcompressor's W4A16 default
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")  # tested; llmcompressor knows more
# compressed-tensors' preset for each scheme (compressed_tensors.quantization.quant_scheme.PRESET_SCHEMES)
PRESETS = {"w4a16": "W4A16", "w8a8": "W8A8", "fp8": "FP8_DYNAMIC"}
FORMATS = {"w4a16": "pack-quantized", "w8a8": "int-quantized", "fp8": "float-quantized"}
PACKAGES = {"llmcompressor": "llmcompressor", "compressed_tensors": "compressed-tensors", "datasets": "datasets"}
INSTALL_HINT = ("pip install 'kdforge[vllm]' (llmcompressor 0.14.0.1, compressed-tensors 0.19.0; they pin "
                "transformers to 5.15-5.17: use a separate environment, see docs/export-and-quantize.md)")
# Judged on the source's answers (problems in report.json, the folder is written either way), to catch a broken
# folder, not to grade a good one: the embedded teacher measured top-1 0.923 (W8A8: the int8 per-token activations
# cost most of it; weights alone 0.989) and 0.936 (FP8) (docs/export-and-quantize.md). W4A16 is reported only:
# 4-bit agreement depends on the model (0.813 there).
TOP1_EXPECTED = {"w8a8": 0.88, "fp8": 0.88}
INFO_NAME = "kdforge.json"


def missing_packages() -> list[str]:
    """The extra's packages that are not importable here (pip names)."""
    return [pip for module, pip in PACKAGES.items() if importlib.util.find_spec(module) is None]


def check_installed() -> None:
    """A one-line ConfigError naming what to install when the vllm extra is missing."""
    missing = missing_packages()
    if missing:
        raise ConfigError(f"vLLM export needs {', '.join(missing)}: {INSTALL_HINT}")


def check_supported(model) -> str:
    """The model's class name, or a ConfigError when the vLLM export is not tested on it."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"vLLM export supports {', '.join(SUPPORTED_ARCHITECTURES)} (the tested architectures); "
                          f"this model is {name} (model_type={getattr(model.config, 'model_type', None)!r})")
    return name


def quantised_linears(model) -> dict[str, tuple[int, int]]:
    """Name -> (out_features, in_features) of every Linear the export quantises (all but the output projection)."""
    import torch

    head = model.get_output_embeddings()
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head}


def pick_group_size(model, requested: int | None = None) -> int:
    """W4A16's group size: ``requested``, or the largest of 128/64/32 dividing every quantised Linear's input size
    (vLLM's int4 kernels need whole groups). A ConfigError names the first Linear that does not divide."""
    sizes = quantised_linears(model)
    for g in ((requested,) if requested else GROUP_SIZES):
        bad = [(n, s) for n, s in sizes.items() if s[1] % g]
        if not bad:
            return g
    n, (_, cols) = bad[0]
    raise ConfigError(f"W4A16 groups of {g} weights do not divide {n}'s input size {cols}"
                      + (f"; choose a group_size from {', '.join(map(str, GROUP_SIZES))} that divides it"
                         if requested else f" (tried {', '.join(map(str, GROUP_SIZES))})"))


def needs_calibration(schemes: list[str], calibration: str) -> bool:
    """Whether any scheme rounds on calibration text (W4A16, W8A8; FP8 dynamic never does)."""
    return calibration != "none" and any(s in ("w4a16", "w8a8") for s in schemes)


def quant_scheme(scheme: str, group_size: int):
    """compressed-tensors' preset for ``scheme`` on every Linear, W4A16's group size set."""
    from compressed_tensors.quantization import preset_name_to_scheme

    s = preset_name_to_scheme(PRESETS[scheme], ["Linear"])
    if scheme == "w4a16":
        s.weights = s.weights.model_copy(update={"group_size": group_size})
    return s


def recipe(scheme: str, method: str = "gptq", calibrated: bool = True, group_size: int = 128) -> list:
    """llmcompressor modifiers for one scheme. GPTQ (act order, 1% damping: llmcompressor's defaults) rounds
    W4A16/W8A8 on the calibration text; AWQ scales W4A16's input channels first, then rounds to nearest; FP8
    dynamic and ``calibrated=False`` round to nearest on the min-max scale."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = {"group_0": quant_scheme(scheme, group_size)}
    ignore = ["lm_head"]  # vLLM keeps the output projection (and the embedding) unquantised
    if scheme == "fp8" or not calibrated:
        return [QuantizationModifier(config_groups=groups, ignore=ignore)]
    if scheme == "w4a16" and method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=ignore)]
    return [GPTQModifier(config_groups=groups, ignore=ignore)]


def source_folder(model, tokenizer, spec: str, scratch: Path) -> Path:
    """An HF folder with the source's weights for llmcompressor to load: the spec's own folder when it is one
    with safetensors, else the loaded model saved (a GGUF file or the embedded teacher, dequantised)."""
    from kdforge.models.loading import hf_folder_of

    return hf_folder_of(model, tokenizer, spec, scratch)


def versions() -> dict[str, str | None]:
    """The versions that wrote (and read back) a folder."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pip in ("llmcompressor", "compressed-tensors", "transformers", "torch"):
        try:
            out[pip] = version(pip)
        except PackageNotFoundError:
            out[pip] = None
    return out


def _quiet() -> None:
    # llmcompressor logs every layer at INFO, and GPTQ's per-layer error at its METRIC level (38, above WARNING),
    # on stdout; the stage prints its own one line per folder. (Its tqdm bars still go to stderr.)
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def _no_pinning_without_accelerator():
    """llmcompressor 0.14.0.1's AWQ pins its cached activations (``IntermediatesCache.pin_memory``) before each
    smoothing grid search, for faster host-to-device copies; ``Tensor.pin_memory`` raises "Cannot access
    accelerator device when none is available" on a CPU-only machine. Pinning changes no value: skip it there."""
    import torch

    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def compress(folder: str | Path, tokenizer, out: Path, scheme: str, method: str, group_size: int,
             calibration_ids: list[list[int]] | None) -> dict[str, Any]:
    """Load the fp32 model in ``folder``, quantise it with llmcompressor's ``oneshot`` and save the
    compressed-tensors checkpoint into ``out`` (an existing, empty folder). Returns what was done."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet()
    from llmcompressor import oneshot

    calibrated = calibration_ids is not None and scheme != "fp8"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    kwargs: dict[str, Any] = {}
    if calibrated:
        from datasets import Dataset

        # Pre-tokenised rows (llmcompressor skips its own tokenisation for an input_ids column), one
        # conversation a batch: no padding enters the statistics.
        data = Dataset.from_dict({"input_ids": calibration_ids,
                                  "attention_mask": [[1] * len(ids) for ids in calibration_ids]})
        kwargs = {"dataset": data, "num_calibration_samples": len(calibration_ids),
                  "max_seq_length": max(map(len, calibration_ids)), "shuffle_calibration_samples": False}
    t0 = time.time()
    modifiers = recipe(scheme, method, calibrated, group_size)
    with _no_pinning_without_accelerator():
        model = oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, **kwargs)
    seconds = round(time.time() - t0, 2)
    model.save_pretrained(out, save_compressed=True)  # llmcompressor's wrapper: compressed-tensors format
    tokenizer.save_pretrained(out)
    from kdforge.models.model_card import complete_model_folder

    complete_model_folder(out, tokenizer, model)  # chat template in both places, every end-of-turn id
    del model
    rounding = ("awq" if method == "awq" else "gptq") if calibrated else "nearest"
    return {"rounding": rounding, "seconds": seconds,
            "modifiers": [type(m).__name__ for m in modifiers]}


def folder_bytes(folder: Path) -> int:
    """Bytes of the weights (safetensors files), as kdforge counts an HF folder's size."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def read_quantization_config(folder: Path) -> dict[str, Any]:
    """The folder's ``quantization_config`` (what vLLM reads to pick its kernels), in brief."""
    qc = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    groups = qc.get("config_groups") or {}
    g = next(iter(groups.values()), {})
    w, a = g.get("weights") or {}, g.get("input_activations") or {}
    return {"quant_method": qc.get("quant_method"), "format": qc.get("format"), "ignore": qc.get("ignore"),
            "weights": {k: w.get(k) for k in ("num_bits", "type", "strategy", "group_size", "symmetric")},
            "input_activations": ({k: a.get(k) for k in ("num_bits", "type", "strategy", "dynamic")} if a else None)}


def vllm_roundtrip(source, tokenizer, folder: Path, sets: dict, ref: dict) -> dict[str, Any]:
    """The folder read back by transformers (compressed-tensors) against ``source``: logits on the validation
    texts (`kdforge.export.roundtrip.model_report`) and the folder's tokenizer ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.export.roundtrip import compare_ids, model_report, tokenizer_texts

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    schemes = sum(1 for m in reloaded.modules() if getattr(m, "quantization_scheme", None) is not None)
    report: dict[str, Any] = {"validation_sequences": {k: len(v) for k, v in sets.items()},
                              "quantized_modules": schemes,
                              "transformers": model_report(source, reloaded, sets, len(tokenizer), ref)}
    del reloaded
    texts = tokenizer_texts(tokenizer)
    back = AutoTokenizer.from_pretrained(folder)
    report["tokenizer"] = compare_ids([tokenizer(t)["input_ids"] for t in texts], [back(t)["input_ids"] for t in texts])
    return report


def export_vllm(model, tokenizer, spec: str, out: str | Path, scheme: str, source: str | Path,
                calibration_ids: list[list[int]] | None = None, sets: dict | None = None, ref: dict | None = None,
                method: str = "gptq", group_size: int | None = None) -> dict[str, Any]:
    """Write the compressed-tensors folder ``out`` for ``model`` (loaded in fp32; ``source``: an HF folder of the
    same weights, `source_folder`) at ``scheme``, atomically: a failure leaves no folder. Round-trips it when
    ``sets``/``ref`` (validation texts and the source's logits) are given. Returns the summary: bytes, rounding,
    quantization_config, round trip."""
    check_installed()
    if scheme not in VLLM_SCHEMES:
        raise ConfigError(f"vLLM export schemes are {', '.join(VLLM_SCHEMES)}, not {scheme!r}")
    if method not in W4A16_METHODS:
        raise ConfigError(f"W4A16 rounding methods are {', '.join(W4A16_METHODS)}, not {method!r}")
    check_supported(model)
    group = pick_group_size(model, group_size) if scheme == "w4a16" else None
    out = Path(out)
    with atomic_dir(out) as tmp:
        t0 = time.time()
        done = compress(source, tokenizer, tmp, scheme, method, group or 128, calibration_ids)
        summary: dict[str, Any] = {"scheme": scheme, **done, "write_seconds": round(time.time() - t0, 2),
                                   "group_size": group, "quantization_config": read_quantization_config(tmp)}
        if sets is not None and ref is not None:
            t0 = time.time()
            summary["roundtrip"] = vllm_roundtrip(model, tokenizer, tmp, sets, ref)
            summary["roundtrip_seconds"] = round(time.time() - t0, 2)
        summary["bytes"] = folder_bytes(tmp)
        info = {"source": spec, "scheme": scheme, "rounding": done["rounding"], "group_size": group,
                "format": FORMATS[scheme], "versions": versions()}
        if "roundtrip" in summary:
            info["roundtrip"] = metrics(summary["roundtrip"])
        atomic_write_json(tmp / INFO_NAME, info)
    return summary


def calibration_text(model, tokenizer, spec: str, samples: int) -> tuple[list[list[int]], dict[str, Any]]:
    """Token ids of the calibration conversations (the GGUF export's: `calibration_ids`) and a summary."""
    from kdforge.export.calibration import calibration_ids

    t0 = time.time()
    ids = calibration_ids(model, tokenizer, spec, samples)
    return ids, {"source": spec, "conversations": len(ids), "tokens": sum(map(len, ids)),
                 "seconds": round(time.time() - t0, 1)}


def scratch_dir():
    """A temporary folder for the source's HF copy (removed afterwards)."""
    return tempfile.TemporaryDirectory(prefix="kdforge-vllm-")


def judge(scheme: str, rt: dict[str, Any]) -> list[str]:
    """Problems a round trip shows, as sentences (empty when all is well)."""
    problems = []
    ans = rt["transformers"]["answers"]
    want = TOP1_EXPECTED.get(scheme)
    if want is not None and ans["top1"] < want:
        problems.append(f"vllm {scheme}: top-1 agreement on the source's answers {ans['top1']:.4f} < {want}")
    if not rt["tokenizer"]["match"]:
        problems.append(f"vllm {scheme}: the folder's tokenizer gives different ids: {rt['tokenizer']}")
    if rt.get("quantized_modules", 0) == 0:
        problems.append(f"vllm {scheme}: transformers loaded the folder without any quantised module")
    return problems


def metrics(rt: dict[str, Any]) -> dict[str, Any]:
    """Headline figures of a round trip (meta.json, kdforge.json)."""
    ans = rt["transformers"]["answers"]
    return {"max_abs_diff": ans["max_abs_diff"], "top1": ans["top1"], "nll_delta": ans["nll_delta"], "kl": ans["kl"],
            "top1_prompt_text": rt["transformers"]["prompt_text"]["top1"], "tokenizer_match": rt["tokenizer"]["match"]}
