"""ONNX Runtime GenAI export: an HF model to a folder that `kdforge.runtime.onnx.OnnxRuntime` (and any
ONNX Runtime GenAI program) runs, with a round trip against the source.

The ``onnxruntime-genai`` package's model builder writes the graph (Llama, Qwen2 and more; GroupQuery-
Attention; int4 as ``MatMulNBits``). It runs as a subprocess (``python -m onnxruntime_genai.models.builder
-i HF -o OUT -p fp32|int8|int4 -e cpu``): its Python entry point is a script's ``main`` whose options
change between releases, its command line less so. The folder then gets the source's own HF tokenizer
(the builder re-saves it, dropping the chat template from ``tokenizer_config.json``), ``config.json``,
``generation_config.json`` and ``genai_config.json`` with every end-of-turn id, ``kdforge.json`` (source,
quant, parameters, builder options, the round trip's headline figures) and a model card (``README.md``,
`kdforge.models.model_card.write_onnx_card`, library ``onnxruntime-genai``).

Round trip: logits of the exported ``model.onnx`` (plain onnxruntime, empty KV cache, every position)
against the source's on the export's validation texts (`kdforge.export.roundtrip`): max |Δlogit|, top-1
agreement, ΔNLL, KL; and the tokenizer read back from the folder, in transformers and in ORT GenAI, must
give the source's ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kdforge.artifacts import atomic_write_json
from kdforge.config import ConfigError

ONNX_QUANTS = ("fp32", "int8", "int4")
INSTALL_HINT = "pip install 'kdforge[onnx]' (onnxruntime-genai, onnxruntime, onnx, onnx-ir)"
# Thresholds the round trip is judged by (answers set): fp32 is the same arithmetic up to kernel order.
TOP1_EXPECTED = {"fp32": 1.0, "int8": 0.97}
MAX_ABS_DIFF_EXPECTED = {"fp32": 1e-3}


def check_installed() -> None:
    import importlib.util

    modules = ("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir")
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")


def run_builder(hf_folder: str | Path, out: str | Path, quant: str, cache_dir: str | Path,
                extra_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model builder on ``hf_folder`` into ``out`` (CPU execution provider). Returns the command and
    its wall time; raises RuntimeError with the builder's last output lines when it fails."""
    if quant not in ONNX_QUANTS:
        raise ValueError(f"ONNX quantisation must be one of {', '.join(ONNX_QUANTS)}, not {quant!r}")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
           "-p", quant, "-e", "cpu", "-c", str(cache_dir)]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    t0 = time.time()
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (Path(out) / "genai_config.json").is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"the ONNX Runtime GenAI model builder failed (exit {proc.returncode}):\n{tail}")
    return {"command": " ".join(cmd[1:]), "seconds": round(time.time() - t0, 2)}


def _source_folder(model, tokenizer, spec: str, scratch: Path) -> Path:
    """An HF folder of the fp32 model for the builder: the spec's own folder when it is one, else the
    loaded model saved (a GGUF file or the embedded teacher, dequantised)."""
    from kdforge.models.loading import hf_folder_of

    return hf_folder_of(model, tokenizer, spec, scratch)


def complete_onnx_folder(folder: Path, model, tokenizer, spec: str, quant: str) -> list[int]:
    """The source's tokenizer, config.json, generation_config.json with every end-of-turn id, the same ids in
    genai_config.json, and kdforge.json (source, quant, parameters). Returns the end-of-turn ids."""
    from kdforge.models.loading import count_parameters
    from kdforge.models.model_card import complete_model_folder

    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    ids = complete_model_folder(folder, tokenizer, model)
    gpath = folder / "genai_config.json"
    genai = json.loads(gpath.read_text(encoding="utf-8"))
    if ids:
        genai["model"]["eos_token_id"] = ids if len(ids) > 1 else ids[0]
    atomic_write_json(gpath, genai)
    atomic_write_json(folder / "kdforge.json", {"source": spec, "quant": quant, "vocab": len(tokenizer),
                                                "parameters": count_parameters(model)})
    return ids


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def onnx_roundtrip(folder: Path, tokenizer, sets: dict, ref: dict) -> dict[str, Any]:
    """Logits of the exported model (every position, empty KV cache) and the folder's tokenizer against
    the source: per validation set `kdforge.export.roundtrip.logits_agreement`, and the tokenizer ids."""
    from transformers import AutoTokenizer

    from kdforge.export.roundtrip import compare_ids, logits_agreement, tokenizer_texts
    from kdforge.runtime.onnx import OnnxRuntime

    lm = OnnxRuntime(folder, tokenizer=tokenizer)
    try:
        report: dict[str, Any] = {"validation_sequences": {k: len(v) for k, v in sets.items()}, "logits": {}}
        for name, data in sets.items():
            logits = [lm.sequence_logits(e.input_ids) for e in data]  # (T, V) each
            report["logits"][name] = logits_agreement(ref[name], logits, data, len(tokenizer))
    finally:
        lm.close()
    texts = tokenizer_texts(tokenizer)
    src_ids = [tokenizer(t)["input_ids"] for t in texts]
    back = AutoTokenizer.from_pretrained(folder)
    report["tokenizer"] = compare_ids(src_ids, [back(t)["input_ids"] for t in texts])
    # ORT GenAI's own tokenizer (what programs other than kdforge encode with) reads the same tokenizer.json
    from kdforge.runtime.onnx import import_genai

    og = import_genai()
    genai_tok = og.Tokenizer(og.Model(str(folder)))
    report["genai_tokenizer"] = compare_ids(src_ids, [[int(i) for i in genai_tok.encode(t)] for t in texts])
    return report


def export_onnx(model, tokenizer, spec: str, out: str | Path, quant: str, sets: dict | None = None,
                ref: dict | None = None, extra_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the ONNX Runtime GenAI folder ``out`` (which must not exist; the caller's atomic folder holds
    it) for ``model`` at ``quant``; round-trip it when ``sets``/``ref`` (validation texts and the source's
    logits) are given. Returns the summary: bytes, builder command and time, round trip."""
    check_installed()
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="kdforge-onnx-") as scratch:
        scratch = Path(scratch)
        source = _source_folder(model, tokenizer, spec, scratch)
        built = run_builder(source, out, quant, scratch / "cache", extra_options)
    complete_onnx_folder(out, model, tokenizer, spec, quant)
    summary: dict[str, Any] = {"quant": quant, "bytes": 0, "builder": built}
    if sets is not None and ref is not None:
        summary["roundtrip"] = onnx_roundtrip(out, tokenizer, sets, ref)
    write_card(out, built, extra_options, summary.get("roundtrip"))
    summary["bytes"] = folder_bytes(out)
    return summary


def write_card(folder: Path, built: dict[str, Any], extra_options: dict[str, Any] | None,
               rt: dict[str, Any] | None) -> Path:
    """The builder's options and time and the round trip's headline figures into kdforge.json, then the model
    card (README.md) from it (eval rewrites the card later with its figures)."""
    from kdforge.models.model_card import write_onnx_card

    path = folder / "kdforge.json"
    info = json.loads(path.read_text(encoding="utf-8"))
    info["builder"] = {"options": dict(extra_options or {}), "seconds": built.get("seconds"),
                       "execution_provider": "cpu"}
    if rt is not None:
        info["roundtrip"] = metrics(rt)
    atomic_write_json(path, info)
    return write_onnx_card(folder)


def judge(quant: str, rt: dict[str, Any]) -> list[str]:
    """Problems a round trip shows, as sentences (empty when all is well)."""
    problems = []
    ans = rt["logits"]["answers"]
    if quant in TOP1_EXPECTED and ans["top1"] < TOP1_EXPECTED[quant]:
        problems.append(f"onnx {quant}: top-1 agreement on the source's answers {ans['top1']:.4f} < "
                        f"{TOP1_EXPECTED[quant]}")
    if quant in MAX_ABS_DIFF_EXPECTED and ans["max_abs_diff"] > MAX_ABS_DIFF_EXPECTED[quant]:
        problems.append(f"onnx {quant}: max |Δlogit| {ans['max_abs_diff']:.3g} > {MAX_ABS_DIFF_EXPECTED[quant]}")
    if not rt["tokenizer"]["match"]:
        problems.append(f"onnx {quant}: the folder's tokenizer gives different ids: {rt['tokenizer']}")
    if not rt["genai_tokenizer"]["match"]:
        problems.append(f"onnx {quant}: ORT GenAI's tokenizer gives different ids: {rt['genai_tokenizer']}")
    return problems


def metrics(rt: dict[str, Any]) -> dict[str, Any]:
    """Headline figures of a round trip (meta.json)."""
    ans = rt["logits"]["answers"]
    return {"max_abs_diff": ans["max_abs_diff"], "top1": ans["top1"], "nll_delta": ans["nll_delta"],
            "kl": ans["kl"], "top1_prompt_text": rt["logits"]["prompt_text"]["top1"],
            "tokenizer_match": rt["tokenizer"]["match"], "genai_tokenizer_match": rt["genai_tokenizer"]["match"]}
