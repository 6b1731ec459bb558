"""`kdforge eval` of students whose tokenizer is not the teacher's: a trimmed vocabulary (the same tokens under
new ids) and another tokenizer (aligned spans), with the limit tests that pin the two paths to the ordinary one.

The teacher is a tiny Llama with a byte-level BPE trained in the test run (tests/tokenizer_kit.py); the other
student a tiny Llama with a SentencePiece-style BPE (llama folders: transformers 5 reloads a tokenizer saved in a
qwen2 folder as Qwen2's own).
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from kdforge.cli import main
from kdforge.data.chat import encode_conversation
from kdforge.distill.cross_teacher import Tokenizers
from kdforge.eval.tasks import load_tasks
from kdforge.scoring import TrimmedReading, agreement_by_category, cross_reading

from .conftest import make_tiny
from .test_eval import FAST, _json_numbers, _md_tables
from .tokenizer_kit import byte_level_bpe, sentencepiece_bpe

# Validation conversations: the first three are also the trimming data; the last two are held out, so the
# trimmed tokenizer spells them in other (shorter) tokens than the teacher's.
TURNS = [("facts", "Where is Paris?", "The capital of France is Paris. The capital of Japan is Tokyo."),
         ("facts", "Boil?", "Water boils at 100 degrees Celsius at sea level."),
         ("zh", "Beijing?", "中文的分词和英文不一样。北京是中国的首都。"),
         ("code", "Add", "def add(a, b):\n    return a + b\n"),
         ("facts", "KD?", "Knowledge distillation trains a small student to imitate a large teacher.")]
TRIMMED_ON = 3


def _rows(turns, split="validation", prefix="c"):
    return [{"id": f"{prefix}{i}", "category": cat, "split": split,
             "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            for i, (cat, u, a) in enumerate(turns)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _untied_llama(vocab: int, seed: int):
    """conftest's tiny Llama with its own output head: a tied random model repeats its last input token (here
    the newline after the generation prompt), so its greedy answers would all be empty."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                        tie_word_embeddings=False)).eval()


@pytest.fixture(scope="module")
def toks():
    return byte_level_bpe(), sentencepiece_bpe()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, toks):
    """Teacher, a trimmed copy (all layers), a student with another tokenizer, a same-tokenizer student, data."""
    from kdforge.models.vocab_trim import read_vocab_map

    root = tmp_path_factory.mktemp("evalcross")
    t_tok, s_tok = toks
    teacher = _untied_llama(len(t_tok), seed=1)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(12.0)  # peaked predictions: KL between models is not ~0
    teacher.save_pretrained(root / "teacher")
    t_tok.save_pretrained(root / "teacher")
    _write(root / "data.jsonl", _rows(TURNS))
    # The trimming data: the first conversations and the task prompts (so the trimmed tokenizer prompts as the
    # teacher's does).
    items = load_tasks("bundled", 2)
    trim_rows = _rows(TURNS[:TRIMMED_ON], "train") + _rows([("task", it.prompt, "ok") for it in items], "train",
                                                                 "task")
    trim = _write(root / "trim.jsonl", trim_rows)
    assert main(["student", str(root / "teacher"), "--out", str(root / "trimmed"), "--num-layers", "2",
                 "--trim-vocab", str(trim)]) == 0
    kept = read_vocab_map(root / "trimmed")
    assert len(kept) < len(t_tok)
    # The teacher's output rows of the dropped ids at 0 (below every kept logit of this peaked model): its greedy
    # answers then use kept ids only, the precondition for a trimmed student to give the same answers. The kept
    # rows, all the trimmed student has, are untouched.
    dropped = torch.ones(len(t_tok), dtype=torch.bool)
    dropped[kept] = False
    with torch.no_grad():
        teacher.lm_head.weight[dropped] = 0.0
    teacher.save_pretrained(root / "teacher")
    other = make_tiny("llama", len(s_tok), seed=2)
    other.save_pretrained(root / "other")
    s_tok.save_pretrained(root / "other")
    assert main(["student", str(root / "teacher"), "--out", str(root / "same"), "--num-layers", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def report_dir(setup):
    r = setup
    assert main(["eval", "--teacher", str(r / "teacher"), "--students", str(r / "same"), str(r / "trimmed"),
                 str(r / "other"), "--names", "same", "trimmed", "other", "--data", str(r / "data.jsonl"),
                 "--out", str(r / "ev"), *FAST, "--set", "task_max_new_tokens=8",
                 "--set", "code_max_new_tokens=12"]) == 0
    return r / "ev"


def _report(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    return report, {m["name"]: m for m in report["models"]}


def test_each_row_says_how_it_was_measured(report_dir):
    report, rows = _report(report_dir)
    assert [(m["tokenizer"], m["measured_on"]) for m in report["models"]] == [
        ("same", "tokens"), ("same", "tokens"), ("trimmed", "kept ids"), ("other", "aligned spans")]
    for m in rows.values():
        assert m["bits_per_byte"] > 0 and math.isfinite(m["bits_per_byte"]) and m["answer_tokens"] > 0
    assert rows["teacher"]["answer_tokens"] == report["target_tokens"] == rows["same"]["answer_tokens"]
    assert rows["teacher"]["kl"] == pytest.approx(0, abs=1e-6) and rows["teacher"]["top1"] == 1.0


def test_trimmed_student_with_all_layers_agrees_exactly(report_dir):
    """Its logits are the teacher's on the kept ids: KL over the kept ids exactly 0, top-1 exactly 1, also on the
    held-out conversations (the teacher reads the same shorter tokens), and the same greedy task answers."""
    report, rows = _report(report_dir)
    t = rows["trimmed"]
    assert t["kl"] == 0.0 and t["top1"] == 1.0
    assert all(c["kl"] == 0.0 and c["top1"] == 1.0 for c in t["by_category"].values())
    assert t["retokenized"] == len(TURNS) - TRIMMED_ON  # the held-out ones, and only those
    assert 0 < t["teacher_dropped_mass"] < 1  # a random teacher spreads mass over the ids the student lacks
    answers = [json.loads(x) for x in (report_dir / "task_answers.jsonl").read_text().splitlines()]
    by_model = {m: {a["id"]: a["answer"] for a in answers if a["model"] == m} for m in ("teacher", "trimmed")}
    assert by_model["trimmed"] == by_model["teacher"] and any(by_model["teacher"].values())
    assert t["tasks"] == rows["teacher"]["tasks"]


def test_gguf_of_a_trimmed_student_is_read_as_trimmed(setup, report_dir):
    """The export copies the vocabulary map beside the GGUF file: eval reads the file as the trimmed model it is
    (kept ids), with the folder's figures (f32: the same weights), not as an unrelated tokenizer (spans)."""
    from kdforge.models.vocab_trim import VOCAB_MAP_NAME

    r = setup
    assert main(["export", str(r / "trimmed"), "--to", "gguf", "--quant", "f32", "--out", str(r / "gguf"),
                 "--set", "check=false"]) == 0
    assert (r / "gguf" / VOCAB_MAP_NAME).read_bytes() == (r / "trimmed" / VOCAB_MAP_NAME).read_bytes()
    assert main(["eval", "--teacher", str(r / "teacher"), "--students", str(r / "gguf" / "model-f32.gguf"),
                 "--names", "gguf", "--data", str(r / "data.jsonl"), "--out", str(r / "ev-gguf"), *FAST,
                 "--set", "tasks=false"]) == 0
    got = {m["name"]: m for m in json.loads((r / "ev-gguf" / "report.json").read_text())["models"]}["gguf"]
    want = _report(report_dir)[1]["trimmed"]
    assert (got["tokenizer"], got["measured_on"]) == ("trimmed", "kept ids")
    assert got["retokenized"] == want["retokenized"] and got["answer_tokens"] == want["answer_tokens"]
    for k in ("kl", "top1", "nll", "teacher_dropped_mass"):
        assert got[k] == pytest.approx(want[k], abs=1e-4), k


def test_other_tokenizer_student_reports_span_figures(report_dir):
    report, rows = _report(report_dir)
    o = rows["other"]
    assert 0 < o["kl"] < 50 and 0 <= o["top1"] <= 1 and o["nll"] > 0
    assert 0 < o["spans"] <= o["aligned_tokens"] <= o["answer_tokens"] and 0.5 < o["coverage"] <= 1
    cats = o["by_category"]
    assert sum(c["spans"] for c in cats.values()) == o["spans"]
    assert sum(c["tokens"] for c in cats.values()) == o["answer_tokens"]
    for k, unit in (("kl", "spans"), ("top1", "spans"), ("nll", "tokens")):
        # Category means weighted by the model's own counts recombine into the overall mean.
        assert sum(c[k] * c[unit] for c in cats.values()) / o[unit.replace("tokens", "answer_tokens")] == \
            pytest.approx(o[k], rel=1e-9)
    # Prompted through its own tokenizer and chat template: every section ran for it.
    assert o["tasks"]["short_items"] == 2 and 0 <= o["stability"]["divergence"] <= 1
    assert o["speed"]["decode_tokens_per_s_b1"] > 0


def test_markdown_shows_the_new_figures_as_json_has_them(report_dir):
    report, rows = _report(report_dir)
    md = (report_dir / "report.md").read_text()
    numbers = _json_numbers(report)
    table = next(t for t in _md_tables(md) if t[0][:3] == ["model", "tokenizer", "KL and top-1 over"])
    for row, m in zip(table[1:], report["models"]):
        assert row[:5] == [m["name"], m["tokenizer"], m["measured_on"], str(m["answer_tokens"]),
                           f"{m['bits_per_byte']:.4f}"]
    assert table[4][5:] == [str(rows["other"]["spans"]), f"{rows['other']['coverage']:.3f}", "–", "–"]
    assert table[3][5:] == ["–", "–", str(rows["trimmed"]["retokenized"]),
                            f"{rows['trimmed']['teacher_dropped_mass']:.4f}"]
    for t in _md_tables(md):
        for r in t[1:]:
            for c in r[1:]:
                if re.fullmatch(r"-?\d+(\.\d+)?", c):
                    d = len(c.split(".")[1]) if "." in c else 0
                    assert any(f"{v:.{d}f}" == c for v in numbers), c
    assert "renormalised over them" in md and "per aligned span" in md
    assert (report_dir / "quality_vs_size.png").stat().st_size > 10_000


# Scoring-level limit tests: the two new paths reduce to the ordinary one where they must.

def _convs(tok):
    convs = [SimpleNamespace(messages=[{"role": "user", "content": u}, {"role": "assistant", "content": a}])
             for _, u, a in TURNS]
    return convs, [encode_conversation(tok, c.messages) for c in convs]


@pytest.fixture(params=["kit", "smollm2"])
def any_tok(request, toks):
    return toks[0] if request.param == "kit" else request.getfixturevalue("tokenizer")


def test_teacher_through_the_cross_path_agrees_with_itself(any_tok):
    """The teacher scored as a model with 'another' tokenizer that is its own: one span per token, KL 0, top-1 1,
    and NLL and bits per byte those of the ordinary path. A misaligned row or span would show here."""
    tok = any_tok
    teacher = make_tiny("llama", len(tok), seed=1)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(12.0)
    _, data = _convs(tok)
    r = cross_reading(Tokenizers.of(tok, tok), data, data, tok.pad_token_id)
    res = agreement_by_category(teacher, [teacher, teacher], data, ["a", "b", "a", "b", "a"], tok.pad_token_id,
                                len(tok), batch_size=2, readings=[None, r], tokenizer=tok)
    same, cross = res["models"]
    assert cross["spans"] == cross["aligned_tokens"] == cross["tokens"] == same["tokens"]
    assert cross["kl"] == pytest.approx(0, abs=1e-6) and cross["top1"] == 1.0
    assert cross["nll"] == pytest.approx(same["nll"], rel=1e-6)
    assert cross["bits_per_byte"] == pytest.approx(same["bits_per_byte"], rel=1e-6)


def test_cross_path_with_identical_tokenizers_is_the_token_kl(toks):
    """Another model with the same tokenizer through the span path: per-span KL = per-token KL (the hybrid loss
    with every token shared), NLL identical, span top-1 at least token top-1 (a prefix counts as agreeing); and
    the sums are those of distill's validation (CrossSetup.evaluate) on the same batch."""
    from kdforge.data.batching import collate
    from kdforge.distill.cross_losses import CrossObjective
    from kdforge.distill.cross_teacher import CrossSetup, CrossSignal
    from kdforge.distill.cross_tokenizer import span_index
    from kdforge.models.forward import target_logits

    tok = toks[0]
    teacher, student = make_tiny("llama", len(tok), seed=1), make_tiny("llama", len(tok), seed=3)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(12.0)
    _, data = _convs(tok)
    r = cross_reading(Tokenizers.of(tok, tok), data, data, tok.pad_token_id)
    res = agreement_by_category(teacher, [student, student], data, ["x"] * len(data), tok.pad_token_id, len(tok),
                                batch_size=len(data), readings=[None, r], tokenizer=tok)
    same, cross = res["models"]
    assert cross["kl"] == pytest.approx(same["kl"], rel=1e-5) and same["kl"] > 0.1
    assert cross["nll"] == pytest.approx(same["nll"], rel=1e-6)
    assert 1 >= cross["top1"] >= same["top1"]
    b = collate(data, tok.pad_token_id)
    with torch.no_grad():
        t_logits, targets = target_logits(teacher, b["input_ids"], b["attention_mask"], b["labels"], len(tok))
        s_logits, _ = target_logits(student, b["input_ids"], b["attention_mask"], b["labels"], len(tok))
    counts = (b["labels"][:, 1:] != -100).sum(1).tolist()
    signal = CrossSignal(t_logits, targets, None, span_index(r.spans, counts, counts))
    kl, top1, spans = CrossSetup(r.toks, len(tok), CrossObjective()).evaluate(s_logits, targets, signal)
    assert spans == cross["spans"]
    assert kl / spans == pytest.approx(cross["kl"], rel=1e-6) and top1 / spans == pytest.approx(cross["top1"])


def test_trimmed_path_with_every_id_kept_is_the_ordinary_path(toks):
    """A 'trimmed' reading that keeps every id (identity map) gives the ordinary figures, for a model that is not
    the teacher."""
    tok = toks[0]
    teacher, student = make_tiny("llama", len(tok), seed=1), make_tiny("llama", len(tok), seed=3)
    _, data = _convs(tok)
    from kdforge.models.token_bytes import token_bytes

    r = TrimmedReading(torch.arange(len(tok)), data, tok.pad_token_id, token_bytes(tok))
    res = agreement_by_category(teacher, [student, student], data, ["a", "b", "a", "b", "a"], tok.pad_token_id,
                                len(tok), batch_size=2, readings=[None, r], tokenizer=tok)
    same, trimmed = res["models"]
    assert trimmed["retokenized"] == 0 and trimmed["teacher_dropped_mass"] == pytest.approx(0, abs=1e-6)
    for k in ("nll", "kl", "top1", "bits_per_byte"):
        assert trimmed[k] == pytest.approx(same[k], rel=1e-6), k
        for c in ("a", "b"):
            assert trimmed["by_category"][c][k] == pytest.approx(same["by_category"][c][k], rel=1e-6)
