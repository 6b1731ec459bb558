"""Vocabulary trimming (kdforge.models.vocab_trim, `kdforge student --trim-vocab`): the kept data tokenises
exactly as before, no text ever gives a missing id, a trimmed student is the teacher on the kept ids."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kdforge.data.chat import encode_conversation, encode_prompt
from kdforge.models.token_bytes import token_bytes
from kdforge.models.vocab_trim import (
    VOCAB_MAP_NAME,
    VocabTrimError,
    check_trimmable,
    read_vocab_map,
    trim_model,
    trim_tokenizer,
    used_token_ids,
)

from .conftest import make_tiny, save_tiny, write_conversations
from .tokenizer_kit import sentencepiece_bpe

TURNS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a Python function that adds two numbers.", "def add(a, b):\n    return a + b\n"),
    ("What is 12 * 3?", "12 * 3 = 36, and 100 / 4 = 25."),
    ("北京是哪个国家的首都？", "北京是中国的首都。"),
    ("Say hello with an emoji", "Hello! 😀 Ça va? Naïve café, déjà vu."),
    ("Explain distillation in one line.", "Knowledge distillation trains a small student to imitate a teacher."),
]
CONVERSATIONS = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in TURNS] + [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Boiling point of water?"},
     {"role": "assistant", "content": "100 degrees Celsius at sea level."},
     {"role": "user", "content": "And in Fahrenheit?"}, {"role": "assistant", "content": "212 °F."}],
    [{"role": "user", "content": "A prompt without an answer: photosynthesis?"}],
]


def _bundled() -> list[list[dict]]:
    from kdforge.data.prompts import load_prompt_set

    return [c.messages for c in load_prompt_set("bundled")[:120]]


@pytest.fixture(scope="module", params=["smollm2", "sentencepiece"])
def trimmed(request, tokenizer):
    """(original, trimmed, kept_old_ids, conversations) for the real SmolLM2 tokenizer and a Gemma-style one."""
    tok = tokenizer if request.param == "smollm2" else sentencepiece_bpe()
    convs = CONVERSATIONS + _bundled()
    new, kept = trim_tokenizer(tok, used_token_ids(tok, convs))
    assert len(kept) < len(tok)
    return tok, new, kept, convs


def test_kept_data_tokenises_exactly_as_before(trimmed):
    tok, new, kept, convs = trimmed
    old_bytes, new_bytes = token_bytes(tok), token_bytes(new)
    for msgs in convs:
        before, after = encode_conversation(tok, msgs), encode_conversation(new, msgs)
        assert [kept[i] for i in after.input_ids] == before.input_ids
        assert [new_bytes[i] for i in after.input_ids] == [old_bytes[i] for i in before.input_ids]
        assert [x if x < 0 else kept[x] for x in after.labels] == before.labels  # the same assistant mask
        assert new.decode(after.input_ids) == tok.decode(before.input_ids)
        prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        assert [kept[i] for i in encode_prompt(new, prompt)] == encode_prompt(tok, prompt)


def test_trimmed_tokenizer_saves_and_loads_back_identically(trimmed, tmp_path):
    from transformers import AutoTokenizer

    tok, new, kept, convs = trimmed
    new.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.get_vocab() == new.get_vocab() and len(back) == len(kept)
    assert back.special_tokens_map == tok.special_tokens_map
    assert list(back.extra_special_tokens) == list(tok.extra_special_tokens)
    assert back.chat_template == tok.chat_template and back.padding_side == tok.padding_side
    assert json.loads(back.backend_tokenizer.to_str()) == json.loads(new.backend_tokenizer.to_str())
    for msgs in convs[:20]:
        assert encode_conversation(back, msgs).input_ids == encode_conversation(new, msgs).input_ids


_POOLS = {
    "ascii": [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r", "  "],
    "latin1": [chr(c) for c in range(0xA0, 0x100)],
    "cjk": [chr(c) for c in range(0x4E00, 0x9FFF)],
    "emoji": [chr(c) for c in range(0x1F300, 0x1FAFF)] + ["\u200d", "\ufe0f"],
    "combining": [chr(c) for c in range(0x300, 0x370)],
    "control": [chr(c) for c in list(range(0, 0x20)) + list(range(0x7F, 0xA0))],
    "other": [chr(c) for c in list(range(0x400, 0x4FF)) + list(range(0x600, 0x6FF)) + list(range(0x900, 0x97F))
              + list(range(0xE000, 0xE0FF)) + [0x10FFFD, 0xFFFD]] + ["\u2581", "<0x41>", "<|im_end|>", "<eos>"],
}


def _fuzz_strings(tok, n: int = 400, seed: int = 0) -> list[str]:
    """Random Unicode: one script per string, mixed scripts, and runs of the original vocabulary's own
    pieces (most of them dropped by the trim, so the trimmed tokenizer must spell them out)."""
    rng = random.Random(seed)
    names = sorted(_POOLS)
    pieces = [i for i in range(len(tok)) if i not in set(tok.all_special_ids)]
    out = []
    for k in range(n):
        if k % 3 == 0:
            pool = _POOLS[names[k // 3 % len(names)]]
            out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 30))))
        elif k % 3 == 1:
            out.append("".join(rng.choice(_POOLS[rng.choice(names)]) for _ in range(rng.randint(1, 30))))
        else:
            out.append("".join(tok.decode([rng.choice(pieces)]) for _ in range(rng.randint(1, 6))))
    return out


def test_fuzz_never_emits_a_missing_id_and_round_trips(trimmed):
    tok, new, kept, _ = trimmed
    k = len(kept)
    round_trips = longer = 0
    for s in _fuzz_strings(tok):
        old_ids, ids = tok(s, add_special_tokens=False)["input_ids"], new(s, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < k for i in ids), s
        assert new.unk_token_id not in ids or tok.unk_token_id in old_ids, s  # no unknowns the teacher had not
        assert new.decode(ids) == tok.decode(old_ids), s  # the same text, in more, shorter tokens
        longer += len(ids) > len(old_ids)
        if tok.decode(old_ids) == s:
            round_trips += 1
            assert new.decode(ids) == s
    assert round_trips > 300  # the check above ran on most strings (SentencePiece maps ▁ to a space)
    assert longer >= 30  # and many strings needed tokens the trim dropped


def test_merge_closure_matters(trimmed, monkeypatch):
    """Without the closure a derivation loses an intermediate token and the kept data tokenises differently."""
    tok, _, _, convs = trimmed
    monkeypatch.setattr("kdforge.models.vocab_trim.merge_closure", lambda spec, keep: set(keep))
    open_new, open_kept = trim_tokenizer(tok, used_token_ids(tok, convs))
    changed = [m for m in convs if [open_kept[i] for i in encode_conversation(open_new, m).input_ids]
               != encode_conversation(tok, m).input_ids]
    assert changed  # (the real closure changes none: test_kept_data_tokenises_exactly_as_before)
    assert all(0 <= i < len(open_kept) for m in changed for i in encode_conversation(open_new, m).input_ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trimmed_student_gives_the_teachers_logits_on_kept_ids(arch, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdforge.models.student import build_layer_student

    teacher = make_tiny(arch, len(tokenizer), layers=2)
    student = build_layer_student(teacher, [0, 1])
    new, kept = trim_tokenizer(tokenizer, used_token_ids(tokenizer, CONVERSATIONS))
    trim_model(student, kept)
    text = tokenizer.apply_chat_template(CONVERSATIONS[4], tokenize=False)
    old_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])  # (1, T)
    ids = torch.tensor([new(text, add_special_tokens=False)["input_ids"]])
    assert torch.equal(torch.tensor(kept)[ids], old_ids)
    with torch.no_grad():
        want = teacher(old_ids).logits[..., kept]  # (1, T, K)
        assert torch.equal(student(ids).logits, want)
    assert student.config.vocab_size == len(kept) == student.get_output_embeddings().weight.shape[0]
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == (arch == "llama")
    student.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)
    assert back.config.eos_token_id == kept.index(teacher.config.eos_token_id)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stage_writes_a_plain_trimmed_hf_folder(arch, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.artifacts import read_meta
    from kdforge.cli import main
    from kdforge.runtime import open_model
    from kdforge.runtime.sampling import SamplingParams

    teacher_dir = save_tiny(tmp_path / "teacher", arch, tokenizer)
    data = write_conversations(tmp_path / "data.jsonl", TURNS)
    out = tmp_path / "student"
    assert main(["student", str(teacher_dir), "--out", str(out), "--num-layers", "2", "--trim-vocab", str(data)]) == 0
    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    teacher, teacher_tok = AutoModelForCausalLM.from_pretrained(teacher_dir).eval(), AutoTokenizer.from_pretrained(
        teacher_dir)
    kept = read_vocab_map(out)
    assert (out / VOCAB_MAP_NAME).is_file() and kept is not None
    assert len(tok) == model.config.vocab_size == len(kept) < len(teacher_tok)
    meta = read_meta(out)
    m = meta["metrics"]
    assert (m["vocab_size_before"], m["vocab_size_after"]) == (len(teacher_tok), len(kept))
    assert m["embedding_params_after"] < m["embedding_params_before"]
    assert meta["files"]["vocab_map"] == VOCAB_MAP_NAME and meta["trim_vocab"]["sha256"]
    for u, a in TURNS:  # folders as any HF user loads them: the same tokens, the teacher's logits on them
        msgs = [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        ids, old = encode_conversation(tok, msgs).input_ids, encode_conversation(teacher_tok, msgs).input_ids
        assert [kept[i] for i in ids] == old
        with torch.no_grad():
            assert torch.equal(model(torch.tensor([ids])).logits, teacher(torch.tensor([old])).logits[..., kept])
    with open_model(str(out), device="cpu") as rt:  # what serve and eval load
        prompt = encode_prompt(rt.tokenizer, [{"role": "user", "content": TURNS[0][0]}])
        answer = rt.generate([prompt], SamplingParams(max_tokens=4, seed=0), rt.stop_ids())[0]
        assert all(0 <= i < len(kept) for i in answer)


def test_trim_split_train_keeps_the_validation_text_unseen(tokenizer, tmp_path):
    """trim_split=train: the validation conversations' tokens are not kept (unless the train split uses them);
    the trimmed tokenizer still encodes the validation text, in smaller pieces, without a missing id."""
    from transformers import AutoTokenizer

    from kdforge.artifacts import read_meta
    from kdforge.config import ConfigError
    from kdforge.stages.student import StudentConfig
    from kdforge.stages.student import run as run_student

    teacher_dir = save_tiny(tmp_path / "teacher", "llama", tokenizer)
    data = tmp_path / "data.jsonl"
    rows = [{"id": f"c{i}", "split": "validation" if i == 3 else "train",
             "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            for i, (u, a) in enumerate(TURNS)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    outs = {}
    for split in ("all", "train"):
        outs[split] = tmp_path / split
        run_student(StudentConfig(teacher=str(teacher_dir), out=str(outs[split]), num_layers=2,
                                  trim_vocab=str(data), trim_split=split))
    kept_all, kept_train = read_vocab_map(outs["all"]), read_vocab_map(outs["train"])
    assert set(kept_train) < set(kept_all)
    val_text = TURNS[3][1]  # the Chinese answer: its merged tokens are the validation split's only
    val_ids = tokenizer(val_text, add_special_tokens=False).input_ids
    assert not set(val_ids) <= set(kept_train) and set(val_ids) <= set(kept_all)
    tok = AutoTokenizer.from_pretrained(outs["train"])
    ids = tok(val_text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == val_text and len(ids) > len(val_ids) and max(ids) < len(kept_train)
    meta = read_meta(outs["train"])
    assert meta["trim_vocab"]["split"] == "train" and meta["trim_vocab"]["conversations"] == len(TURNS) - 1
    only_val = tmp_path / "val.jsonl"
    only_val.write_text(json.dumps(rows[3], ensure_ascii=False) + "\n")
    with pytest.raises(ConfigError, match="no train conversations"):
        run_student(StudentConfig(teacher=str(teacher_dir), out=str(tmp_path / "x"), num_layers=2,
                                  trim_vocab=str(only_val), trim_split="train"))
    assert not (tmp_path / "x").exists()


def test_trimmed_student_exports_to_gguf(tokenizer, tmp_path):
    """GGUF keeps working: the pre-tokenizer is still detected as SmolLM's (its specials, ids 0-3, are kept)
    and the file's tokenizer gives the same ids."""
    from transformers import AutoTokenizer

    from kdforge.export.gguf_writer import write_gguf

    new, kept = trim_tokenizer(tokenizer, used_token_ids(tokenizer, CONVERSATIONS))
    model = trim_model(make_tiny("llama", len(tokenizer)), kept)
    summary = write_gguf(model, new, tmp_path / "m.gguf", "f16")
    assert summary["tokenizer"]["pre"] == "smollm" and summary["tokenizer"]["tokens"] == len(kept)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for msgs in CONVERSATIONS:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        assert back(text, add_special_tokens=False)["input_ids"] == new(text, add_special_tokens=False)["input_ids"]


def test_unsupported_tokenizers_are_refused_with_a_way_out(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kdforge.cli import main

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]",
                                  chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    with pytest.raises(VocabTrimError, match="BPE tokenizers only.*without --trim-vocab"):
        check_trimmable(tok)
    make_tiny("llama", len(tok)).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    data = write_conversations(tmp_path / "d.jsonl", TURNS[:1])
    assert main(["student", str(tmp_path / "teacher"), "--out", str(tmp_path / "s"), "--trim-vocab", str(data)]) == 2
    assert not (tmp_path / "s").exists()


def test_vocab_map_round_trip_and_refusals(tmp_path):
    from kdforge.models.vocab_trim import write_vocab_map

    assert read_vocab_map(tmp_path) is None  # an untrimmed student: the teacher's vocabulary
    write_vocab_map(tmp_path, [0, 1, 5, 9], teacher_vocab_size=10)
    assert read_vocab_map(tmp_path) == [0, 1, 5, 9]
    write_vocab_map(tmp_path, [0, 5, 1], teacher_vocab_size=10)
    with pytest.raises(VocabTrimError, match="increasing"):
        read_vocab_map(tmp_path)


def test_special_tokens_after_the_vocabulary_are_renumbered_everywhere(tmp_path):
    """Qwen-style specials (added after the vocabulary) move down to the new ids: in the tokenizer, in the
    post-processor that adds BOS, in the model config and generation config."""
    from transformers import AutoTokenizer

    from .tokenizer_kit import byte_level_bpe

    tok = byte_level_bpe()
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "extra_special_tokens": ["<tool>"]})
    tok.add_bos_token = True  # a TemplateProcessing post-processor holding BOS's id
    n = len(tok)
    text = "The capital of France is Paris.<tool>"
    old_ids = tok(text)["input_ids"]
    assert old_ids[0] == tok.bos_token_id == n - 3 and tok.convert_tokens_to_ids("<tool>") in old_ids
    new, kept = trim_tokenizer(tok, used_token_ids(tok, CONVERSATIONS[:2]))
    assert kept[-3:] == [n - 3, n - 2, n - 1] and len(kept) < n - 3  # they moved
    assert (new.bos_token_id, new.eos_token_id) == (len(kept) - 3, len(kept) - 2)
    assert [kept[i] for i in new(text)["input_ids"]] == old_ids
    new.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == new(text)["input_ids"]

    model = make_tiny("qwen2", n)
    model.config.bos_token_id, model.config.eos_token_id = n - 3, [n - 2, 2]
    model.generation_config.eos_token_id = [n - 2, 2]
    trim_model(model, kept)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (len(kept) - 3, [len(kept) - 2, 2])
    assert model.generation_config.eos_token_id == [len(kept) - 2, 2]
    with pytest.raises(VocabTrimError, match="drops"):
        trim_model(make_tiny("llama", n), [0, 2, 5])  # the config's bos (1) is not kept
