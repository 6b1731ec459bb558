"""ONNX Runtime GenAI export and runtime on tiny random Llama (tied embeddings) and Qwen2 (untied, q/k/v
biases) models: fp32 logits equal HF's, int4 round trip reported, greedy answers equal transformers'."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")

from kdforge.runtime import LLAMA_CPP, ONNX_GENAI, TRANSFORMERS, SamplingParams, backend_for, open_model  # noqa: E402
from tests.conftest import save_tiny  # noqa: E402

ARCHS = ("llama", "qwen2")
INT4_TOP1_MIN = 0.6  # tiny random models have near-tied logits; int4 kept 0.89 (Qwen2) on the answers here


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer):
    return {a: save_tiny(tmp_path_factory.mktemp(f"onnx-hf-{a}"), a, tokenizer) for a in ARCHS}


@pytest.fixture(scope="module")
def sources(hf_dirs):
    from kdforge.export.roundtrip import source_logits, validation_sets
    from kdforge.models.loading import load_model

    out = {}
    for arch, folder in hf_dirs.items():
        model, tok = load_model(str(folder), device="cpu", dtype="float32")
        sets = validation_sets(model, tok, 4, 16)
        out[arch] = (model, tok, sets, source_logits(model, sets))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, hf_dirs, sources):
    """(arch, quant) -> (folder, summary), built once per module (about 20 s each on 2 cores)."""
    from kdforge.export.onnx import export_onnx

    built = {}

    def get(arch: str, quant: str):
        if (arch, quant) not in built:
            model, tok, sets, ref = sources[arch]
            folder = tmp_path_factory.mktemp(f"onnx-{arch}-{quant}") / "model"
            built[arch, quant] = folder, export_onnx(model, tok, str(hf_dirs[arch]), folder, quant, sets, ref)
        return built[arch, quant]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_export_matches_hf_logits(exports, arch):
    folder, summary = exports(arch, "fp32")
    rt = summary["roundtrip"]
    for name in ("answers", "prompt_text"):
        fig = rt["logits"][name]
        print(f"{arch} fp32 {name}: max|Δlogit| {fig['max_abs_diff']:.3g}, top-1 {fig['top1']:.4f}, "
              f"{fig['tokens']} tokens")
        assert fig["max_abs_diff"] < 1e-4
        assert fig["top1"] == 1.0
        assert fig["tokens"] > 0
    assert rt["tokenizer"]["match"] and rt["genai_tokenizer"]["match"]
    assert (folder / "genai_config.json").is_file() and (folder / "tokenizer.json").is_file()
    info = json.loads((folder / "kdforge.json").read_text())
    assert info["quant"] == "fp32"
    # every end-of-turn id in both generation configs
    genai_eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    gen_eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(genai_eos if isinstance(genai_eos, list) else [genai_eos]) == sorted(
        gen_eos if isinstance(gen_eos, list) else [gen_eos])


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_export_roundtrip_reported(exports, arch):
    from kdforge.export.onnx import judge, metrics

    folder, summary = exports(arch, "int4")
    m = metrics(summary["roundtrip"])
    print(f"{arch} int4: {summary['bytes'] / 1e6:.1f} MB, max|Δlogit| {m['max_abs_diff']:.3g}, "
          f"top-1 {m['top1']:.4f} (prompt text {m['top1_prompt_text']:.4f}), KL {m['kl']:.4g}, "
          f"builder {summary['builder']['seconds']} s")
    assert m["tokenizer_match"] and m["genai_tokenizer_match"]
    assert m["top1"] >= INT4_TOP1_MIN
    assert 0 < m["max_abs_diff"] < 5
    assert judge("int4", summary["roundtrip"]) == []  # no fixed bar for int4: reported only
    fp32_bytes = exports(arch, "fp32")[1]["bytes"]
    assert summary["bytes"] < fp32_bytes
    graph = (folder / "model.onnx").read_bytes()
    assert b"MatMulNBits" in graph


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_runtime_greedy_equals_transformers(exports, hf_dirs, sources, arch):
    folder, _ = exports(arch, "fp32")
    _, tok, sets, _ = sources[arch]
    assert backend_for(str(folder)) == ONNX_GENAI
    assert backend_for(str(folder), TRANSFORMERS) == ONNX_GENAI  # nothing else reads the folder
    # each validation prompt without the source's answer (its first target position)
    prompts = [e.input_ids[:next(i for i, t in enumerate(e.labels) if t != -100)] for e in sets["answers"][:3]]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    with open_model(str(folder), threads=2) as lm, open_model(str(hf_dirs[arch]), TRANSFORMERS, "cpu",
                                                                  "float32") as hf:
        assert lm.backend == ONNX_GENAI and lm.max_batch == 1
        ours = lm.generate(prompts, params, lm.stop_ids(), batch_size=1)
        theirs = hf.generate(prompts, params, hf.stop_ids(), batch_size=1)
        assert ours == theirs
        assert sum(len(a) for a in ours) > 0
        assert set(hf.stop_ids()) <= set(lm.stop_ids())
        assert lm.num_parameters() == hf.num_parameters()
        assert lm.vocab_rows == hf.vocab_rows
        assert lm.tokenize("Hello, world! 你好") == hf.tokenize("Hello, world! 你好")
        # target rows line up with transformers' (batch of two right-padded sequences)
        seqs = [sets["answers"][0], sets["answers"][1]]
        width = max(len(e.input_ids) for e in seqs)
        ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in seqs])
        attn = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in seqs])
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in seqs])
        a = lm.target_logits(ids, attn, labels, len(tok))
        b = hf.target_logits(ids, attn, labels, len(tok))
        assert a.shape == b.shape and float((a - b.float()).abs().max()) < 1e-4
        seeded = SamplingParams(max_tokens=8, temperature=0.8, seed=3)
        assert len(lm.generate(prompts[:1], seeded, lm.stop_ids())[0]) <= 8
        speed = lm.decode_speed(prompts[0], 8, repeats=1)
        assert speed["decode_tokens_per_s"] > 0 and speed["ttft_s"] > 0 and speed["threads"] == 2
        with pytest.raises(ValueError):
            lm.decode_speed(prompts[0], 8, batch=2)


def test_int8_export_roundtrip(exports):
    from kdforge.export.onnx import judge, metrics

    folder, summary = exports("llama", "int8")
    m = metrics(summary["roundtrip"])
    print(f"llama int8: {summary['bytes'] / 1e6:.1f} MB, max|Δlogit| {m['max_abs_diff']:.3g}, top-1 {m['top1']:.4f}")
    assert judge("int8", summary["roundtrip"]) == []  # top-1 >= 97 % on the answers
    # no size bound: at width 64 the (tied, so written twice) embedding dominates, and the int8 builder
    # keeps it in fp32 beside the quantised output projection
    assert b"MatMulNBits" in (folder / "model.onnx").read_bytes()


def test_backend_for_refuses_llama_cpp_on_onnx_folder(exports):
    from kdforge.config import ConfigError

    folder, _ = exports("llama", "fp32")
    with pytest.raises(ConfigError):
        backend_for(str(folder), LLAMA_CPP)
    with pytest.raises(ConfigError):
        backend_for("embedded:smollm2-135m-instruct", ONNX_GENAI)


def test_export_stage_to_onnx(tmp_path, hf_dirs):
    from kdforge.artifacts import product, read_meta
    from kdforge.stages.export import ExportConfig, run

    cfg = ExportConfig(model=str(hf_dirs["llama"]), out=str(tmp_path / "export"), to="onnx", check_prompts=2)
    assert cfg.quant == ["fp32"]  # the GGUF default (f16) is no ONNX type
    metrics = run(cfg)
    assert metrics["fp32"]["top1"] == 1.0 and metrics["fp32"]["max_abs_diff"] < 1e-4
    folder = product(tmp_path / "export", "fp32")
    assert folder is not None and folder.name == "onnx-fp32" and (folder / "genai_config.json").is_file()
    assert backend_for(str(folder)) == ONNX_GENAI
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["problems"] == [] and report["to"] == "onnx"
    assert read_meta(tmp_path / "export")["stage"] == "export"


def test_export_config_quant_names_follow_the_format():
    from pydantic import ValidationError

    from kdforge.stages.export import ExportConfig

    assert ExportConfig(model="m", to="onnx", quant="int4 int8").quant == ["int4", "int8"]
    assert ExportConfig(model="m").quant == ["f16"]  # GGUF unchanged
    assert ExportConfig(model="m", to="onnx", onnx_options={"accuracy_level": 1}).onnx_options == {"accuracy_level": 1}
    with pytest.raises(ValidationError):
        ExportConfig(model="m", to="onnx", quant=["q8_0"])
    with pytest.raises(ValidationError):
        ExportConfig(model="m", quant=["int4"])  # an ONNX type for GGUF


def test_bytes_on_disk_counts_the_graph_and_its_weights(exports):
    from kdforge.eval.speed import bytes_on_disk

    folder, summary = exports("llama", "fp32")
    graph = [p for p in folder.iterdir() if p.name.endswith((".onnx", ".onnx.data"))]
    assert {p.name for p in graph} >= {"model.onnx"}
    assert bytes_on_disk(str(folder)) == sum(p.stat().st_size for p in graph) > 0
    assert bytes_on_disk(str(folder)) < summary["bytes"]  # the tokenizer, configs and card are no weights


def test_onnx_folder_has_a_model_card(exports, hf_dirs):
    from kdforge.models.model_card import read_front_matter, refresh_model_card

    for quant in ("fp32", "int4"):
        folder, summary = exports("llama", quant)
        meta = read_front_matter(folder)
        assert meta["library_name"] == "onnxruntime-genai" and meta["pipeline_tag"] == "text-generation"
        assert {"onnx", "onnxruntime-genai", quant} <= set(meta["tags"])
        assert ("quantized" in meta["tags"]) == (quant != "fp32")
        text = (folder / "README.md").read_text()
        assert "kdforge export --to onnx" in text and "## Round trip against the source" in text
        assert "import onnxruntime_genai as og" in text and "`kdforge serve" in text
        info = json.loads((folder / "kdforge.json").read_text())
        assert info["roundtrip"]["top1"] == summary["roundtrip"]["logits"]["answers"]["top1"]
        assert info["builder"]["execution_provider"] == "cpu"
    # kdforge eval rewrites it with its figures (record_evaluation -> refresh_model_card)
    folder, _ = exports("llama", "fp32")
    fig = {"kl": 0.0, "top1": 1.0, "disk_mb": 1.5}
    assert refresh_model_card(folder, {"report": "r.json", "data": "d", "split": "validation", "examples": 3,
                                       "models": 2, "created": "2026-12-02", "teacher": fig, "model": fig})
    assert "`kdforge eval` of 2026-12-02" in (folder / "README.md").read_text()


def test_eval_with_an_onnx_student(exports, hf_dirs, tmp_path):
    """A whole `kdforge eval` report with the fp32 ONNX folder as a student: it agrees with its HF source, its
    runtime, disk size (the .onnx graph and its .onnx.data) and batch-1 speed are in the report, and its card
    gets the figures."""
    from kdforge.cli import main
    from kdforge.eval.speed import bytes_on_disk

    folder, _ = exports("llama", "fp32")
    src = str(hf_dirs["llama"])
    rows = [{"id": f"v{i}", "prompt": f"What is {i} plus {i}?", "split": "validation", "category": "math"}
            for i in range(3)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["generate", src, "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "gen"),
                 "--max-new-tokens", "6"]) == 0
    assert main(["eval", "--teacher", src, "--students", src, str(folder), "--names", "hf", "onnx",
                 "--data", str(tmp_path / "gen"), "--out", str(tmp_path / "ev"), "--task-limit", "1",
                 "--set", "task_max_new_tokens=4", "--set", "code_max_new_tokens=4", "--set", "stability_prompts=1",
                 "--set", "stability_samples=2", "--set", "stability_max_new_tokens=4", "--set", "decode_tokens=4",
                 "--set", "speed_batch=2", "--set", "threads=1", "--set", "plots=false"]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    hf, onnx = report["models"][1], report["models"][2]
    assert (hf["backend"], onnx["backend"]) == (TRANSFORMERS, ONNX_GENAI)
    assert onnx["top1"] == 1.0 and onnx["kl"] < 1e-6 and abs(onnx["nll"] - hf["nll"]) < 1e-4
    assert onnx["params_m"] == pytest.approx(hf["params_m"])
    assert onnx["size"]["disk_bytes"] == bytes_on_disk(str(folder)) > 0
    assert onnx["speed"]["decode_tokens_per_s_b1"] > 0 and onnx["speed"]["decode_tokens_per_s_bn"] is None
    assert "`kdforge eval` of" in (folder / "README.md").read_text()
