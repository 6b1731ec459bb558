"""Cross-tokenizer distillation: byte alignment into spans, ULD, the hybrid loss, live and cached teachers.

Two small tokenizers trained in the test run (tests/tokenizer_kit.py): a byte-level BPE (SmolLM2/Qwen2 style,
ChatML turns) for the teacher and a SentencePiece-style BPE with byte fallback (Gemma style, its own turn
markers) for the student.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.config import ConfigError
from kdforge.data.chat import encode_conversation
from kdforge.distill.cross_losses import (
    UNSHARED,
    TeacherFirst,
    dense_teacher,
    hybrid,
    multi_token_spans,
    span_binary,
    span_student,
    span_top1,
    uld,
)
from kdforge.distill.cross_teacher import Tokenizers, target_ids
from kdforge.distill.cross_tokenizer import SENTINEL, SharedVocab, Span, align, prefix_map, shared_vocab, spelled
from kdforge.distill.losses import DIVERGENCES, divergence
from tests.conftest import make_tiny, write_conversations
from tests.tokenizer_kit import byte_level_bpe, sentencepiece_bpe

EMPTY = torch.zeros(0, dtype=torch.long)


@pytest.fixture(scope="module")
def toks():
    return byte_level_bpe(), sentencepiece_bpe()


def test_align_chinese_character_split_differently():
    # " 北京" = 20 | e5 8c 97 | e4 ba ac: the student splits 北 inside its bytes, the teacher after the space.
    student = [b" \xe5\x8c", b"\x97", b"\xe4\xba\xac"]
    teacher = [b" ", b"\xe5\x8c\x97", b"\xe4\xba\xac"]
    assert align(student, teacher) == [Span(0, 2, 0, 2), Span(2, 3, 2, 3)]
    # Identical tokenisations: one span per token.
    assert align(teacher, teacher) == [Span(i, i + 1, i, i + 1) for i in range(3)]


def test_align_end_of_turn_and_unmatched_bytes():
    # Both turns end with a control token (SENTINEL); the student's template adds "x" in front: unaligned.
    student = [b"x", b"ab", b"c", SENTINEL]
    teacher = [b"a", b"bc", SENTINEL]
    assert align(student, teacher) == [Span(1, 3, 0, 2), Span(3, 4, 2, 3)]
    # A side truncated early: only spans both sides hold.
    assert align([b"ab", b"cd"], [b"a", b"b", b"c"]) == [Span(0, 1, 0, 2)]


def test_align_real_tokenizers(toks):
    """Each span spells the same bytes on both sides, spans are contiguous and cover the whole answer,
    and the Chinese text is cut differently by the two tokenizers."""
    teacher, student = toks
    x = Tokenizers.of(teacher, student)
    answer = "The capital of France is Paris. 北京是中国的首都。"
    msgs = [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": answer}]
    s = spelled(x.s_table, target_ids(encode_conversation(student, msgs)))
    t = spelled(x.t_table, target_ids(encode_conversation(teacher, msgs)))
    assert b"".join(s) == b"".join(t) == answer.encode() + SENTINEL
    spans = align(s, t)
    assert spans[0].s0 == 0 and spans[0].t0 == 0 and spans[-1].s1 == len(s) and spans[-1].t1 == len(t)
    for a, b in zip(spans, spans[1:]):
        assert (a.s1, a.t1) == (b.s0, b.t0)
    for sp in spans:
        assert b"".join(s[sp.s0:sp.s1]) == b"".join(t[sp.t0:sp.t1])
    assert any((sp.s1 - sp.s0) != (sp.t1 - sp.t0) for sp in spans)  # the tokenisations really differ
    # Some teacher token ends inside a Chinese character's UTF-8 bytes (byte-level BPE does that).
    assert any(p and p[-1] >= 0x80 and p != SENTINEL and not _utf8_complete(p) for p in t)


def _utf8_complete(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _spans_of(m: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, v, generator=g), torch.randn(m, v, generator=g)


def test_uld_identical_is_zero_and_grows_with_difference():
    s, t = _spans_of(6, 40)
    lp = F.log_softmax(s, -1)
    cont = torch.tensor([0.0, -0.5, -1.0, 0.0, -2.0, -0.1])
    same = uld(lp, cont, TeacherFirst(lp, None, torch.zeros(6), cont), top_k=8)
    assert same.abs().max() == 0
    other = uld(lp, cont, TeacherFirst(F.log_softmax(t, -1), None, torch.zeros(6), cont), top_k=8)
    assert (other > 0).all()
    # With k covering the vocabulary, ULD is the plain L1 between the sorted vectors.
    full = uld(lp, torch.zeros(6), TeacherFirst(F.log_softmax(t, -1), None, torch.zeros(6), torch.zeros(6)), 40)
    ref = (lp.exp().sort(-1, descending=True).values - F.log_softmax(t, -1).exp().sort(-1, descending=True).values)
    torch.testing.assert_close(full, ref.abs().sum(-1))
    # ULD only sees sorted values: a permuted vocabulary is the same distribution to it.
    perm = uld(lp, torch.zeros(6), TeacherFirst(lp[:, torch.randperm(40)], None, torch.zeros(6), torch.zeros(6)), 8)
    assert perm.abs().max() < 1e-6


@pytest.mark.parametrize("unshared", UNSHARED)
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_hybrid_with_identical_tokenizers_is_the_same_tokenizer_divergence(kind, unshared):
    """The limit test: every token shared, every span one token -> exactly the ordinary divergence, values and
    gradients (bitwise), whatever becomes of unshared mass (there is none)."""
    s, t = _spans_of(9, 64)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ref = divergence(s1, t, kind, temperature=2.0, beta=0.3, skew=0.2)
    m = torch.arange(9)
    teacher = dense_teacher(t, torch.zeros(9, dtype=torch.long), m, EMPTY, EMPTY, 2.0)
    first, cont = span_student(F.log_softmax(s2 / 2.0, -1), torch.zeros(9, dtype=torch.long), m, EMPTY, EMPTY, 9)
    table = [bytes([65 + i % 26]) * (1 + i // 26) for i in range(64)]
    vocab = shared_vocab(table, table, [], [])
    assert torch.equal(vocab.t2s, torch.arange(64)) and torch.equal(vocab.prefix, torch.arange(64))
    got = hybrid(first, cont, teacher, vocab, kind, beta=0.3, skew=0.2, unshared=unshared)
    assert torch.equal(got, ref)
    # multi_token "binary": every span is one token on both sides, so nothing changes (values bitwise).
    multi = multi_token_spans(9, EMPTY, EMPTY)
    assert not multi.any()
    binary = hybrid(first, cont, teacher, vocab, kind, beta=0.3, skew=0.2, multi=multi,
                    s_own=torch.zeros(9, dtype=torch.long), unshared=unshared)
    assert torch.equal(binary, ref)
    ref.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-6, atol=1e-8)


def _paris(p_teacher: float = 0.8):
    """One span, " Paris": the student writes " Par" + "is" (q = 0.5, then 0.4: Q = 0.2), the teacher " Paris"
    (p = ``p_teacher``). Student ids [" Par", "is", " Paris", "x"], teacher ids [" Paris", " Par", "is", "y"]."""
    vocab = SharedVocab(torch.tensor([2, 0, 1, -1]), torch.tensor([False, False, False, True]))
    q = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.2, 0.4, 0.2, 0.2]])
    rest = (1 - p_teacher) / 3
    p = torch.tensor([[p_teacher, rest, rest, rest]])
    s = q.log().requires_grad_()
    actual = torch.tensor([0, 1])
    first, cont = span_student(F.log_softmax(s, -1), actual, torch.tensor([0]), torch.tensor([1]),
                               torch.tensor([0]), 1)
    teacher = dense_teacher(p.log(), torch.tensor([0]), torch.tensor([0]), EMPTY, EMPTY, 1.0)
    multi = multi_token_spans(1, torch.tensor([0]), EMPTY)
    return s, first, cont, teacher, vocab, multi, actual


def test_binary_multi_token_span_hand_checked():
    """multi_token binary on a span the two sides cut differently: forward KL over [the span as written, else],
    P = 0.8 (teacher " Paris"), Q = 0.5 · 0.4 = 0.2 (student " Par" "is"): 0.8 ln 4 + 0.2 ln(1/4) = 0.6 ln 4."""
    s, first, cont, teacher, vocab, multi, actual = _paris()
    assert multi.tolist() == [True]
    got = hybrid(first, cont, teacher, vocab, "forward_kl", multi=multi, s_own=actual[:1])
    assert got.item() == pytest.approx(0.6 * math.log(4), rel=1e-6)
    assert span_binary(torch.tensor([0.2]).log(), torch.tensor([0.8]).log()).item() == pytest.approx(
        0.6 * math.log(4), rel=1e-6)
    # Without multi the first-token comparison: another value (the bins " Paris" vs " Par" are not one event).
    old = hybrid(first, cont, teacher, vocab, "forward_kl")
    assert old.item() != pytest.approx(got.item(), rel=1e-2)


def test_binary_multi_token_gradient_follows_the_span_as_written():
    """First-token comparison: the KD gradient raises the student's " Paris" at the first row, a token its own
    tokenizer does not write there, against the CE. Binary: the first row's gradient is parallel to the CE's
    (raise " Par", lower " Paris") while the teacher is surer of the span (P > Q), anti-parallel when it is less
    sure (P < Q); the continuation row gets a gradient too."""
    ce_grad = torch.tensor([0.5, 0.1, 0.3, 0.1]) - torch.tensor([1.0, 0, 0, 0])  # d CE / d logits, first row
    s, first, cont, teacher, vocab, multi, actual = _paris()
    hybrid(first, cont, teacher, vocab, "forward_kl", uld_weight=0.0).sum().backward()
    assert s.grad[0, 2] < 0 < ce_grad[2]  # old: pushes " Paris" up, CE pushes it down
    for p_teacher, sign in ((0.8, 1.0), (0.1, -1.0)):
        s, first, cont, teacher, vocab, multi, actual = _paris(p_teacher)
        hybrid(first, cont, teacher, vocab, "forward_kl", multi=multi, s_own=actual[:1]).sum().backward()
        assert F.cosine_similarity(s.grad[0], sign * ce_grad, dim=0) == pytest.approx(1.0, abs=1e-6)
        assert sign * s.grad[0, 0] < 0 and sign * s.grad[0, 2] > 0
        assert sign * s.grad[1, 1] < 0  # "is" after " Par": raised when the teacher is surer of the span


def test_binary_cached_teacher_equals_live():
    """multi_token binary through cross_terms: a cache holding the whole teacher vocabulary (and the written
    tokens' log-probs) gives the live teacher's loss and gradients; spans of 2:1, 1:1 and 1:2 tokens."""
    from kdforge.distill.cross_losses import CrossObjective, cross_terms
    from kdforge.distill.cross_teacher import CrossSignal
    from kdforge.distill.cross_tokenizer import span_index
    from kdforge.distill.losses import SparseSignal
    from kdforge.softlabels.format import LOG_TAIL_FLOOR

    g = torch.Generator().manual_seed(11)
    v_s, v_t = 12, 10
    vocab = SharedVocab(torch.tensor([0, 1, 2, 3, 4, 5, -1, -1, 6, 7]), torch.arange(v_s) >= 8)
    index = span_index([[Span(0, 2, 0, 1), Span(2, 3, 1, 2), Span(3, 4, 2, 4)]], [4], [4])
    s_logits, t_logits = torch.randn(4, v_s, generator=g), torch.randn(4, v_t, generator=g) * 2
    s_targets, t_actual = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 8])
    lp = F.log_softmax(t_logits, -1)
    top, ids = lp.sort(-1, descending=True)
    cached = SparseSignal(ids, top, torch.full((4,), LOG_TAIL_FLOOR))
    obj = CrossObjective(multi_token="binary")
    out = []
    for teacher, own in ((t_logits, None), (cached, lp.gather(1, t_actual[:, None])[:, 0])):
        x = s_logits.clone().requires_grad_()
        terms = cross_terms(x, s_targets, 0, CrossSignal(teacher, t_actual, own, index), vocab, v_t, 0.5, 2.0, obj)
        terms["loss"].backward()
        out.append((terms["soft"], x.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-6)
    # Only the 1:1 span is scored by the shared bins: binary differs from first_token on the others.
    x = s_logits.clone()
    old = cross_terms(x, s_targets, 0, CrossSignal(t_logits, t_actual, None, index), vocab, v_t, 0.5, 2.0,
                      CrossObjective())["soft"]
    assert not torch.allclose(old, out[0][0])


def test_hybrid_unshared_tokens_use_uld_and_spans_continue():
    """Half the vocabulary unshared: the loss is finite, positive, has a gradient; a two-token span uses the
    second token's probability (changing it changes the loss)."""
    s, t = _spans_of(2, 20, seed=3)
    t2s = torch.where(torch.arange(20) < 10, torch.arange(20), torch.tensor(-1))
    s_unmapped = torch.arange(20) >= 10
    vocab = SharedVocab(t2s, s_unmapped)
    s = s.requires_grad_()
    lp = F.log_softmax(s, -1)
    actual = torch.tensor([3, 5])
    # Span 0 = row 0 alone; span 1 = rows 1 (first) ... but row 1 is also span 0's continuation here.
    first, cont = span_student(lp, actual, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), 1)
    assert torch.allclose(cont, lp[1, 5:6])
    teacher = dense_teacher(t, actual, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), 1.0)
    loss = hybrid(first, cont, teacher, vocab)
    assert torch.isfinite(loss).all() and (loss > 0).all()
    loss.sum().backward()
    assert s.grad.abs().sum() > 0 and s.grad[1].abs().sum() > 0  # the continuation row gets a gradient


def _unshared_case():
    """One one-token span. Teacher ids [" a", " b", " Paris", "y", " Part"], p = [.4, .2, .2, .1, .1]; student ids
    [" a", " b", " Par", "z"], q = [.3, .3, .2, .2]: " Paris" and " Part" have no student counterpart but start
    with " Par"; "y" starts with no student token, "z" is no teacher token."""
    t_table, s_table = [b" a", b" b", b" Paris", b"y", b" Part"], [b" a", b" b", b" Par", b"z"]
    vocab = shared_vocab(t_table, s_table, [], [])
    q = torch.tensor([[0.3, 0.3, 0.2, 0.2]])
    s = q.log().requires_grad_()
    first, cont = span_student(F.log_softmax(s, -1), torch.tensor([0]), torch.tensor([0]), EMPTY, EMPTY, 1)
    p = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]])
    teacher = dense_teacher(p.log(), torch.tensor([0]), torch.tensor([0]), EMPTY, EMPTY, 1.0)
    return s, first, cont, teacher, vocab


def test_prefix_map_takes_the_longest_student_prefix():
    t_table = [b" a", b" Paris", b" Part", b"y", None, b" a", b""]
    s_table = [b" a", b" P", b" Par", None, b"z"]
    vocab = shared_vocab(t_table, s_table, [], [])
    assert vocab.t2s.tolist() == [0, -1, -1, -1, -1, -1, -1]
    # " Paris"/" Part" -> " Par" (not " P"); a second teacher " a" -> the student's " a"; a control token, text
    # no student token starts, an empty token: none.
    assert vocab.prefix.tolist() == [0, 2, 2, -1, -1, 0, -1]
    assert prefix_map(t_table, {b" a": 0, b" P": 1}, vocab.t2s).tolist() == [0, 1, 1, -1, -1, 0, -1]
    t2s, s_unmapped = vocab.mapping("map_prefix")
    assert torch.equal(t2s, vocab.prefix) and s_unmapped.tolist() == [False, True, False, True, True]
    assert vocab.mapping("renormalise") == (vocab.t2s, vocab.s_unmapped)


def test_unshared_renormalise_hand_checked():
    """renormalise: both sides over the shared ids [" a", " b"] only: teacher [2/3, 1/3], student [1/2, 1/2]."""
    s, first, cont, teacher, vocab = _unshared_case()
    got = hybrid(first, cont, teacher, vocab, "forward_kl", uld_weight=0.0, unshared="renormalise")
    want = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # The default (uld) keeps the unshared mass in a rest bin (teacher .4, student .4: " Par" and "z" are
    # outside the shared bins): another value.
    old = hybrid(first, cont, teacher, vocab, "forward_kl", uld_weight=0.0)
    assert old.item() == pytest.approx(0.4 * math.log(4 / 3) + 0.2 * math.log(2 / 3), rel=1e-5)
    # The gradient only moves the student within the shared ids: its logits of " Par" and "z" get none.
    got.sum().backward()
    g = s.grad[0]
    assert g[0] < 0 < g[1] and g[2] == 0 and g[3] == 0


def test_unshared_map_prefix_hand_checked():
    """map_prefix: " Paris" and " Part" (.2 + .1) onto the student's " Par"; "y" (.1) stays in the rest bin against
    the student's "z" (.2): forward KL over [" a", " b", " Par", rest]."""
    s, first, cont, teacher, vocab = _unshared_case()
    got = hybrid(first, cont, teacher, vocab, "forward_kl", uld_weight=0.0, unshared="map_prefix")
    want = 0.4 * math.log(4 / 3) + 0.2 * math.log(2 / 3) + 0.3 * math.log(3 / 2) + 0.1 * math.log(1 / 2)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.sum().backward()
    assert s.grad[0, 2] < 0  # " Par" is raised toward the teacher's .3 (a gradient step lowers the loss)
    # With ULD kept: "y" vs "z" by rank, |.1 - .2| more.
    with_uld = hybrid(first, cont, teacher, vocab, "forward_kl", uld_weight=1.0, unshared="map_prefix")
    assert with_uld.item() == pytest.approx(want + 0.1, rel=1e-5)
    with pytest.raises(ValueError, match="unshared"):
        hybrid(first, cont, teacher, vocab, unshared="drop")


@pytest.mark.parametrize("unshared", ["renormalise", "map_prefix"])
def test_unshared_options_cached_teacher_equals_live(unshared):
    """Through cross_terms, a cache holding the whole teacher vocabulary gives the live teacher's loss and
    gradients; map_prefix sends teacher ids 6 and 2 to the same student id (merged in a cached row too)."""
    from kdforge.distill.cross_losses import CrossObjective, cross_terms
    from kdforge.distill.cross_teacher import CrossSignal
    from kdforge.distill.cross_tokenizer import span_index
    from kdforge.distill.losses import SparseSignal
    from kdforge.softlabels.format import LOG_TAIL_FLOOR

    g = torch.Generator().manual_seed(12)
    v_s, v_t = 12, 10
    t2s = torch.tensor([0, 1, 2, 3, 4, 5, -1, -1, 6, 7])
    vocab = SharedVocab(t2s, torch.arange(v_s) >= 8, torch.tensor([0, 1, 2, 3, 4, 5, 2, -1, 6, 7]))
    index = span_index([[Span(0, 2, 0, 1), Span(2, 3, 1, 2), Span(3, 4, 2, 4)]], [4], [4])
    s_logits, t_logits = torch.randn(4, v_s, generator=g), torch.randn(4, v_t, generator=g) * 2
    s_targets, t_actual = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 8])
    lp = F.log_softmax(t_logits, -1)
    top, ids = lp.sort(-1, descending=True)
    cached = SparseSignal(ids, top, torch.full((4,), LOG_TAIL_FLOOR))
    out = []
    for obj in (CrossObjective(unshared=unshared, uld_weight=0.0), CrossObjective(uld_weight=0.0)):
        for teacher, own in ((t_logits, None), (cached, lp.gather(1, t_actual[:, None])[:, 0])):
            x = s_logits.clone().requires_grad_()
            terms = cross_terms(x, s_targets, 0, CrossSignal(teacher, t_actual, own, index), vocab, v_t, 0.5, 2.0,
                                obj)
            terms["loss"].backward()
            out.append((terms["soft"], x.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0][0], out[2][0])  # not the default's loss


def test_span_top1_prefix_agreement():
    s_table = [b" Par", b"is", b" Lon", None]
    t_table = [b" Paris", b" London", None]
    s_first = torch.log_softmax(torch.tensor([[5.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0]]), -1)
    teacher = TeacherFirst(torch.log_softmax(torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0]]), -1), None,
                           torch.zeros(3), torch.zeros(3))
    assert span_top1(s_first, teacher, s_table, t_table).tolist() == [True, False, True]


def _tiny_pair(tmp_path, toks):
    teacher_tok, student_tok = toks
    paths = {}
    for name, tok, seed in (("teacher", teacher_tok, 0), ("student", student_tok, 1)):
        make_tiny("llama", len(tok), seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    turns = [("Where is Paris?", "The capital of France is Paris. 北京是中国的首都。"),
             ("Add", "def add(a, b):\n    return a + b\n"),
             ("Boil?", "Water boils at 100 degrees Celsius at sea level."),
             ("Hi", "Hello! How can I help you today? I'm happy to explain."),
             ("Math", "2 + 2 = 4, 12 * 3 = 36, and 100 / 4 = 25."),
             ("KD", "Knowledge distillation trains a small student to imitate a large teacher.")]
    paths["data"] = str(write_conversations(tmp_path / "data.jsonl", turns))
    return paths


def _distill(paths, out, **kw):
    from kdforge.stages.distill import DistillConfig, run

    cfg = dict(student=paths["student"], data=paths["data"], out=str(out), max_steps=3, batch_size=2,
               warmup_steps=0, log_every=1, lr=1e-3, split="all", seed=0) | kw
    run(DistillConfig(**cfg))
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_cached_and_live_cross_tokenizer_training_agree(tmp_path, toks):
    """The same steps from a cross-tokenizer cache (top-k = the whole teacher vocabulary) and from the live
    teacher: the same losses up to the cache's 8-bit log-prob codes, and the manifest says it is cross."""
    from kdforge.stages.label import LabelConfig
    from kdforge.stages.label import run as label

    paths = _tiny_pair(tmp_path, toks)
    live = _distill(paths, tmp_path / "live", teacher=paths["teacher"], loss="jsd", temperature=1.0)
    label(LabelConfig(teacher=paths["teacher"], data=paths["data"], out=str(tmp_path / "labels"),
                      top_k=len(toks[0]), cross_tokenizer=True))
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    assert manifest["cross_tokenizer"] is True
    assert (tmp_path / "labels" / "teacher_tokenizer" / "tokenizer.json").is_file()
    cached = _distill(paths, tmp_path / "cached", labels=str(tmp_path / "labels"), loss="jsd", temperature=1.0)
    for a, b in zip(live, cached):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-4)
        assert a["soft"] == pytest.approx(b["soft"], rel=2e-3, abs=1e-4)
        assert a["soft"] > 0
    # At another temperature the cache's top-k are re-tempered: still close with k = V.
    live_t = _distill(paths, tmp_path / "live_t", teacher=paths["teacher"], temperature=2.0, max_steps=1)
    cached_t = _distill(paths, tmp_path / "cached_t", labels=str(tmp_path / "labels"), temperature=2.0, max_steps=1)
    assert live_t[0]["soft"] == pytest.approx(cached_t[0]["soft"], rel=5e-3)


def test_uld_objective_trains_and_validation_reports_spans(tmp_path, toks):
    paths = _tiny_pair(tmp_path, toks)
    rows = _distill(paths, tmp_path / "uld", teacher=paths["teacher"], cross_tokenizer={"loss": "uld"},
                    split="all", eval_every=3, val_limit=4)
    assert all(r["soft"] > 0 for r in rows if "soft" in r)


def test_unshared_options_train_from_the_config(tmp_path, toks, monkeypatch):
    """cross_tokenizer.unshared reaches the objective; uld_weight defaults to 1 with uld, 0 with the others."""
    from kdforge.distill import cross_losses
    from kdforge.stages.distill import CrossTokenizerSettings

    assert CrossTokenizerSettings().unshared == "uld" and CrossTokenizerSettings().uld_weight is None
    seen = []
    orig = cross_losses.hybrid
    monkeypatch.setattr(cross_losses, "hybrid", lambda *a, **k: seen.append((a[7], a[11])) or orig(*a, **k))
    paths = _tiny_pair(tmp_path, toks)
    for unshared, weight in (("uld", 1.0), ("renormalise", 0.0), ("map_prefix", 0.0)):
        seen.clear()
        rows = _distill(paths, tmp_path / unshared, teacher=paths["teacher"], max_steps=1,
                        cross_tokenizer={"unshared": unshared})
        assert rows[0]["soft"] > 0 and set(seen) == {(weight, unshared)}
    seen.clear()
    _distill(paths, tmp_path / "w", teacher=paths["teacher"], max_steps=1,
             cross_tokenizer={"unshared": "map_prefix", "uld_weight": 0.5})
    assert set(seen) == {(0.5, "map_prefix")}


def test_same_tokenizer_cache_is_refused_for_a_student_with_another_tokenizer(tmp_path, toks):
    from kdforge.stages.label import LabelConfig
    from kdforge.stages.label import run as label

    paths = _tiny_pair(tmp_path, toks)
    label(LabelConfig(teacher=paths["teacher"], data=paths["data"], out=str(tmp_path / "labels"), top_k=8))
    assert "cross_tokenizer" not in json.loads((tmp_path / "labels" / "manifest.json").read_text())
    with pytest.raises(ConfigError, match="cross_tokenizer=true"):
        _distill(paths, tmp_path / "x", labels=str(tmp_path / "labels"))


def test_alignment_losses_are_refused_across_tokenizers(tmp_path, toks):
    paths = _tiny_pair(tmp_path, toks)
    with pytest.raises(ConfigError, match="hidden_loss and attention_loss"):
        _distill(paths, tmp_path / "x", teacher=paths["teacher"], hidden_loss="cosine")


@pytest.mark.parametrize(("multi_token", "unshared"), [("first_token", "uld"), ("binary", "uld"),
                                                      ("first_token", "renormalise"), ("binary", "map_prefix")])
def test_trainer_cross_path_with_one_tokenizer_equals_the_same_tokenizer_path(tokenizer, multi_token, unshared):
    """The whole trainer step (chunking at span boundaries, CE, T², normalisation) through the cross-tokenizer
    path with teacher tokenizer = student tokenizer gives the same-tokenizer step's losses and gradients."""
    from kdforge.data.formats import Conversation
    from kdforge.distill.cross_losses import CrossObjective
    from kdforge.distill.cross_teacher import CrossSetup, CrossTeacher, encode_pairs
    from kdforge.distill.schedules import Progress
    from kdforge.distill.teacher_source import LiveTeacher
    from kdforge.distill.trainer import Distiller, Objective, make_batch

    convs = [Conversation(id=f"c{i}", messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
             for i, (q, a) in enumerate([("Hi", "Hello there, how are you today?"),
                                         ("Sum", "2 + 2 = 4 and 3 + 5 = 8."), ("Zh", "北京是中国的首都。")])]
    encs = [encode_conversation(tokenizer, c.messages, 64) for c in convs]
    teacher = make_tiny("llama", len(tokenizer), seed=0)
    results = []
    for cross in (False, True):
        student = make_tiny("llama", len(tokenizer), seed=1).train()
        obj = Objective(loss="forward_kl", chunk_size=5, pack_length=None)
        live = LiveTeacher(teacher, len(tokenizer))
        setup = None
        pairs = None
        if cross:
            setup = CrossSetup(Tokenizers.of(tokenizer, tokenizer), len(tokenizer),
                               CrossObjective(multi_token=multi_token, unshared=unshared))
            live = CrossTeacher(live, setup.toks)
            pairs = encode_pairs(setup.toks, encs, convs, 64)
            assert all(len(p.spans) == p.s_targets for p in pairs)
        d = Distiller(obj, live, student, len(tokenizer), {}, None, cross=setup)
        batch = make_batch(encs, None, tokenizer.pad_token_id, pairs, tokenizer.pad_token_id)
        r = d.step([batch], Progress(0, 10, 1.0))
        results.append((r, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    for k in ("loss", "ce", "soft"):
        assert a[k] == pytest.approx(b[k], rel=1e-6), (k, a, b)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7)


def test_trimmed_student_distils_on_the_kept_ids_exactly(tokenizer, tmp_path):
    """A student trimmed from the teacher (all layers, same weights) has the teacher's logits on the kept ids, so
    with the ids mapped exactly its first-step KL is 0; with the map removed it would take the cross-tokenizer
    path, whose rest bin holds the teacher's mass on dropped ids (not 0)."""
    from kdforge.cli import main

    teacher = tmp_path / "teacher"
    make_tiny("llama", len(tokenizer), seed=0).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    data = write_conversations(tmp_path / "data.jsonl", [("Hi", "Hello there, how are you today?"),
                                                         ("Sum", "2 + 2 = 4 and 3 + 5 = 8."),
                                                         ("Zh", "北京是中国的首都。"), ("Fr", "Paris is in France.")])
    paths = {"student": str(tmp_path / "s"), "data": str(data), "teacher": str(teacher)}
    assert main(["student", str(teacher), "--out", paths["student"], "--num-layers", "2", "--trim-vocab",
                 str(data)]) == 0
    rows = _distill(paths, tmp_path / "mapped", teacher=str(teacher), max_steps=1, lr=1e-9)
    assert rows[0]["soft"] == 0.0
    # The distilled folder is trimmed from the same teacher: its id map travels with it.
    assert (tmp_path / "mapped" / "kdforge_vocab_map.json").read_bytes() == \
        (tmp_path / "s" / "kdforge_vocab_map.json").read_bytes()
    (tmp_path / "s" / "kdforge_vocab_map.json").unlink()
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta.get("files", {}).pop("vocab_map", None)
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    rows = _distill(paths, tmp_path / "cross", teacher=str(teacher), max_steps=1, lr=1e-9)
    assert rows[0]["soft"] > 0


def test_served_teacher_with_another_tokenizer_trains_as_from_the_cache(tmp_path, toks):
    """`kdforge distill --teacher URL` for a student with another tokenizer: the server scores its own encoding
    (top-k and each written token's log-prob), the spans line it up: the losses of the same teacher's
    cross-tokenizer top-k cache (up to the cache's quantisation)."""
    from kdforge.serve.launch import load_engine
    from kdforge.stages.label import LabelConfig
    from kdforge.stages.label import run as label

    from .test_serve import _stop
    from .test_served_teacher import _serve

    paths = _tiny_pair(tmp_path, toks)
    label(LabelConfig(teacher=paths["teacher"], data=paths["data"], out=str(tmp_path / "labels"), top_k=16,
                      cross_tokenizer=True, device="cpu"))
    cached = _distill(paths, tmp_path / "cached", labels=str(tmp_path / "labels"), device="cpu")
    eng = load_engine(paths["teacher"], max_batch=4)
    url, server, _ = _serve(eng)
    try:
        served = _distill(paths, tmp_path / "served", teacher=url, teacher_server={"tokenizer": paths["teacher"]},
                          teacher_top_k=16, device="cpu")
    finally:
        _stop(server)
        eng.shutdown()
    assert [r["soft"] for r in served] == pytest.approx([r["soft"] for r in cached], rel=2e-3)
    assert [r["ce"] for r in served] == pytest.approx([r["ce"] for r in cached], rel=1e-4)


def test_student_with_a_trained_tokenizer_distils_across_tokenizers(tmp_path, toks):
    """`kdforge student --train-tokenizer N`: a smaller tokenizer of the teacher's kind, embeddings from the
    teacher's rows; the folder loads and distils from the teacher through the cross-tokenizer path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.cli import main

    paths = _tiny_pair(tmp_path, toks)
    out = tmp_path / "transplanted"
    assert main(["student", paths["teacher"], "--out", str(out), "--num-layers", "2", "--train-tokenizer", "300",
                 "--tokenizer-data", paths["data"]]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tok) <= 300 and model.get_input_embeddings().weight.shape[0] == len(tok)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["metrics"]["vocab_size_after"] == len(tok) and meta["tokenizer"]["transplant"]["exact"] > 0
    rows = _distill({**paths, "student": str(out)}, tmp_path / "d", teacher=paths["teacher"], max_steps=2)
    assert all(r["soft"] > 0 for r in rows)
    # One vocabulary change at a time, and a trained tokenizer needs its data: clear errors, nothing written.
    assert main(["student", paths["teacher"], "--out", str(tmp_path / "x"), "--train-tokenizer", "300"]) == 2
    assert main(["student", paths["teacher"], "--out", str(tmp_path / "x"), "--trim-vocab", paths["data"],
                 "--tokenizer", paths["student"]]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_an_absent_topk_slot_is_no_bin(kind):
    """A cached top-k slot whose token a trimmed student lacks (id ABSENT) counts as if it were not there: the
    same values and gradients as the rows with that slot removed (the other bins renormalise)."""
    from kdforge.distill.losses import ABSENT, ABSENT_LOGP, sparse_divergence

    g = torch.Generator().manual_seed(5)
    n, v, k = 6, 50, 5
    logits = torch.randn(n, v, generator=g)
    t = F.log_softmax(torch.randn(n, v, generator=g) * 2, -1)
    lp, ids = t.topk(k, -1)
    tail = torch.log1p(-lp.exp().sum(-1))
    drop = torch.arange(n) % k  # a different slot in every row
    keep = torch.ones(n, k, dtype=torch.bool)
    keep[torch.arange(n), drop] = False
    s1, s2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = sparse_divergence(s1, torch.where(keep, ids, ABSENT), torch.where(keep, lp, ABSENT_LOGP), tail, kind, 2.0)
    ref = sparse_divergence(s2, ids[keep].view(n, k - 1), lp[keep].view(n, k - 1), tail, kind, 2.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)


def test_trimmed_student_trains_from_the_teachers_own_label_cache(tokenizer, tmp_path):
    """A same-tokenizer cache serves a student trimmed from its teacher: ids mapped, slots the student lacks left
    out; an all-layer trimmed copy of the teacher starts at (nearly: the cache's 8-bit codes) zero KL."""
    from kdforge.cli import main
    from kdforge.stages.label import LabelConfig
    from kdforge.stages.label import run as label

    teacher = tmp_path / "teacher"
    make_tiny("llama", len(tokenizer), seed=0).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    data = write_conversations(tmp_path / "data.jsonl", [("Hi", "Hello there, how are you today?"),
                                                         ("Sum", "2 + 2 = 4 and 3 + 5 = 8."),
                                                         ("Zh", "北京是中国的首都。"), ("Fr", "Paris is in France.")])
    label(LabelConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "labels"), top_k=64))
    paths = {"student": str(tmp_path / "s"), "data": str(data)}
    assert main(["student", str(teacher), "--out", paths["student"], "--num-layers", "2", "--trim-vocab",
                 str(data)]) == 0
    cached = _distill(paths, tmp_path / "cached", labels=str(tmp_path / "labels"), max_steps=2, lr=1e-9,
                      temperature=1.0)
    assert 0 <= cached[0]["soft"] < 1e-3, cached[0]
    live = _distill({**paths, "teacher": str(teacher)}, tmp_path / "live", teacher=str(teacher), max_steps=2,
                    lr=1e-9, seed=0)
    assert live[0]["ce"] == pytest.approx(cached[0]["ce"], rel=1e-6)
    # A student trimmed from another teacher's vocabulary is not taken for this cache's.
    other = tmp_path / "other"
    assert main(["student", str(teacher), "--out", str(other), "--num-layers", "2", "--trim-vocab", str(data)]) == 0
    vm = json.loads((other / "kdforge_vocab_map.json").read_text())
    vm["teacher_vocab_sha256"] = "0" * 64
    (other / "kdforge_vocab_map.json").write_text(json.dumps(vm))
    with pytest.raises(ConfigError, match="cross_tokenizer=true"):
        _distill({**paths, "student": str(other)}, tmp_path / "x", labels=str(tmp_path / "labels"))


def test_trimmed_student_from_a_cache_validates_on_what_lines_up(tokenizer, tmp_path, capsys):
    """Trimmed on the train split only, the validation text outside it is spelled in more tokens than the cache
    holds: cached validation leaves those conversations out (and says so) instead of failing mid-run; a student
    trimmed on other data than the training data is refused before the first step."""
    from kdforge.cli import main
    from kdforge.stages.label import LabelConfig
    from kdforge.stages.label import run as label

    teacher = tmp_path / "teacher"
    make_tiny("llama", len(tokenizer), seed=0).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    turns = [("Hi", "Hello there, how are you today?"), ("Sum", "2 + 2 = 4 and 3 + 5 = 8."),
             ("Zh", "北京是中国的首都。"), ("Fr", "Paris is in France."), ("Hi again", "Hello there, how are you?")]
    data = tmp_path / "data.jsonl"
    split = ["train", "train", "validation", "train", "validation"]  # c2 retokenizes, c4 does not
    data.write_text("".join(json.dumps({"id": f"c{i}", "split": s, "messages": [
        {"role": "user", "content": u}, {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n"
        for i, ((u, a), s) in enumerate(zip(turns, split))))
    label(LabelConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "labels"), top_k=64, split="all"))
    student = tmp_path / "s"
    assert main(["student", str(teacher), "--out", str(student), "--num-layers", "2", "--trim-vocab", str(data),
                 "--set", "trim_split=train"]) == 0
    paths = {"student": str(student), "data": str(data)}
    capsys.readouterr()
    log = _distill(paths, tmp_path / "d", labels=str(tmp_path / "labels"), split="train", max_steps=2,
                   eval_every=1)
    assert "1 of 2 conversations tokenise differently" in capsys.readouterr().out
    assert any("val_kl" in r and math.isfinite(r["val_kl"]) for r in log)
    # Trimmed on the first conversation only: the training data does not line up with the cache.
    narrow = tmp_path / "narrow.jsonl"
    narrow.write_text(data.read_text().splitlines()[1] + "\n")
    other = tmp_path / "s2"
    assert main(["student", str(teacher), "--out", str(other), "--num-layers", "2", "--trim-vocab", str(narrow)]) == 0
    with pytest.raises(ConfigError, match="training conversations .* tokenise differently"):
        _distill({**paths, "student": str(other)}, tmp_path / "d2", labels=str(tmp_path / "labels"), split="train")
    assert not (tmp_path / "d2" / "meta.json").exists()
    # Only retokenized validation conversations: training runs, without validation (eval scores them).
    only = tmp_path / "only.jsonl"
    only.write_text("".join(x + "\n" for i, x in enumerate(data.read_text().splitlines()) if i != 4))
    label(LabelConfig(teacher=str(teacher), data=str(only), out=str(tmp_path / "labels2"), top_k=64, split="all"))
    s3 = tmp_path / "s3"
    assert main(["student", str(teacher), "--out", str(s3), "--num-layers", "2", "--trim-vocab", str(only),
                 "--set", "trim_split=train"]) == 0
    capsys.readouterr()
    log = _distill({"student": str(s3), "data": str(only)}, tmp_path / "d3", labels=str(tmp_path / "labels2"),
                   split="train", max_steps=2, eval_every=1)
    assert "so there is no validation during training" in capsys.readouterr().out
    assert len(log) == 2 and not any("val_kl" in r for r in log)
