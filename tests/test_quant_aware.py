"""Quantisation-aware distillation: the grid, the straight-through gradient, training, and an export that
writes exactly the trained values."""

import json

import pytest
import torch

from kdforge.distill.quant_aware import quant_aware
from kdforge.export.gguf_writer import GGUFExportError, write_gguf
from kdforge.models.quant_grid import decompose, fake_quantize, on_grid, reference_scales
from kdforge.stages.distill import DistillConfig
from kdforge.stages.distill import run as run_distill

from .conftest import make_tiny
from .test_distill import _pair, data_file  # noqa: F401, F811  (the module-scoped data fixture)


def _gguf_roundtrip(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """``w`` through gguf's own reference quantiser and back (what llama.cpp's converter would write)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    t = {"q4_0": Q.Q4_0, "q8_0": Q.Q8_0}[qtype]
    return torch.from_numpy(dequantize(quantize(w.numpy(), t), t).reshape(w.shape))


@pytest.mark.parametrize("grid", ["q4_0", "q8_0"])
def test_grid_values_survive_the_reference_quantiser_bit_for_bit(grid):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1) * 0.1  # rows of different scales
    w[3, :32] = 0.0  # an all-zero block stays zero
    q = fake_quantize(w, grid)
    assert not torch.equal(q, w) and on_grid(q, grid) and not on_grid(w, grid)
    assert torch.equal(fake_quantize(q, grid), q)  # idempotent
    assert torch.equal(_gguf_roundtrip(q, grid), q)  # the file a converter writes holds these values
    assert torch.equal(q[3, :32], torch.zeros(32))
    # Rounding to nearest: each value moves by at most half a step of its block (the block's scale d), but
    # Q4_0's +7 end is one step short of the -8 the largest magnitude maps to: values there move up to d.
    d = (q.reshape(64, -1, 32).abs().amax(-1) / {"q4_0": 8, "q8_0": 127}[grid]).repeat_interleave(32, 1)
    bound = {"q4_0": 1.0, "q8_0": 0.5}[grid] * d * (1 + 1e-3) + 1e-12
    assert ((q - w).abs() <= bound).all()
    # gguf's (and llama.cpp's) reference rounds with the unrounded scale, then stores it in fp16; the grid
    # rounds with the stored scale. The two differ only where that moves a value across a rounding boundary.
    assert (_gguf_roundtrip(w, grid) == q).float().mean() > 0.98


def test_straight_through_gradient_and_a_tied_embedding_quantised_once():
    model = make_tiny("llama", 256, seed=1)
    ref = make_tiny("llama", 256, seed=1)
    qa = quant_aware(model, "q4_0", pure=True)
    # Embedding and head share one latent weight, recorded once (as the GGUF's token_embd).
    assert "model.embed_tokens.weight" in qa.tensors and "lm_head.weight" not in qa.tensors
    assert qa.grids == {}  # pure: the tied embedding on q4_0 too
    assert model.lm_head.parametrizations.weight.original is model.model.embed_tokens.parametrizations.weight.original
    assert len(qa.tensors) == 1 + 2 * 7 and qa.kept == []
    # The forward computes with the grid values: equal to a copy whose weights were rounded by hand.
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                p.copy_(fake_quantize(p, "q4_0"))
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids, labels=ids)
    expected = ref(ids, labels=ids)
    assert torch.equal(out.logits, expected.logits)
    # Straight through: the latent weight's gradient is the grid weight's gradient.
    out.loss.backward()
    expected.loss.backward()
    latent = model.model.layers[0].mlp.up_proj.parametrizations.weight.original
    assert torch.equal(latent.grad, ref.model.layers[0].mlp.up_proj.weight.grad)
    emb = model.model.embed_tokens.parametrizations.weight.original
    assert torch.equal(emb.grad, ref.model.embed_tokens.weight.grad)
    qa.materialise()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert all(on_grid(p.detach(), "q4_0") for p in model.parameters() if p.dim() == 2)


def test_keep_patterns_and_rows_off_the_block_size():
    model = make_tiny("qwen2", 256, seed=1)
    qa = quant_aware(model, "q8_0", keep=[r"embed_tokens", r"\.down_proj\."])
    assert "model.embed_tokens.weight" in qa.kept and "lm_head.weight" in qa.tensors  # untied head: its own
    assert all("down_proj" not in n for n in qa.tensors)
    with pytest.raises(ValueError, match="no weight is left"):
        quant_aware(make_tiny("llama", 256), "q4_0", keep=["."])


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_distill_on_the_q4_0_grid_then_export_writes_the_trained_weights(tokenizer, tmp_path, data_file, arch):  # noqa: F811
    """The trained folder is on the grid and says so; its Q4_0 GGUF dequantises to exactly those weights, and
    transformers reading the GGUF gets them back bit for bit (Llama's q/k permutation undone)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t, s = _pair(tmp_path, tokenizer, arch)
    out = tmp_path / "qat"
    run_distill(DistillConfig(teacher=t, student=s, data=str(data_file), out=str(out), max_steps=4, batch_size=2,
                              lr=3e-3, log_every=1, eval_every=2, val_limit=2, quant_aware="q4_0"))
    config = json.loads((out / "config.json").read_text())
    record = config["kdforge_quant_aware"]
    assert record["grid"] == "q4_0" and record["kept"] == []
    trained = load_file(out / "model.safetensors")
    start = load_file(f"{s}/model.safetensors")
    grids = record["grids"]  # the output projection (tied: the embedding) on q8_0, as llama.cpp's Q4_0 keeps it
    assert set(grids.values()) == {"q8_0"} and len(grids) == 1 and record["scales"] == "reference"
    for name in record["tensors"]:
        assert on_grid(trained[name], grids.get(name, "q4_0")), name
    # Training moved weights across grid points: not the start's own rounding.
    moved = sum(int((trained[n] != fake_quantize(start[n], grids.get(n, "q4_0"))).sum()) for n in record["tensors"])
    assert moved > 0
    # Norms and biases are trained in full precision (GGUF keeps them f32).
    assert any(not torch.equal(trained[n], start[n]) for n in trained if trained[n].dim() == 1)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    from kdforge.export.calibration import calibrated_names

    # Nothing to calibrate for a file of the trained grid (its values are written as they are); another grid is
    # calibrated as usual.
    assert calibrated_names(model, ["q4_0"]) == [] and len(calibrated_names(model, ["q8_0"])) == len(record["tensors"])
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, tok, path, "q4_0")
    assert summary["quant_aware"] == {"grid": "q4_0", "tensors": len(record["tensors"]), "kept_f16": [],
                                      "grids": grids, "scales": "reference", "exact": True}
    assert summary["tensor_types"].get("f16", 0) == 0 and summary["tensor_types"]["q8_0"] == 1
    # Written --pure, the q8_0-trained output projection would be re-rounded: refused, with the way out.
    with pytest.raises(GGUFExportError, match="without --pure"):
        write_gguf(model, tok, tmp_path / "pure.gguf", "q4_0", pure=True)
    assert not (tmp_path / "pure.gguf").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    for name in record["tensors"]:
        assert torch.equal(back[name], trained[name]), name
    # A Q8_0 file of it is an ordinary export, said so.
    assert write_gguf(model, tok, tmp_path / "m8.gguf", "q8_0")["quant_aware"]["exact"] is False

    # Changed after training (off the grid): refused, nothing written.
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    with pytest.raises(GGUFExportError, match="no longer on it"):
        write_gguf(model, tok, tmp_path / "bad.gguf", "q4_0")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.integration
def test_learned_scales_train_and_export_exactly(tokenizer, tmp_path, data_file):  # noqa: F811
    """``quant_aware_scales: learned``: block scales move off the reference choice during training, and the
    Q4_0 GGUF written from the folder holds the trained values bit for bit (read back by transformers)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t, s = _pair(tmp_path, tokenizer, "llama")
    out = tmp_path / "qat"
    run_distill(DistillConfig(teacher=t, student=s, data=str(data_file), out=str(out), max_steps=4, batch_size=2,
                              lr=1e-3, log_every=1, quant_aware="q4_0", quant_aware_scales="learned",
                              quant_aware_scale_lr=1e-2))
    record = json.loads((out / "config.json").read_text())["kdforge_quant_aware"]
    assert record["scales"] == "learned"
    trained = load_file(out / "model.safetensors")
    assert not any("log_scale" in k or k.endswith(".d0") for k in trained)  # a plain HF folder
    off_reference = 0
    for name in record["tensors"]:
        grid = record["grids"].get(name, "q4_0")
        d, _ = decompose(trained[name], grid)
        off_reference += int((d != reference_scales(trained[name], grid)).sum())
    assert off_reference > 0  # scales were learned: not what the reference quantiser would pick
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    summary = write_gguf(model, AutoTokenizer.from_pretrained(out), tmp_path / "m.gguf", "q4_0")
    assert summary["quant_aware"]["exact"] and summary["quant_aware"]["scales"] == "learned"
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    for name in record["tensors"]:
        assert torch.equal(back[name], trained[name]), name


@pytest.mark.integration
def test_quant_aware_resume_repeats_the_uninterrupted_run(tokenizer, tmp_path, data_file):  # noqa: F811
    t, s = _pair(tmp_path, tokenizer)
    common = dict(teacher=t, student=s, data=str(data_file), max_steps=4, batch_size=2, lr=3e-3, log_every=1,
                  quant_aware="q8_0", save_every=2, keep_checkpoints=5)
    run_distill(DistillConfig(out=str(tmp_path / "full"), **common))
    # The same run stopped after its step-2 checkpoint: drop what came after, then resume.
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    cut = tmp_path / "cut"
    for p in ["model.safetensors", "meta.json"]:
        (cut / p).unlink()
    run_distill(DistillConfig(out=str(cut), **common), resume=True)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quant_aware_config_errors():
    base = dict(teacher="t", student="s", data="d")
    with pytest.raises(ValueError, match="method full"):
        DistillConfig(**base, quant_aware="q4_0", method="lora")
    with pytest.raises(ValueError, match="quant_aware is not"):
        DistillConfig(**base, quant_aware_keep=["embed"])
    with pytest.raises(ValueError, match="not a regular expression"):
        DistillConfig(**base, quant_aware="q4_0", quant_aware_keep=["("])
    with pytest.raises(ValueError, match="quant_aware"):
        DistillConfig(**base, quant_aware="q3_k")
    with pytest.raises(ValueError, match="quant_aware is not"):
        DistillConfig(**base, quant_aware_scales="learned")
    with pytest.raises(ValueError, match="use quant_aware_scales reference"):
        DistillConfig(**base, quant_aware="int4", quant_aware_scales="learned")


@pytest.mark.parametrize("grid", ["q4_0", "q8_0"])
def test_decompose_finds_any_fp16_scale(grid):
    """Blocks written with a scale other than the reference (GPTQ's, a learned one) are recognised and split
    into an fp16 scale and integers that give the values back exactly; values off every grid are not."""
    torch.manual_seed(0)
    lo, hi = {"q4_0": (-8, 7), "q8_0": (-127, 127)}[grid]
    q = torch.randint(lo, hi + 1, (16, 128))
    q[0, :32] = torch.randint(-3, 4, (32,))  # no value near the ends: the reference scale would not fit it
    d = (torch.rand(16, 4) * 0.01 + 1e-4).half()
    d[1, 0] = -d[1, 0]  # a negative scale (Q4_0's reference gives one whenever the largest value is positive)
    q[2, 32:64] = 0
    w = q.float() * d.float().repeat_interleave(32, 1)
    got = decompose(w, grid)
    assert got is not None
    dd, qq = got
    assert torch.equal(qq.float() * dd.float().repeat_interleave(32, 1), w) and qq.min() >= lo and qq.max() <= hi
    assert on_grid(w, grid)
    assert decompose(w + 1e-7 * torch.randn_like(w), grid) is None
    assert not on_grid(w * 1.0001, grid) or torch.equal(w * 1.0001, w)


def test_learned_scales_start_at_the_reference_grid_and_take_lsq_gradients():
    from kdforge.distill.quant_aware import LearnedScaleQuantize

    torch.manual_seed(0)
    w = (torch.randn(8, 64) * 0.05).requires_grad_()
    param = LearnedScaleQuantize("q4_0", w)
    out = param(w)
    assert torch.equal(out, fake_quantize(w.detach(), "q4_0"))  # exp(0) = 1: the reference scale
    g = torch.randn(8, 64)
    (out * g).sum().backward()
    # LSQ by hand: d(d·q)/dd = q - w/d inside the range, q where w/d was clamped; d/ds = d/dd · d (d = d0·e^s).
    d = reference_scales(w.detach(), "q4_0").float()  # (8, 2)
    x = w.detach().reshape(8, 2, 32) / d[..., None]
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)
    inside = (x >= -8) & (x <= 7)
    dd = torch.where(inside, q.clamp(-8, 7) - x, x.clamp(-8, 7).round())
    expected = (g.reshape(8, 2, 32) * dd).sum(-1) * d
    torch.testing.assert_close(param.log_scale.grad, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, g * inside.reshape(8, 64))  # straight through, none where clamped
    # A start already on the grid with scales that are not the reference choice (GPTQ's, read back from a
    # file) is reproduced exactly: its own scales are found and kept.
    q = torch.randint(-8, 8, (8, 64))
    q[0, :32] = torch.randint(-5, 6, (32,))  # largest |q| 5: the reference scale of these values differs
    start = q.float() * (torch.rand(8, 2) * 0.01 + 1e-3).half().float().repeat_interleave(32, 1)
    assert not torch.equal(fake_quantize(start, "q4_0"), start)
    assert torch.equal(LearnedScaleQuantize("q4_0", start)(start), start)
    with torch.no_grad():
        param.log_scale.add_(torch.randn(8, 2) * 0.1)
    moved = param(w).detach()
    assert on_grid(moved, "q4_0") and not torch.equal(decompose(moved, "q4_0")[0], reference_scales(moved, "q4_0"))


def _matmul_nbits_weights(model_path) -> dict[str, "torch.Tensor"]:
    """Each MatMulNBits node's weight as ONNX Runtime computes with it: (N, K) float32 = (q - 8) * scale, the
    4-bit values packed two per byte, low nibble first, blocks of ``block_size`` along K (symmetric: no zero
    point input, 8 implied)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path)).graph
    inits = {i.name: i for i in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: x.i for x in node.attribute}
        assert a["bits"] == 4 and (len(node.input) < 4 or not node.input[3]), "symmetric int4 expected"
        packed = numpy_helper.to_array(inits[node.input[1]])  # (N, K / block, block / 2) uint8
        scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(a["N"], -1)  # (N, K/block)
        q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(a["N"], -1)[:, :a["K"]].astype(np.float32)
        out[node.name] = torch.from_numpy((q - 8) * np.repeat(scales, a["block_size"], axis=1)[:, :a["K"]])
    return out


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int4_training_then_onnx_int4_holds_the_trained_weights(tokenizer, tmp_path, data_file, arch):  # noqa: F811
    """`--quant-aware int4` then ONNX Runtime GenAI's int4 builder (MatMulNBits, RTN, symmetric blocks of 32):
    every quantised matrix of the ONNX file is the trained one bit for bit (q, k, v fused by the builder)."""
    pytest.importorskip("onnxruntime_genai", reason="the onnx extra (pip install 'kdforge[onnx]')")
    from safetensors.torch import load_file

    from kdforge.export.onnx import run_builder

    t, s = _pair(tmp_path, tokenizer, arch)
    out = tmp_path / "qat"
    run_distill(DistillConfig(teacher=t, student=s, data=str(data_file), out=str(out), max_steps=2, batch_size=2,
                              lr=3e-3, quant_aware="int4"))
    trained = load_file(out / "model.safetensors")
    run_builder(str(out), tmp_path / "onnx", "int4", tmp_path / "cache", None)
    weights = _matmul_nbits_weights(tmp_path / "onnx" / "model.onnx")
    layers = {int(k.split(".")[2]) for k in trained if k.startswith("model.layers.")}
    expected = {}
    for i in layers:
        p = f"model.layers.{i}."
        expected[f"/model/layers.{i}/attn/qkv_proj/MatMul_Q4"] = torch.cat(
            [trained[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        for name, hf in [("attn/o_proj", "self_attn.o_proj"), ("mlp/gate_proj", "mlp.gate_proj"),
                         ("mlp/up_proj", "mlp.up_proj"), ("mlp/down_proj", "mlp.down_proj")]:
            expected[f"/model/layers.{i}/{name}/MatMul_Q4"] = trained[p + hf + ".weight"]
    head = trained.get("lm_head.weight", trained["model.embed_tokens.weight"])
    expected["/lm_head/MatMul_Q4"] = head
    assert set(expected) <= set(weights), sorted(weights)
    for name, w in expected.items():
        assert torch.equal(weights[name], w), name


def test_the_demo_q4_0_preset_runs_after_a_demo(tokenizer, tmp_path):
    """configs/demo-q4_0.yaml as shipped (quantisation-aware distill from the calibrated Q4_0 file with the fp32
    student as teacher, Q4_0 export of exactly those values, eval beside the calibrated file), on tiny stand-ins:
    only paths and sizes are overridden."""
    from pathlib import Path

    from kdforge.cli import main
    from kdforge.stages import plan_file

    from .conftest import save_tiny, write_conversations

    preset = Path(__file__).parent.parent / "configs" / "demo-q4_0.yaml"
    stages = {s.name: c for s, c in plan_file(str(preset))}
    assert list(stages) == ["distill", "export", "eval"]
    d = stages["distill"]
    assert d.quant_aware == "q4_0" and d.max_steps <= 40 and d.student.endswith("model-q4_0.gguf")
    assert stages["export"].model == d.out and stages["export"].quant == ["q4_0"]
    out = tmp_path / "run"
    data = write_conversations(tmp_path / "data.jsonl", [(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.")
                                                         for i in range(6)])
    save_tiny(out / "distill", "llama", tokenizer, seed=4)
    # The preset's prerequisite, as its header says: the calibrated Q4_0 file of the fp32 student.
    assert main(["export", str(out / "distill"), "--quant", "q4_0", "--calibration-samples", "4",
                 "--set", "export.check_prompts=2", "--out", str(out / "export-q4_0-calibrated")]) == 0
    sets = {"vars.out": out, "distill.data": data, "eval.data": data, "eval.split": "all",
            "vars.teacher": out / "distill", "distill.max_steps": 2, "distill.eval_every": 2, "distill.batch_size": 2,
            "export.check_prompts": 2, "eval.limit": 2, "eval.task_limit": 1, "eval.speed": False,
            "eval.stability_prompts": 0, "eval.plots": False}
    assert main(["run", str(preset), *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]) == 0
    report = json.loads((out / "export-q4_0" / "report.json").read_text())
    assert report["calibration"] is None  # every tensor was trained on the grid: nothing left to calibrate
    (summary,) = report["files"].values()
    assert summary["quant_aware"]["exact"], summary["quant_aware"]
    names = [r["name"] for r in json.loads((out / "eval-q4_0" / "report.json").read_text())["models"]]
    assert "student (Q4_0 GGUF, quantisation-aware)" in names
