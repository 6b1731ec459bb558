import pytest

from kdforge.models.loading import ModelLoadError, count_parameters, end_of_turn_ids, load_model, resolve_model


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found.*never downloads"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_model(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model(str(f))
    with pytest.raises(ModelLoadError, match="unknown embedded model"):
        resolve_model("embedded:gpt-17")


def test_unreadable_gguf_names_path(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model(str(bad))


def test_hf_folder_loads(tiny_model_dir, tokenizer):
    model, tok = load_model(str(tiny_model_dir))
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert count_parameters(model) > 0
    assert tok.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tok, model)


@pytest.mark.slow
def test_embedded_gguf_file_and_cached_folder_agree(embedded_folder):
    """(b) a GGUF file loads directly, and the cached conversion of (c) gives the same logits."""
    import torch

    from kdforge.models.loading import embedded_gguf_path

    a, tok = load_model(str(embedded_gguf_path("smollm2-135m-instruct")))
    b, _ = load_model("embedded:smollm2-135m-instruct")
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
