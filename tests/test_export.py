"""GGUF export, round-trip checks and torchao quantisation on tiny random Llama and Qwen2 models.

Reading a GGUF back through transformers parses its vocabulary item by item (~4 s per read for the
real 49,152-token tokenizer), so the logits tests use a 512-token byte-level BPE trained here, and
only the tokenizer tests use the embedded teacher's real tokenizer (conftest's `tiny_model_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge.export.gguf_writer import GGUFExportError, permute_qk, write_gguf
from kdforge.export.roundtrip import MIXED_TEXT, compare_ids, tokenizer_texts
from tests.conftest import EMBEDDED, QWEN_STYLE_TEMPLATE, make_tiny


@pytest.fixture(scope="module")
def small_tokenizer():
    """A 512-token byte-level BPE (ChatML special tokens at ids 0-2, like SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kdforge.data.prompts import load_prompt_set

    corpus = [c.messages[0]["content"] for c in load_prompt_set("bundled")] + [MIXED_TEXT]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = QWEN_STYLE_TEMPLATE
    return tok


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def small_model(request, small_tokenizer):
    """(arch, model): Llama with tied embeddings; Qwen2 untied with q/k/v biases (non-zero, so they count)."""
    model = make_tiny(request.param, len(small_tokenizer), seed=1)
    if request.param == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return request.param, model


def _ids(n: int = 48, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, n), generator=g)  # (B, T)


def _reload(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@torch.inference_mode()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()  # (B, T, V)


@pytest.mark.parametrize("quant, tol", [("f32", 1e-5), ("f16", 5e-3)])
def test_float_export_roundtrips_logits(small_model, small_tokenizer, tmp_path, quant, tol):
    arch, model = small_model
    path = tmp_path / f"m-{quant}.gguf"
    summary = write_gguf(model, small_tokenizer, path, quant)
    assert summary["tied_embeddings"] == (arch == "llama")
    ids = _ids()
    ref, out = _logits(model, ids), _logits(_reload(path), ids)
    assert (out - ref).abs().max() < tol
    assert torch.equal(out.argmax(-1), ref.argmax(-1))  # top-1 agreement 100%


def test_q8_0_export_agrees(small_model, small_tokenizer, tmp_path):
    _, model = small_model
    path = tmp_path / "m-q8_0.gguf"
    write_gguf(model, small_tokenizer, path, "q8_0")
    ids = _ids(96)
    ref, out = _logits(model, ids), _logits(_reload(path), ids)
    # Q8_0 keeps ~8 bits per weight: logits stay within ~1% of their range.
    assert (out - ref).abs().max() / ref.abs().max() < 0.02
    # A random model's logits are nearly flat, so near-ties may flip: the >= 99% top-1 bar applies to
    # positions whose source top-1 leads the runner-up by more than 1% of the logit range (most of them).
    top2 = ref.topk(2, dim=-1).values  # (B, T, 2)
    confident = (top2[..., 0] - top2[..., 1]) > 0.01 * ref.abs().max()
    agree = out.argmax(-1) == ref.argmax(-1)
    assert confident.float().mean() > 0.5
    assert agree[confident].float().mean() >= 0.99
    assert agree.float().mean() >= 0.95


def test_llama_qk_permutation(small_tokenizer, tmp_path, monkeypatch):
    """Our permutation is the inverse of the one transformers' GGUF loader undoes, and it matters."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of dim 8, 3 inputs
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 4})
    assert np.array_equal(undo._reverse_permute_weights(permute_qk(w, 4), 4, 4), w)
    assert not np.array_equal(permute_qk(w, 4), w)
    # Row 1 of head 0 (dim 1 of the first half) pairs with dim 1 + 4 and lands next to it.
    assert np.array_equal(permute_qk(w, 4)[2:4], w[[1, 5]])

    model = make_tiny("llama", len(small_tokenizer), seed=2)
    ids = _ids()
    ref = _logits(model, ids)
    monkeypatch.setattr("kdforge.export.gguf_writer.permute_qk", lambda w, n_head: w)
    write_gguf(model, small_tokenizer, tmp_path / "unpermuted.gguf", "f32")
    wrong = _logits(_reload(tmp_path / "unpermuted.gguf"), ids)
    assert (wrong - ref).abs().max() > 1e-3  # without the permutation the file computes something else


def test_tokenizer_ids_and_metadata_roundtrip(tiny_model_dir, tmp_path):
    """The real SmolLM2 tokenizer (Llama folder; Qwen2 folder loads as Qwen2Tokenizer) survives the file."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path / "t.gguf"
    summary = write_gguf(model, tok, path, "f16")
    expected_pre = "qwen2" if model.config.model_type == "qwen2" else "smollm"
    assert summary["tokenizer"]["pre"] == expected_pre

    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = tokenizer_texts(tok)
    assert len(texts) == 2 and "<|im_start|>" in texts[1]
    result = compare_ids([tok(t)["input_ids"] for t in texts], [back(t)["input_ids"] for t in texts])
    assert result["match"], result

    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == expected_pre
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.convert_tokens_to_ids("<|im_start|>")] == 3  # control
    assert types[100] == 1  # normal


def test_keep_f16_tensors_stay_f16(small_model, small_tokenizer, tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    arch, model = small_model
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, small_tokenizer, path, "q4_0", keep_f16=["token_embd", "output"])
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["token_embd.weight"] == Q.F16
    if arch == "qwen2":  # untied: its own output matrix
        assert types["output.weight"] == Q.F16
        assert types["blk.0.attn_q.bias"] == Q.F32
    else:
        assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.ffn_down.weight"] == Q.Q4_0
    assert types["blk.1.attn_q.weight"] == Q.Q4_0
    assert types["output_norm.weight"] == Q.F32
    assert set(summary["kept_f16"]) == {n for n, t in types.items() if t == Q.F16}


def test_unsupported_architecture_is_a_clear_error(small_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(small_tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(GGUFExportError, match=r"supports Llama .* and Qwen2 .*GPT2LMHeadModel"):
        write_gguf(model, small_tokenizer, tmp_path / "gpt2.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_rows_not_dividing_into_blocks(small_tokenizer, tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    # hidden 48: every projection reading the hidden state has rows of 48, not a multiple of 32.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(small_tokenizer), hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(GGUFExportError, match=r"rows of 48 values, not a multiple of Q8_0's block size 32"):
        write_gguf(model, small_tokenizer, tmp_path / "bad.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []
    summary = write_gguf(model, small_tokenizer, tmp_path / "ok.gguf", "q8_0", allow_fallback=True)
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "ok.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == Q.F16 and "blk.0.attn_q.weight" in summary["fallback_f16"]
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0  # rows of 64 divide
    ids = _ids()
    assert torch.equal(_logits(_reload(tmp_path / "ok.gguf"), ids).argmax(-1), _logits(model, ids).argmax(-1))


def test_no_half_written_file_after_failure(small_tokenizer, tmp_path, monkeypatch):
    from gguf import quants

    from kdforge.cli import main

    model = make_tiny("llama", len(small_tokenizer), seed=3)
    model.save_pretrained(tmp_path / "src")
    small_tokenizer.save_pretrained(tmp_path / "src")
    real = quants.quantize
    calls = {"n": 0}

    def failing(data, qtype):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError("disk full (simulated)")
        return real(data, qtype)

    monkeypatch.setattr(quants, "quantize", failing)
    with pytest.raises(OSError, match="simulated"):
        write_gguf(model, small_tokenizer, tmp_path / "out" / "m.gguf", "q4_0")  # Q4_0 uses gguf's quantiser
    assert list((tmp_path / "out").iterdir()) == []  # neither m.gguf nor its temporary file

    # Q8_0 and calibrated rounding pack matrices themselves: the 3rd call left is a norm after several matrices.
    calls["n"] = 9
    with pytest.raises(OSError, match="simulated"):
        main(["export", str(tmp_path / "src"), "--quant", "q8_0", "--out", str(tmp_path / "art"), "--no-check"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no artifact, no temp folder


def test_cli_export_writes_artifact_with_roundtrip_report(small_tokenizer, tmp_path):
    from kdforge.artifacts import read_meta
    from kdforge.cli import main

    model = make_tiny("qwen2", len(small_tokenizer), seed=4)
    model.save_pretrained(tmp_path / "src")
    small_tokenizer.save_pretrained(tmp_path / "src")
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "src"), "--to", "gguf", "--quant", "f16", "q8_0", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"model-f16.gguf", "model-q8_0.gguf", "report.json", "meta.json",
                                               "config.yaml"}
    report = json.loads((out / "report.json").read_text())
    f16 = report["files"]["f16"]["roundtrip"]
    assert set(f16["transformers"]) == {"answers", "prompt_text"}
    # A random model's near-tied logits may swap under f16 rounding; the teacher gets 100% (docs).
    for figures in f16["transformers"].values():
        assert figures["top1"] >= 0.99 and figures["max_abs_diff"] < 5e-3 and figures["tokens"] > 0
        assert abs(figures["agreement_top1"] - figures["top1"]) < 0.02  # the shared scorer agrees
    assert f16["tokenizer"]["match"]
    assert report["files"]["q8_0"]["roundtrip"]["transformers"]["answers"]["top1"] >= 0.95
    assert all("tokenizer" not in p for p in report["problems"])
    # Calibrated rounding by default: statistics from the model's answers to the training prompts, used for
    # every q8_0 matrix (7 per layer, and the untied output projection); f16 files need none.
    assert report["calibration"]["source"] == "auto" and report["calibration"]["tokens"] > 0
    assert report["files"]["q8_0"]["calibrated_tensors"] == 7 * 2 + 1
    assert report["files"]["f16"]["calibrated_tensors"] == 0
    meta = read_meta(out)
    assert meta["stage"] == "export" and set(meta["metrics"]) == {"f16", "q8_0"}
    assert main(["export", str(tmp_path / "src"), "--quant", "q3_k", "--out", str(tmp_path / "x")]) == 2


def test_detect_pre(tokenizer):
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from kdforge.export.gguf_tokenizer import detect_pre, tokenizer_metadata

    assert detect_pre(tokenizer)[0] == "smollm"
    qwen_like = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    qwen_like.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert detect_pre(qwen_like)[0] == "qwen2"
    assert tokenizer_metadata(tokenizer, pre="gpt-2").pre == "gpt-2"
    # Embedding rows beyond the tokenizer (Qwen2.5-style padding) become unused [PAD] tokens.
    meta = tokenizer_metadata(tokenizer, vocab_rows=len(tokenizer) + 3)
    assert meta.tokens[-1] == f"[PAD{len(tokenizer) + 2}]" and meta.token_types[-3:] == [5, 5, 5]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_torchao_quantize_saves_and_reloads(small_tokenizer, tmp_path, method):
    from kdforge.export.torch_quant import folder_bytes, load_quantized, reload_quantized, save_quantized

    src = tmp_path / "src"
    # hidden 128 / FFN 256 so the Linear weights, not the embedding, dominate the size.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(small_tokenizer), hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    model.save_pretrained(src)
    small_tokenizer.save_pretrained(src)
    qmodel, _ = load_quantized(str(src), method, device="cpu")
    save_quantized(qmodel, small_tokenizer, tmp_path / "q")
    files = {p.suffix for p in (tmp_path / "q").iterdir()}
    assert ".safetensors" in files and not files & {".bin", ".pt", ".pth"}  # no pickle
    assert "quantization_config" in json.loads((tmp_path / "q" / "config.json").read_text())
    reloaded = reload_quantized(tmp_path / "q", device="cpu")
    assert "Int" in type(reloaded.model.layers[0].mlp.up_proj.weight).__name__  # still a torchao tensor
    ids = _ids(32)
    ref, q, back = _logits(model, ids), _logits(qmodel, ids), _logits(reloaded, ids)
    assert torch.equal(q, back)  # the saved folder computes exactly what was quantised
    rel = float((q - ref).abs().max() / ref.abs().max())
    assert rel < (0.02 if method == "int8" else 0.2)
    if method == "int8":
        assert folder_bytes(tmp_path / "q") < 0.6 * folder_bytes(src)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_bitsandbytes_without_cuda_is_a_clear_error():
    from kdforge.export.torch_quant import QuantizeError, quantization_config

    with pytest.raises(QuantizeError, match="needs a CUDA GPU"):
        quantization_config("nf4")


def test_llama_cpp_runs_the_file(tiny_model_dir, tmp_path):
    """llama.cpp itself (not transformers) reads the file: same ids, same logits (optional extra)."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.runtime import LLAMA_CPP, open_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    write_gguf(model, tok, tmp_path / "m.gguf", "f16")
    lm = open_model(str(tmp_path / "m.gguf"), backend=LLAMA_CPP)
    texts = tokenizer_texts(tok)
    assert compare_ids([tok(t)["input_ids"] for t in texts], [lm.tokenize(t) for t in texts])["match"]
    ids = tok(MIXED_TEXT)["input_ids"][:64]
    ref = _logits(model, torch.tensor([ids]))[0]
    out = lm.sequence_logits(ids)
    assert (out - ref).abs().max() < 5e-3 and torch.equal(out.argmax(-1), ref.argmax(-1))
    speed = lm.decode_speed(ids[:16], 8, repeats=1)
    assert speed["decode_tokens_per_s"] > 0 and speed["threads"] >= 1
    lm.close()


def test_llama_cpp_runs_the_q4_0_layout_with_a_q8_0_output(tiny_model_dir, tmp_path):
    """A Q4_0 file as kdforge lays it out by default (the tied embedding, llama.cpp's output projection, at Q8_0)
    is read by llama.cpp itself: its logits follow transformers' reading of the same file (llama.cpp also rounds
    activations to 8 bits in its Q4_0/Q8_0 dot products, hence the tolerance) with the same argmax."""
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.runtime import LLAMA_CPP, open_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    summary = write_gguf(model, tok, tmp_path / "m.gguf", "q4_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    out_name = "output.weight" if "output.weight" in types else "token_embd.weight"
    assert types[out_name] == "Q8_0" and types["blk.0.ffn_up.weight"] == "Q4_0", summary["tensor_types"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    lm = open_model(str(tmp_path / "m.gguf"), backend=LLAMA_CPP)
    ids = tok(MIXED_TEXT)["input_ids"][:64]
    ref = _logits(back, torch.tensor([ids]))[0]  # (T, V)
    out = lm.sequence_logits(ids)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    lm.close()


@pytest.mark.slow
def test_embedded_teacher_gguf_roundtrip(tmp_path):
    from kdforge.export.roundtrip import gguf_roundtrip, validation_sets
    from kdforge.models.loading import load_model

    model, tok = load_model(EMBEDDED, device="cpu", dtype="float32")
    sets = validation_sets(model, tok, n=4, new_tokens=24)
    summary = write_gguf(model, tok, tmp_path / "teacher-f16.gguf", "f16")
    assert summary["tokenizer"]["pre"] == "smollm" and summary["tied_embeddings"]
    report = gguf_roundtrip(model, tok, tmp_path / "teacher-f16.gguf", sets, with_llama_cpp=False)
    assert report["transformers"]["answers"]["top1"] == 1.0
    assert report["transformers"]["answers"]["max_abs_diff"] < 0.2
    assert abs(report["transformers"]["answers"]["nll_delta"]) < 0.005
    assert report["tokenizer"]["match"], report["tokenizer"]


def test_cli_quantize_writes_reloadable_artifact(small_tokenizer, tmp_path):
    from kdforge.artifacts import read_meta
    from kdforge.cli import main

    model = make_tiny("qwen2", len(small_tokenizer), seed=6)
    model.save_pretrained(tmp_path / "src")
    small_tokenizer.save_pretrained(tmp_path / "src")
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "src"), "--method", "int8", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["reload"]["max_abs_diff"] == 0.0
    assert report["agreement"]["answers"]["top1"] >= 0.9 and report["decode"]["quantized"]["threads"] >= 1
    meta = read_meta(out)
    assert meta["stage"] == "quantize" and meta["metrics"]["bytes"] == report["bytes"] < report["source_bytes"]
    assert main(["quantize", str(tmp_path / "src"), "--method", "fp3", "--out", str(tmp_path / "x")]) == 2


def test_padded_vocabulary_roundtrips(small_tokenizer, tmp_path):
    """Qwen2.5-style embedding rows beyond the tokenizer: one [PAD] token per extra row, same logits."""
    from gguf import GGUFReader

    model = make_tiny("qwen2", len(small_tokenizer), seed=7, extra_rows=5)
    path = tmp_path / "padded.gguf"
    write_gguf(model, small_tokenizer, path, "f32")
    fields = GGUFReader(path).fields
    assert len(fields["tokenizer.ggml.tokens"].data) == len(small_tokenizer) + 5
    ids = _ids()
    assert (_logits(_reload(path), ids) - _logits(model, ids)).abs().max() < 1e-5


def test_export_calibration_from_a_conversations_file(small_tokenizer, tmp_path):
    from kdforge.cli import main

    model = make_tiny("llama", len(small_tokenizer), seed=6)
    model.save_pretrained(tmp_path / "src")
    small_tokenizer.save_pretrained(tmp_path / "src")
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(i))}]} for i in range(3, 9)]
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "src"), "--quant", "q4_0", "--calibration", str(data),
                 "--calibration-samples", "4", "--no-check", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"] == str(data) and report["calibration"]["conversations"] == 4
    assert report["files"]["q4_0"]["calibrated_tensors"] == 7 * 2 + 1  # tied embedding: via lm_head's input
    # A calibration path that does not exist: a clear error before anything is written.
    assert main(["export", str(tmp_path / "src"), "--quant", "q8_0", "--calibration", str(tmp_path / "nope"),
                 "--no-check", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    # --calibration none: round to nearest, no statistics.
    assert main(["export", str(tmp_path / "src"), "--quant", "q8_0", "--calibration", "none", "--no-check",
                 "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert plain["calibration"] is None and plain["files"]["q8_0"]["calibrated_tensors"] == 0
