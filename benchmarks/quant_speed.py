"""Size, batch-1 decode speed and quality of quantised variants of one model, against its fp32 self.

Prints one JSON line per variant: fp32 (PyTorch), torchao int8 / int4 weight-only (PyTorch, loaded
back from the saved folder), and, when llama-cpp-python is installed, the GGUF F16 / Q8_0 / Q4_0
files written by `kdforge export`, run by llama.cpp (Q8_0 / Q4_0 twice: rounded to nearest, and with
the export's default calibrated rounding, variant ``gguf-<type>-gptq``); when the onnx extra is installed,
the ONNX Runtime GenAI folders fp32 / int8 / int4 written by `kdforge export --to onnx` (variant
``onnx-<quant>``, run by `kdforge.runtime.onnx.OnnxRuntime`: ORT GenAI's generator for speed, the plain
onnxruntime session for logits); and every ``--extra NAME=PATH``: any model another tool or stage already
wrote (a GGUF file, an ONNX Runtime GenAI folder, an HF folder, e.g. a vLLM compressed-tensors folder or a
quantisation-aware Q4_0 GGUF), opened by `kdforge.runtime.open_model` in the runtime it picks
(``--extra-backend``) and scored the same way; it must have the source's tokenizer. The last line is
``{"summary": ...}``: every variant's bytes, decode tok/s, TTFT, KL and top-1 in one line. A variant that
cannot run here (its package missing) prints a line with ``skipped`` instead. Each line has bytes on
disk, greedy batch-1 decode tokens/s with the thread count, NLL / KL(fp32 ‖ variant) / top-1 agreement with fp32 on the
fp32 model's own greedy answers to 16 validation prompts (the round trip's "answers" set; top-1 on the
prompt text itself is `top1_prompt_text`), and ratios to fp32.

Every variant is timed by its runtime's decode_speed (kdforge.runtime: transformers `generate` for the
PyTorch ones, llama.cpp for the GGUF files, ORT GenAI's generator for the ONNX folders; one protocol:
warm-up, time to first token, then decode tokens/s after it, best of 2). Bytes: the weight files
(`kdforge.eval.speed.bytes_on_disk`: safetensors, GGUF, .onnx + .onnx.data), as `kdforge eval` counts them.
Usage: python benchmarks/quant_speed.py [--model embedded:smollm2-135m-instruct] [--new-tokens 64]
       [--prompts 16] [--threads N] [--methods int8 int4] [--gguf f16 q8_0 q4_0] [--calibration auto|none|DATA]
       [--onnx fp32 int8 int4] [--extra NAME=PATH ...] [--extra-backend auto|transformers|llama.cpp]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from kdforge.data.chat import encode_prompt
from kdforge.data.prompts import SPEED_PROMPT
from kdforge.export.calibration import calibrated_names, export_hessians
from kdforge.export.gguf_writer import write_gguf
from kdforge.export.gptq import CALIBRATED_TYPES
from kdforge.export.roundtrip import logits_agreement, source_logits, torch_logits, validation_sets
from kdforge.export.torch_quant import folder_bytes, load_quantized, reload_quantized, save_quantized
from kdforge.models.loading import load_model, resolve_model
from kdforge.quiet import quiet_torchao
from kdforge.runtime import LLAMA_CPP, ONNX_GENAI, as_runtime, llama_cpp_available, onnx_genai_available, open_model


def extra_spec(text: str) -> tuple[str, str]:
    """``NAME=PATH`` of ``--extra`` (a bare PATH is named after its file or folder)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).stem if text.endswith(".gguf") else Path(text).name, text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--extra takes NAME=PATH, not {text!r}")
    return name, path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16, help="validation prompts for NLL/KL/top-1")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--methods", nargs="*", default=["int8", "int4"], help="torchao methods")
    ap.add_argument("--gguf", nargs="*", default=["f16", "q8_0", "q4_0"], help="GGUF types run by llama.cpp")
    ap.add_argument("--calibration", default="auto", help="text for the -gptq variants ('none': skip them)")
    ap.add_argument("--onnx", nargs="*", default=["fp32", "int8", "int4"],
                    help="ONNX Runtime GenAI folders (kdforge export --to onnx; needs the onnx extra)")
    ap.add_argument("--extra", action="append", type=extra_spec, default=[], metavar="NAME=PATH",
                    help="also score this exported model (GGUF file, ONNX Runtime GenAI folder, HF folder) as "
                    "variant NAME; repeatable")
    ap.add_argument("--extra-backend", default="auto", help="the runtime of the --extra models (kdforge.runtime)")
    args = ap.parse_args()
    quiet_torchao()
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, device="cpu", dtype="float32")
    sets = validation_sets(model, tok, args.prompts)
    ref = source_logits(model, sets)  # fp32 logits per set and sequence, (T, V) each
    vocab = len(tok)
    prompt = encode_prompt(tok, SPEED_PROMPT)
    src = resolve_model(args.model)
    fp32_bytes = folder_bytes(src.folder) if not src.gguf_file else sum(
        p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    base: dict = {}
    summary: dict = {}

    def emit(variant: str, runtime: str, nbytes: int, speed: dict, logits: dict[str, list[torch.Tensor]], **extra):
        q = logits_agreement(ref["answers"], logits["answers"], sets["answers"], vocab)
        q_prompt = logits_agreement(ref["prompt_text"], logits["prompt_text"], sets["prompt_text"], vocab)
        row = {"variant": variant, "runtime": runtime, "bytes": nbytes,
               "decode_tokens_per_s": round(speed["decode_tokens_per_s"], 2),
               "ttft_ms": round(speed["ttft_s"] * 1000, 1), "threads": speed["threads"],
               "new_tokens": args.new_tokens}
        row |= {"nll": round(q["nll"], 4), "nll_delta": round(q["nll_delta"], 4), "kl": round(q["kl"], 5),
                "top1": round(q["top1"], 4), "max_abs_diff": round(q["max_abs_diff"], 4), "tokens": q["tokens"],
                "top1_prompt_text": round(q_prompt["top1"], 4)}
        if not base:
            base.update(bytes=nbytes, tps=speed["decode_tokens_per_s"])
        row |= {"bytes_ratio": round(nbytes / base["bytes"], 3),
                "speed_ratio": round(speed["decode_tokens_per_s"] / base["tps"], 3), "model": args.model, **extra}
        print(json.dumps(row), flush=True)
        summary[variant] = {k: row[k] for k in ("runtime", "bytes", "decode_tokens_per_s", "ttft_ms", "kl", "top1",
                                                "speed_ratio")}

    def skip(variant: str, runtime: str, why: str, nbytes: int | None = None) -> None:
        print(json.dumps({"variant": variant, "runtime": runtime, "bytes": nbytes, "skipped": why}), flush=True)
        summary[variant] = {"runtime": runtime, "skipped": why}

    def score(variant: str, lm, nbytes: int, **extra) -> None:
        """A runtime's logits on every validation sequence (one unpadded sequence each, as the round trips
        read them), then its batch-1 decode speed: the row every non-PyTorch variant gets."""
        logits = {k: [lm.sequence_logits(e.input_ids) for e in v] for k, v in sets.items()}
        lm.release_scoring()  # decode_speed times decoding alone (llama.cpp: one logit row a step)
        emit(variant, lm.backend, nbytes, lm.decode_speed(prompt, args.new_tokens), logits, **extra)

    emit("fp32", "pytorch", fp32_bytes, as_runtime(model, tok).decode_speed(prompt, args.new_tokens), ref)

    with tempfile.TemporaryDirectory(prefix="kdforge-quant-bench-") as root:
        for method in args.methods:
            qmodel, _ = load_quantized(args.model, method, device="cpu")
            save_quantized(qmodel, tok, Path(root) / method)
            del qmodel
            qmodel = reload_quantized(Path(root) / method, device="cpu")  # measure what was saved
            emit(f"torchao-{method}", "pytorch", folder_bytes(Path(root) / method),
                 as_runtime(qmodel, tok).decode_speed(prompt, args.new_tokens),
                 {k: torch_logits(qmodel, v) for k, v in sets.items()})
            del qmodel

        files = [(quant, None) for quant in args.gguf]
        calibrated = [q for q in args.gguf if q in CALIBRATED_TYPES]
        if calibrated and args.calibration != "none":
            hessians, _ = export_hessians(model, tok, args.calibration, 128, calibrated_names(model, calibrated))
            files += [(q, hessians) for q in calibrated]
        for quant, hessians in files:
            variant = f"gguf-{quant}" + ("-gptq" if hessians else "")
            path = Path(root) / f"{variant}.gguf"
            write_gguf(model, tok, path, quant, hessians=hessians)
            if not llama_cpp_available():
                skip(variant, LLAMA_CPP, "llama-cpp-python is not installed (pip install 'kdforge[llamacpp]')",
                     path.stat().st_size)
                continue
            with open_model(str(path), backend=LLAMA_CPP, threads=args.threads) as lm:
                score(variant, lm, path.stat().st_size)

        # ONNX Runtime GenAI folders, as `kdforge export --to onnx --quant Q` writes them
        from kdforge.eval.speed import bytes_on_disk

        for quant in args.onnx:
            variant = f"onnx-{quant}"
            if not onnx_genai_available():
                skip(variant, ONNX_GENAI, "the onnx extra is not installed (pip install 'kdforge[onnx]')")
                continue
            from kdforge.export.onnx import export_onnx

            folder = Path(root) / variant
            built = export_onnx(model, tok, args.model, folder, quant)["builder"]
            with open_model(str(folder), threads=args.threads) as lm:
                score(variant, lm, bytes_on_disk(str(folder)), export_s=built["seconds"])

        # Models written elsewhere (--extra NAME=PATH): scored exactly like the variants above
        from kdforge.models.vocab_trim import same_vocabulary

        for name, spec in args.extra:
            with open_model(spec, backend=args.extra_backend, threads=args.threads) as lm:
                if not same_vocabulary(tok, lm.tokenizer):
                    skip(name, lm.backend, f"{spec} has another tokenizer than {args.model}", bytes_on_disk(spec))
                    continue
                score(name, lm, bytes_on_disk(spec), path=spec)
    print(json.dumps({"summary": summary, "model": args.model, "threads": args.threads,
                      "new_tokens": args.new_tokens, "prompts": args.prompts}), flush=True)


if __name__ == "__main__":
    main()
