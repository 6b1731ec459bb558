"""Calibrated (GPTQ) rounding into Q8_0/Q4_0 blocks: the algorithm, the byte layout, the input statistics,
and the export path on tiny random Llama and Qwen2 models."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kdforge.export.gptq import (
    block_scales,
    collect_hessians,
    gptq_round,
    pack,
    reference_scales,
    round_to_nearest,
)
from tests.conftest import make_tiny
from tests.test_export import small_tokenizer  # noqa: F401  (a 512-token BPE: GGUF reads back in ms)

QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def _correlated_inputs(n: int = 2000, cols: int = 128, rank: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, cols) inputs living mostly in a low-rank subspace, like a transformer's hidden states."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, cols, generator=g) \
        + 0.1 * torch.randn(n, cols, generator=g)


def _output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float(((x @ (w - wq).T) ** 2).sum())  # Σ over tokens and outputs of the layer's output error


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_gptq_lowers_the_layer_output_error(qtype):
    torch.manual_seed(0)
    w = torch.randn(64, 128)  # (rows, cols)
    x_cal, x_new = _correlated_inputs(seed=0), _correlated_inputs(seed=0)[:1000]
    rtn = round_to_nearest(w, qtype)
    cal = gptq_round(w, x_cal.T @ x_cal, qtype)
    assert torch.equal(cal.d, rtn.d)  # same scales: only the integers differ
    assert cal.q.abs().max() <= (127 if qtype == "q8_0" else 8)
    # On inputs from the calibration distribution the output error drops by a large factor (~30x here).
    assert _output_error(x_new, w, cal.dequantize()) < 0.2 * _output_error(x_new, w, rtn.dequantize())


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_identity_statistics_give_round_to_nearest(qtype):
    w = torch.randn(16, 64)
    assert torch.equal(gptq_round(w, torch.eye(64), qtype).q, round_to_nearest(w, qtype).q)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_packed_blocks_read_back_as_written(qtype):
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(1))
    w[0, :32] = 0.0  # an all-zero block: scale 0, values 0
    rounded = round_to_nearest(w, qtype)
    assert torch.equal(rounded.d, reference_scales(w, qtype))  # no block of these weights lies on a grid
    data = pack(rounded, qtype)
    assert data.shape == (8, 3 * gguf.GGML_QUANT_SIZES[QTYPES[qtype]][1])
    back = gguf.quants.dequantize(data, QTYPES[qtype]).reshape(8, 96)
    np.testing.assert_array_equal(back, rounded.dequantize().numpy())
    # Round to nearest is what the reference quantiser does (it divides by the fp32 scale, kdforge by the
    # stored fp16 one, so a value exactly between two steps may go the other way): same scales, values
    # within one step, nearly all identical.
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), QTYPES[qtype]), QTYPES[qtype]).reshape(8, 96)
    step = block_scales(w, qtype).float().abs().repeat_interleave(32, dim=1).numpy()
    assert (np.abs(back - ref) <= step * 1.001).all()
    assert (back == ref).mean() > 0.98
    # Nearest: within half a step (Q4_0's [-8, 7] clips the far end of the range, by up to one step).
    assert (np.abs(back - w.numpy()) <= step * (0.5 if qtype == "q8_0" else 1.0) * 1.001).all()


def test_rows_not_dividing_into_blocks_are_refused():
    with pytest.raises(ValueError, match="blocks of 32"):
        gptq_round(torch.randn(4, 40), torch.eye(40), "q8_0")


def test_hessians_count_real_tokens_and_share_inputs():
    model = make_tiny("llama", 128, seed=3)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 128, (n,), generator=g) for n in (9, 5, 7)]
    # One padded batch (right padding, masked) must give what the sequences give one by one.
    ids = torch.full((3, 9), 2)
    attn = torch.zeros(3, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], attn[i, :len(s)] = s, 1
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj",
             "lm_head"]
    padded = collect_hessians(model, [(ids, attn)], names)
    single = collect_hessians(model, [(s[None], torch.ones(1, len(s), dtype=torch.long)) for s in seqs], names,
                              max_bytes=1)  # one module per pass: the grouping must not change anything
    # By hand: the q_proj input is the first layer's normed embedding, real tokens only.
    inputs = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0][0]))
    with torch.no_grad():
        for s in seqs:
            model(s[None])
    h.remove()
    x = torch.cat(inputs)  # (21, 64)
    for n in names:
        torch.testing.assert_close(padded[n], single[n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[names[0]], x.T @ x, rtol=1e-4, atol=1e-4)
    assert padded[names[1]] is padded[names[0]]  # k_proj reads the same tensor as q_proj
    assert padded["lm_head"].shape == (64, 64) and padded[names[2]].shape == (128, 128)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_calibrated_export_is_closer_to_the_source(arch, small_tokenizer, tmp_path):  # noqa: F811
    """The whole path: statistics from calibration text, GPTQ blocks (Llama: q/k rows permuted after
    rounding) written to a GGUF that transformers reads back; Q4_0 so that the difference is large."""
    from transformers import AutoModelForCausalLM

    from kdforge.export.calibration import linear_for
    from kdforge.export.gguf_writer import plan_tensors, write_gguf
    tok = small_tokenizer
    model = make_tiny(arch, len(tok), seed=5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nearly low-rank embeddings: correlated hidden states, as a trained model's are
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape[0], 8, generator=g) @ torch.randn(8, emb.shape[1], generator=g) * 0.1
                  + 0.002 * torch.randn(emb.shape, generator=g))

    def text(n):
        return torch.randint(3, len(tok), (n, 64), generator=g)
    cal, held_out = text(24), text(8)
    # --pure: the tied embedding on Q4_0 too (by default it is Q8_0, where rounding matters far less).
    tensors = [t.hf_name for t in plan_tensors(model, "q4_0", pure=True) if t.qtype_name == "q4_0"]
    readers = {t: linear_for(model, t) for t in tensors}
    # Every Linear has a reader; the embedding too when tied (it is also the output projection), not
    # when untied (a lookup table: rounded to nearest).
    assert [t for t, m in readers.items() if m is None] == ([] if arch == "llama" else ["model.embed_tokens.weight"])
    readers = {t: m for t, m in readers.items() if m is not None}
    h = collect_hessians(model, [(cal, torch.ones_like(cal))], sorted(set(readers.values())))
    hessians = {t: h[m] for t, m in readers.items()}
    errors = {}
    for name, stats in [("nearest", None), ("calibrated", hessians)]:
        path = tmp_path / f"{name}.gguf"
        summary = write_gguf(model, tok, path, "q4_0", hessians=stats, pure=True)
        assert summary["calibrated_tensors"] == (len(hessians) if stats else 0)
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            ref, out = model(held_out).logits, back(held_out).logits  # (B, T, V)
        errors[name] = float(((out - ref) ** 2).mean())
    assert errors["calibrated"] < 0.7 * errors["nearest"], errors



def test_inputs_unseen_in_calibration_keep_their_weights():
    """A column whose input was always zero is rounded to nearest, not dropped: other text may use it."""
    w = torch.randn(8, 64)
    x = _correlated_inputs(500, 64)
    x[:, 5] = 0.0
    cal = gptq_round(w, x.T @ x, "q8_0")
    rtn = round_to_nearest(w, "q8_0")
    assert torch.equal(cal.q[:, 5], rtn.q[:, 5]) and cal.q[:, 5].abs().sum() > 0


def _on_q4_1_grid(w: torch.Tensor) -> torch.Tensor:
    """``w`` as a Q4_1 GGUF holds it: per block of 32, 16 evenly spaced levels ``m + d·j``."""
    q41 = gguf.GGMLQuantizationType.Q4_1
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q41), q41)).reshape(w.shape)


def _block_errors(w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    return ((w - wq) ** 2).reshape(w.shape[0], -1, 32).sum(-1)  # (rows, G)


def _reference_nearest(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded into Q8_0 with llama.cpp's amax/127 scales."""
    step = reference_scales(w, "q8_0").float().repeat_interleave(32, 1)
    return torch.round(w / step).clamp(-127, 127) * step


def test_q8_0_scales_fit_a_quantised_source_grid():
    """Weights dequantised from Q4_1 (like the embedded teacher) lose far less in Q8_0 with grid-fitted
    scales than with amax/127, and no block rounds worse than with the reference scale."""
    w = _on_q4_1_grid(torch.randn(64, 256, generator=torch.Generator().manual_seed(2)))
    fitted = round_to_nearest(w, "q8_0")
    d_ref = reference_scales(w, "q8_0")
    ref_err = _block_errors(w, _reference_nearest(w))
    fit_err = _block_errors(w, fitted.dequantize())
    assert (fitted.d != d_ref).float().mean() > 0.9  # nearly every block found its grid
    assert (fit_err <= ref_err * (1 + 1e-6)).all()
    assert fit_err.sum() < 0.3 * ref_err.sum()  # measured ~0.17x, as on the teacher
    assert fitted.q.abs().max() <= 127
    # GPTQ starts from the same fitted scales.
    assert torch.equal(gptq_round(w, torch.eye(256), "q8_0").d, fitted.d)


def test_grid_fit_leaves_trained_weights_and_q4_0_alone():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    fitted = round_to_nearest(w, "q8_0")
    d_ref = reference_scales(w, "q8_0")
    changed = fitted.d != d_ref
    assert changed.float().mean() < 0.02  # the odd block with a chance wide gap, and only where it helps
    ref_err = _block_errors(w, _reference_nearest(w))
    assert (_block_errors(w, fitted.dequantize())[changed] < ref_err[changed]).all()
    # Q4_0 keeps the reference scales: fitting measured no better there (docs/export-and-quantize.md).
    grid = _on_q4_1_grid(w)
    assert torch.equal(block_scales(grid, "q4_0"), reference_scales(grid, "q4_0"))


def test_q8_0_export_of_a_quantised_source_fits_its_grid(small_tokenizer, tmp_path, monkeypatch):  # noqa: F811
    """A Llama whose matrices came from a Q4_1 file, exported to Q8_0 without calibration: the file
    (q/k rows permuted after rounding) reads back closer to the source than with amax/127 scales."""
    from transformers import AutoModelForCausalLM

    import kdforge.export.gptq as gptq
    from kdforge.export.gguf_writer import write_gguf
    model = make_tiny("llama", len(small_tokenizer), seed=6)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(_on_q4_1_grid(p))
    held_out = torch.randint(3, len(small_tokenizer), (4, 48), generator=torch.Generator().manual_seed(4))
    errors, fitted = {}, {}
    for name in ("reference", "fitted"):
        if name == "reference":
            monkeypatch.setattr(gptq, "block_scales", gptq.reference_scales)
        else:
            monkeypatch.undo()
        path = tmp_path / f"{name}.gguf"
        fitted[name] = write_gguf(model, small_tokenizer, path, "q8_0")["grid_fitted_blocks"]
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            errors[name] = float(((back(held_out).logits - model(held_out).logits) ** 2).mean())
    blocks = sum(p.numel() // 32 for p in model.parameters() if p.ndim == 2)
    assert fitted["reference"] == 0 and fitted["fitted"] > 0.8 * blocks, (fitted, blocks)
    assert errors["fitted"] < 0.5 * errors["reference"], errors
