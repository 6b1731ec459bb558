"""`kdforge export` and `kdforge quantize`: one artifact folder each, with a round-trip report.

export/   model-<quant>.gguf (one per --quant), report.json (per file: size, tensor types, logits and
          tokenizer round trip), config.yaml, meta.json. With --to onnx: onnx-<quant>/ (one ONNX Runtime
          GenAI folder per --quant fp32|int8|int4, `kdforge.export.onnx`) instead of the GGUF files. With --to vllm:
          vllm-<scheme>/ (one compressed-tensors HF folder per --scheme w4a16|w8a8|fp8, written by llmcompressor,
          `kdforge.export.vllm`).
quantize/ an HF folder (model.safetensors with the quantization_config in config.json, tokenizer),
          report.json (reload check, agreement with the source, decode speed), config.yaml, meta.json.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdforge.artifacts import atomic_dir, atomic_write_json, check_writable, write_config, write_meta
from kdforge.config import StageConfig, dump
from kdforge.export.formats import METHODS, QUANT_NAMES
from kdforge.export.onnx import ONNX_QUANTS
from kdforge.export.vllm import GROUP_SIZES, VLLM_SCHEMES, W4A16_METHODS
from kdforge.quiet import quiet_torchao
from kdforge.stages import Stage


class ExportConfig(StageConfig):
    """`kdforge export`: write a model as GGUF (llama.cpp / Ollama), as an ONNX Runtime GenAI folder or as a
    vLLM-loadable compressed-tensors folder, and check that it round-trips."""

    model: str = Field(description="HF folder, .gguf file, or embedded:smollm2-135m-instruct")
    out: str = Field("artifacts/export", description="output folder: model-<quant>.gguf files (onnx-<quant>/, "
                     "vllm-<scheme>/ folders) and report.json")
    to: Literal["gguf", "onnx", "vllm"] = Field("gguf", description="output format: gguf (llama.cpp, Ollama), onnx "
                                                "(ONNX Runtime GenAI, CPU; needs the onnx extra) or vllm "
                                                "(compressed-tensors folders; needs the vllm extra)")
    quant: list[str] = Field(default_factory=lambda: ["f16"],
                             description=f"one or more of {', '.join(QUANT_NAMES)} (gguf; default f16) or "
                             f"{', '.join(ONNX_QUANTS)} (onnx; default fp32); one file or folder each")
    scheme: list[str] = Field(default_factory=lambda: ["w8a8"],
                              description=f"--to vllm: one or more of {', '.join(VLLM_SCHEMES)} (default w8a8); "
                              "one vllm-<scheme>/ folder each")
    w4a16_method: Literal[W4A16_METHODS] = Field(  # type: ignore[valid-type]
        "gptq", description="--to vllm --scheme w4a16: calibrated rounding by gptq or awq")
    group_size: int | None = Field(None, description="--to vllm --scheme w4a16: weights per scale, one of "
                                   f"{', '.join(map(str, GROUP_SIZES))} (default: the largest that divides every "
                                   "Linear's input size)")
    keep_f16: list[str] = Field(default_factory=list,
                                description="GGUF tensor names or globs kept at f16, e.g. token_embd output")
    allow_fallback: bool = Field(False, description="write tensors whose rows do not divide into blocks as f16 "
                                 "instead of failing")
    pure: bool = Field(False, description="every 2-D tensor in the requested type, as llama-quantize --pure; by "
                       "default a q4_0/q4_1/q5_0/q5_1 file keeps the output projection (a tied embedding) at "
                       "q8_0, as llama-quantize does")
    pre: str | None = Field(None, description="llama.cpp pre-tokenizer name (default: detected)")
    calibration: str = Field("auto", description="text for calibrated (GPTQ) rounding of q8_0/q4_0 tensors "
                             "(and of --to vllm's w4a16/w8a8): "
                             "'auto' (the model's own answers to the bundled prompts' training split), a "
                             "`kdforge generate` folder or conversations JSONL, or 'none' (round to nearest)")
    calibration_samples: int = Field(128, gt=0, description="calibration conversations")
    check: bool = Field(True, description="read the file back and compare logits and token ids")
    check_prompts: int = Field(16, gt=0, description="validation prompts in the round-trip check")
    onnx_options: dict[str, str | int | bool] = Field(
        default_factory=dict, description="--to onnx: the model builder's --extra_options, e.g. "
        "{algo_config: k_quant_mixed} or {accuracy_level: 1} (fp32 activations; the CPU default 4 rounds them to int8)")
    trust_remote_code: bool = False

    @field_validator("quant", "scheme", mode="before")
    @classmethod
    def _split(cls, v):
        # "q8_0,q4_0", "q8_0 q4_0" and the CLI's ["q8_0,q4_0"] (nargs) all mean two entries
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            v = [x for item in v for x in (item.replace(",", " ").split() if isinstance(item, str) else [item])]
        return v

    @field_validator("quant")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        v = [x.lower() for x in v]
        bad = [x for x in v if x not in QUANT_NAMES and x not in ONNX_QUANTS]
        if bad or not v:
            raise ValueError(f"unknown type(s) {bad}; the gguf package writes: {', '.join(QUANT_NAMES)}; "
                             f"the ONNX export: {', '.join(ONNX_QUANTS)}")
        return list(dict.fromkeys(v))

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, v: list[str]) -> list[str]:
        v = [x.lower() for x in v]
        bad = [x for x in v if x not in VLLM_SCHEMES]
        if bad or not v:
            raise ValueError(f"unknown scheme(s) {bad}; the vLLM export writes: {', '.join(VLLM_SCHEMES)}")
        return list(dict.fromkeys(v))

    @field_validator("group_size")
    @classmethod
    def _known_group(cls, v: int | None) -> int | None:
        if v is not None and v not in GROUP_SIZES:
            raise ValueError(f"W4A16 group sizes are {', '.join(map(str, GROUP_SIZES))} (vLLM's int4 kernels)")
        return v

    @model_validator(mode="after")
    def _quant_fits_format(self):
        # Judged by value, not by being set: a written config.yaml (every field) reads back as it was.
        def changed(field: str) -> bool:
            return getattr(self, field) != type(self).model_fields[field].get_default(call_default_factory=True)

        vllm_only = [f for f in ("scheme", "w4a16_method", "group_size") if changed(f)]
        if self.to != "vllm" and vllm_only:
            raise ValueError(f"{', '.join(vllm_only)}: only for --to vllm (this export is --to {self.to})")
        if self.to == "vllm":
            if changed("quant"):
                raise ValueError(f"--to vllm takes --scheme {'|'.join(VLLM_SCHEMES)}, not --quant "
                                 f"{' '.join(self.quant)}")
            return self
        if self.to == "onnx" and "quant" not in self.model_fields_set:
            self.quant = ["fp32"]  # the GGUF default (f16) is no ONNX type
        known = ONNX_QUANTS if self.to == "onnx" else QUANT_NAMES
        bad = [x for x in self.quant if x not in known]
        if bad:
            raise ValueError(f"--to {self.to} writes {', '.join(known)}, not {', '.join(bad)}")
        return self


class QuantizeConfig(StageConfig):
    """`kdforge quantize`: weight quantisation in PyTorch (torchao; bitsandbytes on CUDA), saved to reload."""

    model: str = Field(description="HF folder, .gguf file, or embedded:smollm2-135m-instruct")
    out: str = Field("artifacts/quantize", description="output folder: the quantised HF folder and report.json")
    method: Literal[METHODS] = Field("int8", description="int8, int8-dynamic, int4, int8-int4 (torchao); "  # type: ignore[valid-type]
                                     "nf4, bnb-int8 (bitsandbytes, CUDA only)")
    group_size: int = Field(32, gt=0, description="int4 methods: weights per scale")
    check: bool = Field(True, description="measure agreement with the source model and decode speed")
    check_prompts: int = Field(16, gt=0)
    decode_tokens: int = Field(32, gt=1)
    device: str = "auto"
    trust_remote_code: bool = False


# Thresholds the round trip is judged by (reported as ok/not ok; the file is written either way).
TOP1_EXPECTED = {"f32": 1.0, "f16": 1.0, "bf16": 1.0, "q8_0": 0.99}


def _judge(quant: str, rt: dict[str, Any]) -> list[str]:
    """Problems found by a round trip, as sentences (empty when all is well)."""
    problems = []
    hf = rt["transformers"]["answers"]
    want = TOP1_EXPECTED.get(quant)
    if want is not None and hf["top1"] < want:
        problems.append(f"{quant}: top-1 agreement on the source's answers {hf['top1']:.4f} < {want}")
    if not rt["tokenizer"]["match"]:
        problems.append(f"{quant}: tokenizer read back from the file gives different ids: {rt['tokenizer']}")
    cpp = rt.get("llama_cpp", {})
    if "tokenizer" in cpp and not cpp["tokenizer"]["match"]:
        problems.append(f"{quant}: llama.cpp tokenizes differently from the source: {cpp['tokenizer']}")
    if "logits" in cpp and want is not None and cpp["logits"]["answers"]["top1"] < min(want, 0.99):
        problems.append(f"{quant}: llama.cpp top-1 agreement on the source's answers "
                        f"{cpp['logits']['answers']['top1']:.4f} < {min(want, 0.99)}")
    return problems


def _metrics(rt: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a round trip (meta.json): transformers on the source's answers."""
    hf = rt["transformers"]["answers"]
    out = {"max_abs_diff": hf["max_abs_diff"], "top1": hf["top1"], "nll_delta": hf["nll_delta"], "kl": hf["kl"],
           "top1_prompt_text": rt["transformers"]["prompt_text"]["top1"],
           "tokenizer_match": rt["tokenizer"]["match"]}
    cpp = rt.get("llama_cpp", {})
    if "logits" in cpp:
        out |= {"llama_cpp_top1": cpp["logits"]["answers"]["top1"],
                "llama_cpp_max_abs_diff": cpp["logits"]["answers"]["max_abs_diff"],
                "llama_cpp_nll_delta": cpp["logits"]["answers"]["nll_delta"],
                "llama_cpp_tokenizer_match": cpp["tokenizer"]["match"]}
    return out


def _summary_line(rt: dict[str, Any]) -> str:
    m = _metrics(rt)
    line = (f", answers: max|Δlogit| {m['max_abs_diff']:.4g}, top-1 {m['top1']:.4f}, ΔNLL {m['nll_delta']:+.4f}"
            f" (prompt text top-1 {m['top1_prompt_text']:.4f}); tokenizer "
            f"{'match' if m['tokenizer_match'] else 'MISMATCH'}")
    if "llama_cpp_top1" in m:
        line += (f"; llama.cpp: top-1 {m['llama_cpp_top1']:.4f}, max|Δlogit| {m['llama_cpp_max_abs_diff']:.4g}, "
                 f"tokenizer {'match' if m['llama_cpp_tokenizer_match'] else 'MISMATCH'}")
    return line


def _calibrate(cfg: ExportConfig, model, tok) -> tuple[dict | None, dict[str, Any] | None]:
    """Input statistics for calibrated rounding of the q8_0/q4_0 tensors of every requested file (None
    when no file needs them or calibration is off)."""
    from kdforge.export.calibration import calibrated_names, export_hessians

    if cfg.calibration == "none":
        return None, None
    tensors = calibrated_names(model, cfg.quant, cfg.keep_f16, cfg.allow_fallback, cfg.pure)
    if not tensors:
        return None, None
    t0 = time.time()
    hessians, info = export_hessians(model, tok, cfg.calibration, cfg.calibration_samples, tensors)
    info |= {"tensors": len(hessians), "seconds": round(time.time() - t0, 1)}
    print(f"[kdforge] calibration: {info['conversations']} conversations, {info['tokens']} tokens "
          f"({info['source']}), input statistics of {len(hessians)} tensors in {info['seconds']} s", flush=True)
    return hessians, info


def run_onnx(cfg: ExportConfig, overwrite: bool = False) -> dict[str, Any]:
    """`kdforge export --to onnx`: one ONNX Runtime GenAI folder per quant, each round-tripped."""
    from kdforge.export.onnx import check_installed, export_onnx, judge
    from kdforge.export.onnx import metrics as onnx_metrics
    from kdforge.export.roundtrip import source_logits, validation_sets
    from kdforge.models.loading import load_model

    check_installed()  # before the model loads
    check_writable(cfg.out)
    t0 = time.time()
    model, tok = load_model(cfg.model, device="cpu", dtype="float32", trust_remote_code=cfg.trust_remote_code)
    sets = validation_sets(model, tok, cfg.check_prompts) if cfg.check else None
    ref = source_logits(model, sets) if cfg.check else None
    folders: dict[str, Any] = {}
    problems: list[str] = []
    with atomic_dir(cfg.out, overwrite=overwrite) as tmp:
        write_config(tmp, dump(cfg))
        for quant in cfg.quant:
            name = f"onnx-{quant}"
            summary = export_onnx(model, tok, cfg.model, tmp / name, quant, sets, ref, cfg.onnx_options or None)
            summary["path"] = name
            if cfg.check:
                problems += judge(quant, summary["roundtrip"])
            folders[quant] = summary
            line = f"[kdforge] export {name}/: {summary['bytes'] / 1e6:.1f} MB in {summary['builder']['seconds']} s"
            if cfg.check:
                m = onnx_metrics(summary["roundtrip"])
                line += (f", answers: max|Δlogit| {m['max_abs_diff']:.4g}, top-1 {m['top1']:.4f}, ΔNLL "
                         f"{m['nll_delta']:+.4f} (prompt text top-1 {m['top1_prompt_text']:.4f}); tokenizer "
                         f"{'match' if m['tokenizer_match'] else 'MISMATCH'}")
            print(line, flush=True)
        atomic_write_json(tmp / "report.json", {"model": cfg.model, "to": "onnx", "files": folders,
                                                "problems": problems})
        metrics = {q: {"bytes": s["bytes"], "export_s": s["builder"]["seconds"]}
                   | (onnx_metrics(s["roundtrip"]) if cfg.check else {}) for q, s in folders.items()}
        write_meta(tmp, "export", {"model": cfg.model}, metrics, time.time() - t0,
                   extra={"files": {q: s["path"] for q, s in folders.items()}})
    for p in problems:
        print(f"[kdforge] WARNING: {p}", flush=True)
    return metrics


def run_vllm(cfg: ExportConfig, overwrite: bool = False) -> dict[str, Any]:
    """`kdforge export --to vllm`: one compressed-tensors folder per scheme (llmcompressor), each round-tripped
    through transformers."""
    from kdforge.export import vllm
    from kdforge.export.roundtrip import source_logits, validation_sets
    from kdforge.models.loading import load_model

    vllm.check_installed()  # before the model loads
    check_writable(cfg.out)
    t0 = time.time()
    model, tok = load_model(cfg.model, device="cpu", dtype="float32", trust_remote_code=cfg.trust_remote_code)
    vllm.check_supported(model)  # fail before creating the output folder
    group = vllm.pick_group_size(model, cfg.group_size) if "w4a16" in cfg.scheme else None
    sets = validation_sets(model, tok, cfg.check_prompts) if cfg.check else None
    ref = source_logits(model, sets) if cfg.check else None  # the source's logits, computed once
    calib_ids, calibration = None, None
    if vllm.needs_calibration(cfg.scheme, cfg.calibration):
        calib_ids, calibration = vllm.calibration_text(model, tok, cfg.calibration, cfg.calibration_samples)
        print(f"[kdforge] calibration: {calibration['conversations']} conversations, {calibration['tokens']} tokens "
              f"({calibration['source']}) in {calibration['seconds']} s", flush=True)
    folders: dict[str, Any] = {}
    problems: list[str] = []
    with atomic_dir(cfg.out, overwrite=overwrite) as tmp, vllm.scratch_dir() as scratch:
        write_config(tmp, dump(cfg))
        source = vllm.source_folder(model, tok, cfg.model, Path(scratch))
        for scheme in cfg.scheme:
            name = f"vllm-{scheme}"
            summary = vllm.export_vllm(model, tok, cfg.model, tmp / name, scheme, source, calib_ids, sets, ref,
                                       cfg.w4a16_method, group)
            summary["path"] = name
            if cfg.check:
                problems += vllm.judge(scheme, summary["roundtrip"])
            folders[scheme] = summary
            line = (f"[kdforge] export {name}/: {summary['bytes'] / 1e6:.1f} MB, {summary['rounding']} rounding in "
                    f"{summary['seconds']} s (folder written in {summary['write_seconds']} s)")
            if cfg.check:
                m = vllm.metrics(summary["roundtrip"])
                line += (f", answers: max|Δlogit| {m['max_abs_diff']:.4g}, top-1 {m['top1']:.4f}, KL {m['kl']:.4g}, "
                         f"ΔNLL {m['nll_delta']:+.4f} (prompt text top-1 {m['top1_prompt_text']:.4f}); tokenizer "
                         f"{'match' if m['tokenizer_match'] else 'MISMATCH'}")
            print(line, flush=True)
        atomic_write_json(tmp / "report.json", {"model": cfg.model, "to": "vllm", "calibration": calibration,
                                                "versions": vllm.versions(), "files": folders, "problems": problems})
        metrics = {s: {"bytes": f["bytes"], "export_s": f["write_seconds"]}
                   | (vllm.metrics(f["roundtrip"]) if cfg.check else {}) for s, f in folders.items()}
        write_meta(tmp, "export", {"model": cfg.model}, metrics, time.time() - t0,
                   extra={"files": {s: f["path"] for s, f in folders.items()}})
    for p in problems:
        print(f"[kdforge] WARNING: {p}", flush=True)
    return metrics


def _copy_vocab_map(model: str, out: Path) -> None:
    """A trimmed student's vocabulary map goes beside its GGUF files: eval then reads a file as the trimmed model
    it is (its ids mapped to the teacher's), not as one with an unrelated tokenizer (aligned by bytes)."""
    from kdforge.models.vocab_trim import VOCAB_MAP_NAME, vocab_map_file

    src = vocab_map_file(model)  # None for a file or embedded:NAME
    if src is not None:
        shutil.copyfile(src, out / VOCAB_MAP_NAME)


def run(cfg: ExportConfig, overwrite: bool = False) -> dict[str, Any]:
    from kdforge.export.gguf_writer import check_supported, write_gguf
    from kdforge.export.roundtrip import gguf_roundtrip, source_logits, validation_sets
    from kdforge.models.loading import load_model

    quiet_torchao()
    if cfg.to == "onnx":
        return run_onnx(cfg, overwrite)
    if cfg.to == "vllm":
        return run_vllm(cfg, overwrite)
    check_writable(cfg.out)  # before the model loads
    t0 = time.time()
    model, tok = load_model(cfg.model, device="cpu", dtype="float32", trust_remote_code=cfg.trust_remote_code)
    check_supported(model.config, type(model).__name__)  # fail before creating the output folder
    name = Path(cfg.model).name if not cfg.model.startswith("embedded:") else cfg.model.split(":", 1)[1]
    sets = validation_sets(model, tok, cfg.check_prompts) if cfg.check else {}
    ref = source_logits(model, sets) if cfg.check else None  # the source's logits, computed once
    hessians, calibration = _calibrate(cfg, model, tok)
    files: dict[str, Any] = {}
    problems: list[str] = []
    with atomic_dir(cfg.out, overwrite=overwrite) as tmp:
        write_config(tmp, dump(cfg))
        _copy_vocab_map(cfg.model, tmp)
        for quant in cfg.quant:
            fname = f"model-{quant}.gguf"
            t1 = time.time()
            summary = write_gguf(model, tok, tmp / fname, quant, cfg.keep_f16, cfg.allow_fallback, cfg.pre, name,
                                 hessians, cfg.pure)
            summary["path"] = fname
            summary["write_s"] = round(time.time() - t1, 2)
            if cfg.check:
                rt = gguf_roundtrip(model, tok, tmp / fname, sets, ref)
                summary["roundtrip"] = rt
                problems += _judge(quant, rt)
            files[quant] = summary
            print(f"[kdforge] export {fname}: {summary['bytes'] / 1e6:.1f} MB" + (
                _summary_line(summary["roundtrip"]) if cfg.check else ""), flush=True)
        report = {"model": cfg.model, "calibration": calibration, "files": files, "problems": problems}
        atomic_write_json(tmp / "report.json", report)
        metrics = {q: {"bytes": s["bytes"]} | (_metrics(s["roundtrip"]) if cfg.check else {})
                   for q, s in files.items()}
        write_meta(tmp, "export", {"model": cfg.model}, metrics, time.time() - t0,
                   extra={"files": {q: s["path"] for q, s in files.items()}})
    for p in problems:
        print(f"[kdforge] WARNING: {p}", flush=True)
    return {q: m for q, m in metrics.items()}


def run_quantize(cfg: QuantizeConfig, overwrite: bool = False) -> dict[str, Any]:
    from kdforge.data.chat import encode_prompt
    from kdforge.data.prompts import SPEED_PROMPT
    from kdforge.export.roundtrip import model_report, validation_sets
    from kdforge.export.torch_quant import folder_bytes, load_quantized, reload_quantized, save_quantized
    from kdforge.models.loading import load_model, resolve_model
    from kdforge.models.model_card import complete_model_folder, write_model_card
    from kdforge.runtime import as_runtime

    quiet_torchao()
    check_writable(cfg.out)  # before the model loads
    t0 = time.time()
    qmodel, tok = load_quantized(cfg.model, cfg.method, cfg.group_size, cfg.device, cfg.trust_remote_code)
    report: dict[str, Any] = {"model": cfg.model, "method": cfg.method}
    with atomic_dir(cfg.out, overwrite=overwrite) as tmp:
        write_config(tmp, dump(cfg))
        save_quantized(qmodel, tok, tmp)
        complete_model_folder(tmp, tok, qmodel)  # chat template in both places, every end-of-turn id
        report["bytes"] = folder_bytes(tmp)
        src = resolve_model(cfg.model)
        if not src.gguf_file:
            report["source_bytes"] = folder_bytes(src.folder)
        if cfg.check:
            source, _ = load_model(cfg.model, cfg.device, dtype="float32" if cfg.method not in ("nf4", "bnb-int8")
                                   else "auto", trust_remote_code=cfg.trust_remote_code)
            sets = validation_sets(source, tok, cfg.check_prompts)
            reloaded = reload_quantized(tmp, cfg.device)
            # The saved folder must compute exactly what the in-memory quantised model computes.
            report["reload"] = model_report(qmodel, reloaded, sets, len(tok))["answers"]
            del reloaded
            report["agreement"] = model_report(source, qmodel, sets, len(tok))
            prompt = encode_prompt(tok, SPEED_PROMPT)
            report["decode"] = {"quantized": as_runtime(qmodel, tok).decode_speed(prompt, cfg.decode_tokens),
                                "source": as_runtime(source, tok).decode_speed(prompt, cfg.decode_tokens)}
            del source
        atomic_write_json(tmp / "report.json", report)
        metrics = {"bytes": report["bytes"]}
        if cfg.check:
            ans = report["agreement"]["answers"]
            metrics |= {"top1": ans["top1"], "nll_delta": ans["nll_delta"], "kl": ans["kl"],
                        "top1_prompt_text": report["agreement"]["prompt_text"]["top1"],
                        "reload_max_abs_diff": report["reload"]["max_abs_diff"],
                        "decode_tokens_per_s": report["decode"]["quantized"]["decode_tokens_per_s"],
                        "source_decode_tokens_per_s": report["decode"]["source"]["decode_tokens_per_s"]}
        meta = write_meta(tmp, "quantize", {"model": cfg.model}, metrics, time.time() - t0)
        write_model_card(tmp, "quantize", dump(cfg), meta)  # README.md
    return metrics


STAGES = (
    Stage("export", "write a model as GGUF (llama.cpp/Ollama), ONNX (ONNX Runtime GenAI) or compressed-tensors "
          "(vLLM) and check that it round-trips", ExportConfig, run,
          positional="model", flags=("to", "quant", "scheme", "w4a16_method", "group_size", "keep_f16",
                                     "allow_fallback", "pure", "pre", "calibration", "calibration_samples", "check",
                                     "out")),
    Stage("quantize", "weight quantisation in PyTorch (torchao int8/int4; bitsandbytes on CUDA)", QuantizeConfig,
          run_quantize, positional="model", flags=("method", "group_size", "check", "out")),
)
