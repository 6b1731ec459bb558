"""Vocabulary transplant: a tokenizer trained like the base one, and embeddings carried over through bytes."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import AddedToken

from kdforge.models.token_bytes import byte_level_alphabet, special_ids, text_of, token_bytes
from kdforge.models.transplant import TransplantError, conversation_texts, train_tokenizer, transplant_vocabulary
from tests.conftest import make_tiny
from tests.tokenizer_kit import CORPUS, byte_level_bpe, sentencepiece_bpe

CONVERSATIONS = [[{"role": "user", "content": f"Tell me something, {i}."}, {"role": "assistant", "content": text}]
                 for i, text in enumerate(CORPUS)]
UNSEEN = "Zß Ω≈ 🤖👍🏽 é\n\t  x\x00\u200b ﷽ 𓀀 Ünïcødé — ｆｕｌｌ"  # characters the training texts never had


@pytest.fixture(scope="module")
def kit():
    return {"byte_level": byte_level_bpe(400), "sentencepiece": sentencepiece_bpe(300)}


def _base(name, kit, tokenizer):
    return tokenizer if name == "smollm2" else kit[name]


# ---------------------------------------------------------------------------------------------- (a)

@pytest.mark.parametrize("name, size", [("byte_level", 330), ("sentencepiece", 320), ("smollm2", 400)])
def test_trained_tokenizer_is_of_the_same_kind(name, size, kit, tokenizer):
    base = _base(name, kit, tokenizer)
    texts = conversation_texts(base, CONVERSATIONS)
    new = train_tokenizer(base, texts, size)
    assert len(new) <= size
    assert new.chat_template == base.chat_template
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(new, role) == getattr(base, role)
    specials = {base.convert_ids_to_tokens(i) for i in special_ids(base)}
    assert {new.convert_ids_to_tokens(i) for i in special_ids(new)} == specials
    assert list(range(len(specials))) == sorted(special_ids(new))  # ids 0..k-1, as the trainer numbers them
    vocab = new.get_vocab()
    if name == "sentencepiece":
        assert all(f"<0x{b:02X}>" in vocab for b in range(256))  # byte fallback has every byte
    else:
        assert set(byte_level_alphabet()) <= set(vocab)
    # Template markers are cut out of the texts before training: no learned piece holds a part of one.
    pieces = new.convert_ids_to_tokens(list(range(len(new))))
    learned = [p for i, p in enumerate(pieces) if i not in special_ids(new)]
    assert not [p for p in learned if "im_st" in p or "_of_turn" in p]
    table = token_bytes(new)
    for text in texts + [UNSEEN]:
        ids = new(text, add_special_tokens=False)["input_ids"]
        assert new.unk_token_id not in ids
        assert new.decode(ids) == text
    # The rendered template: each marker is its one special id, and the text between is spelled exactly.
    ids = new(texts[0], add_special_tokens=False)["input_ids"]
    eot = "<end_of_turn>" if name == "sentencepiece" else "<|im_end|>"
    assert ids.count(new.convert_tokens_to_ids(eot)) == texts[0].count(eot) >= 2
    plain = texts[0]
    for special in specials:
        plain = plain.replace(special, "")
    assert text_of(table, ids) == plain.encode()


def test_placeholders_are_dropped_unless_kept(kit):
    base = sentencepiece_bpe(300)
    base.add_tokens([AddedToken(f"<unused{i}>", special=True, normalized=False) for i in range(40)],
                    special_tokens=True)
    texts = conversation_texts(base, CONVERSATIONS)
    assert "<unused3>" not in train_tokenizer(base, texts, 320).get_vocab()
    kept = train_tokenizer(base, texts, 360, keep_placeholders=True)
    assert "<unused39>" in kept.get_vocab() and len(kept) <= 360


def test_a_large_alphabet_still_fits_the_size_through_byte_fallback():
    base = sentencepiece_bpe(300)
    rare = ["".join(chr(0x4E00 + 7 * i + k) for k in range(7)) for i in range(60)]  # 420 distinct CJK characters
    new = train_tokenizer(base, CORPUS + rare, 300)
    assert len(new) <= 300
    for text in rare[:5] + [UNSEEN]:
        ids = new(text, add_special_tokens=False)["input_ids"]
        assert new.decode(ids) == text and new.unk_token_id not in ids


def test_too_small_a_size_is_refused(kit):
    with pytest.raises(TransplantError, match="too small"):
        train_tokenizer(kit["byte_level"], CORPUS, 200)  # 256 bytes + 3 specials do not fit
    with pytest.raises(TransplantError, match="needs texts"):
        train_tokenizer(kit["byte_level"], [], 300)


# ---------------------------------------------------------------------------------------------- (b)

def _check_rows(old_tok, new_tok, old_w, new_w):
    """Every new row: a copy of the old row with the same bytes, else the mean of the rows of the old
    tokens spelling it (its text encoded, or its stray bytes as byte tokens). Returns (copies, means)."""
    old_table, new_table = token_bytes(old_tok), token_bytes(new_tok)
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(old_table):
        if b:
            by_bytes.setdefault(b, []).append(i)
    vocab = old_tok.get_vocab()
    byte_id = {b: vocab.get(f"<0x{b:02X}>", vocab.get(c)) for c, b in byte_level_alphabet().items()}
    copies = means = 0
    for j, b in enumerate(new_table):
        if not b:
            continue
        if b in by_bytes:
            assert any(torch.equal(new_w[j], old_w[i]) for i in by_bytes[b]), new_tok.convert_ids_to_tokens(j)
            copies += 1
            continue
        ids = []  # valid UTF-8 runs encoded as text, a stray byte (part of a character) as its byte token
        for run in re.findall("[\udc80-\udcff]|[^\udc80-\udcff]+", b.decode("utf-8", errors="surrogateescape")):
            if "\udc80" <= run[0] <= "\udcff":
                ids.append(byte_id[ord(run) - 0xDC00])
            else:
                ids += old_tok(run, add_special_tokens=False)["input_ids"]
        assert text_of(old_table, ids) == b and len(ids) > 1
        torch.testing.assert_close(new_w[j], old_w[ids].mean(0), rtol=1e-6, atol=1e-7)
        means += 1
    return copies, means


@pytest.mark.parametrize("old_kind, arch", [("byte_level", "llama"), ("sentencepiece", "qwen2")])
def test_rows_are_copies_or_means_across_tokenizer_kinds(old_kind, arch, kit):
    old_tok = kit[old_kind]
    new_tok = kit["sentencepiece" if old_kind == "byte_level" else "byte_level"]
    model = make_tiny(arch, len(old_tok), seed=3)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    stats = transplant_vocabulary(model, old_tok, new_tok)
    new_in = model.get_input_embeddings().weight.detach()
    assert new_in.shape == (len(new_tok), old_in.shape[1])
    copies, means = _check_rows(old_tok, new_tok, old_in, new_in)
    assert copies > 50 and means > 20
    if old_kind == "sentencepiece":
        # A byte-level piece that is part of a character (中 = e4 b8 ad) gets the mean of byte-fallback rows.
        partial = [j for j, b in enumerate(token_bytes(new_tok)) if b and not _utf8(b)]
        assert partial
    if arch == "qwen2":  # untied: the head gets its own rows by the same rule
        assert stats["tied"] is False
        _check_rows(old_tok, new_tok, old_out, model.get_output_embeddings().weight.detach())
    else:
        assert stats["tied"] is True and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # Control tokens: the same string, else the same role, else the mean of all rows.
    old_ids, new_ids = old_tok.get_vocab(), new_tok.get_vocab()
    same_role = {"<end_of_turn>": "<|im_end|>", "<eos>": "<|im_end|>", "<bos>": "<|im_start|>",
                 "<pad>": "<|endoftext|>", "<unk>": "<|endoftext|>"}
    if old_kind == "sentencepiece":
        same_role = {"<|im_end|>": "<end_of_turn>", "<|im_start|>": "<bos>", "<|endoftext|>": "<pad>"}
    for new_piece, old_piece in same_role.items():
        assert torch.equal(new_in[new_ids[new_piece]], old_in[old_ids[old_piece]]), new_piece
    if old_kind == "byte_level":  # <start_of_turn> has no counterpart in the ChatML tokenizer
        torch.testing.assert_close(new_in[new_ids["<start_of_turn>"]], old_in[:len(old_tok)].mean(0))
        assert stats["fallback_tokens"] == ["<start_of_turn>"]
    assert stats["exact"] + stats["mean"] + stats["control_by_role"] + stats["fallback"] == len(new_tok)
    assert stats["mean"] == means and stats["control_by_role"] == len(same_role)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_padding_rows_past_the_tokenizer_are_ignored(kit):
    old_tok, new_tok = kit["byte_level"], kit["sentencepiece"]
    model = make_tiny("llama", len(old_tok), extra_rows=24)  # rounded up like real checkpoints
    old_in = model.get_input_embeddings().weight.detach().clone()
    transplant_vocabulary(model, old_tok, new_tok)
    j = new_tok.convert_tokens_to_ids("<start_of_turn>")  # the mean of all rows: the tokenizer's rows only
    torch.testing.assert_close(model.get_input_embeddings().weight[j].detach(), old_in[:len(old_tok)].mean(0))


# ---------------------------------------------------------------------------------------------- (c)

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transplanted_student_runs_saves_and_loads(arch, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    new_tok = train_tokenizer(tokenizer, conversation_texts(tokenizer, CONVERSATIONS), 600)
    model = make_tiny(arch, len(tokenizer), seed=1)
    stats = transplant_vocabulary(model, tokenizer, new_tok)
    # SmolLM2's 49k pieces hold nearly every piece a 600-token BPE of the same kind learns. It has no token
    # for 21 bytes (0x04, 0xC0, 0xFF, ...): the new byte tokens for those get the mean of all rows.
    smol_lacks = [c for c in byte_level_alphabet() if c not in tokenizer.get_vocab()]
    assert stats["fallback"] == len(smol_lacks) and set(stats["fallback_tokens"]) <= set(smol_lacks)
    assert stats["exact"] > 3 * stats["mean"] > 0
    assert model.config.vocab_size == len(new_tok) == model.get_input_embeddings().num_embeddings
    eot = new_tok.convert_tokens_to_ids("<|im_end|>")
    assert model.config.eos_token_id == new_tok.eos_token_id and model.config.bos_token_id == new_tok.bos_token_id
    gen_eos = model.generation_config.eos_token_id
    assert eot in (gen_eos if isinstance(gen_eos, list) else [gen_eos])
    text = new_tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    ids = torch.tensor([new_tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(new_tok)) and torch.isfinite(logits).all()
    loss = model(input_ids=ids, labels=ids).loss  # the loss reads the model's own vocab size
    assert torch.isfinite(loss)

    model.save_pretrained(tmp_path)
    new_tok.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # transformers 5.24's AutoTokenizer loads any qwen2 folder as Qwen2Tokenizer, which swaps in Qwen's NFC
    # normalizer and pre-tokenizer (model_type qwen2 is in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), so a
    # Qwen2 student with another tokenizer must be read as the plain fast tokenizer it was saved as.
    back_tok = (AutoTokenizer if arch == "llama" else PreTrainedTokenizerFast).from_pretrained(tmp_path)
    assert back_tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    assert back_tok.chat_template == new_tok.chat_template and len(back_tok) == len(new_tok)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, logits)
    tied = back.get_output_embeddings().weight is back.get_input_embeddings().weight
    assert tied == (arch == "llama")
    out = back.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=back_tok.pad_token_id)
    assert out.shape[1] <= 12 and int(out.max()) < len(new_tok)


# ---------------------------------------------------------------------------------------------- (d)

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_tokenizer_transplant_is_the_identity(arch, tokenizer):
    model = make_tiny(arch, len(tokenizer), seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    stats = transplant_vocabulary(model, tokenizer, tokenizer)
    assert stats["exact"] == len(tokenizer) and stats["mean"] == stats["fallback"] == 0
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
