"""The soft-label cache: format, quantisation error, reader checks, sparse losses, training from it."""

import json
import math

import pytest
import torch

from kdforge.config import ConfigError
from kdforge.distill.losses import divergence, sparse_divergence
from kdforge.softlabels.format import DELTA_MAX, decode_topk, encode_topk
from kdforge.softlabels.reader import CacheError, SoftLabelCache
from kdforge.stages.distill import DistillConfig
from kdforge.stages.distill import run as run_distill
from kdforge.stages.label import LabelConfig
from kdforge.stages.label import run as run_label

from .conftest import kill_when, make_tiny

CONVS = [[{"role": "user", "content": f"Tell me about the number {i}."},
          {"role": "assistant", "content": f"The number {i} comes after {i - 1}." + " It is fine." * (i % 4)}]
         for i in range(10)]


def test_quantisation_error_is_within_the_documented_bound():
    logits = torch.randn(200, 500) * 4
    lp = torch.log_softmax(logits, -1)
    enc = encode_topk(lp, 64, 500)
    dec = decode_topk(enc["top1_logprob"], enc["topk_codes"])
    exact = lp.topk(64, -1).values
    delta = exact[:, :1] - exact
    # Half a code step of the sqrt code at that depth, plus fp16 rounding of the top-1 anchor.
    bound = 0.5 * 2 * torch.sqrt(delta.clamp(min=1e-3) * DELTA_MAX) / 255 + DELTA_MAX / 255**2 + 2e-3
    ok = delta < DELTA_MAX
    assert ((dec - exact).abs() <= bound)[ok].all()
    assert enc["topk_ids"].dtype.name == "uint16" and enc["topk_codes"].shape == (200, 63)
    tail = torch.from_numpy(enc["tail_logmass"].astype("float32")).exp()
    torch.testing.assert_close(tail + exact.exp().sum(-1), torch.ones(200), atol=2e-3, rtol=0)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_with_full_vocabulary_equals_dense(kind, temperature):
    s, t = torch.randn(7, 40) * 2, torch.randn(7, 40) * 2
    lp = torch.log_softmax(t, -1)
    top, ids = lp.topk(40, -1)
    tail = torch.full((7,), -30.0)
    sparse = sparse_divergence(s, ids, top, tail, kind, temperature=temperature, capture_temperature=1.0)
    torch.testing.assert_close(sparse, divergence(s, t, kind, temperature), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("vocab,k,scale", [(300, 64, 3.0), (300, 64, 40.0), (40, 40, 2.0)])
def test_fused_sparse_forward_kl_equals_autograd(temperature, vocab, k, scale):
    """The hand-written backward of the cached forward KL equals autograd through the k+1-bin definition,
    including rows whose rest bin is floored (scale 40: the student puts ~all mass on the top-k) and k = V."""
    from kdforge.distill.losses import forward_kl_logp, sparse_student_logp, sparse_teacher_logp

    torch.manual_seed(0)
    s, t = torch.randn(50, vocab) * scale, torch.randn(50, vocab) * scale
    top, ids = torch.log_softmax(t, -1).topk(k, -1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7)).clamp(min=-30)
    weights = torch.rand(50)
    a = s.clone().requires_grad_(True)
    fused = sparse_divergence(a, ids, top, tail, "forward_kl", temperature=temperature, chunk_size=16)
    (fused * weights).sum().backward()
    b = s.clone().requires_grad_(True)
    ref = forward_kl_logp(sparse_student_logp(b, ids, temperature),
                          sparse_teacher_logp(top, tail, 1.0, temperature, vocab))
    (ref * weights).sum().backward()
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=1e-5)
    assert b.grad.abs().max() > 0
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_sparse_forward_kl_is_a_lower_bound_and_close_with_top_k():
    s, t = torch.randn(50, 300), torch.randn(50, 300) * 3
    lp = torch.log_softmax(t, -1)
    top, ids = lp.topk(64, -1)
    tail = torch.log1p(-top.exp().sum(-1))
    sparse = sparse_divergence(s, ids, top, tail, "forward_kl")
    dense = divergence(s, t, "forward_kl")
    assert (sparse <= dense + 1e-5).all()
    assert (dense - sparse).mean() / dense.mean() < 0.1


@pytest.fixture
def labelled(tmp_path, tokenizer):
    teacher = make_tiny("llama", len(tokenizer), seed=7, layers=3)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)
    t_dir = tmp_path / "teacher"
    teacher.save_pretrained(t_dir)
    tokenizer.save_pretrained(t_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": m, "split": "validation" if i >= 8 else "train"})
                            + "\n" for i, m in enumerate(CONVS)))
    cache = tmp_path / "labels"
    m = run_label(LabelConfig(teacher=str(t_dir), data=str(data), out=str(cache), top_k=16, shard_size=4,
                              hidden_layers=[0, 2], batch_size=3))
    return t_dir, data, cache, m


@pytest.mark.integration
def test_label_writes_a_verifiable_cache(labelled, tokenizer):
    t_dir, data, cache, m = labelled
    man = json.loads((cache / "manifest.json").read_text())
    assert m["examples"] == 10 and m["shards"] == 3 and len(man["examples"]) == 10
    assert man["k"] == 16 and man["dtypes"]["topk_ids"] == "uint16" and man["tokenizer"]["vocab_sha256"]
    assert man["teacher"]["weights_sha256"] and man["data"]["sha256"]
    assert man["bytes_per_target_token"]["format"] == 2 + 32 + 15 + 2
    reader = SoftLabelCache(cache)
    reader.check_compatible(tokenizer, man["data"]["sha256"])
    # Random access gives the teacher's own top-k at each target position.
    from kdforge.data.chat import encode_conversation
    from kdforge.models.forward import target_logits
    from kdforge.models.loading import load_model

    model, tok = load_model(str(t_dir))
    enc = encode_conversation(tok, CONVS[5], 256)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logits, _ = target_logits(model, ids, torch.ones_like(ids), torch.tensor([enc.labels]))
    lab = reader.get(5)
    assert torch.equal(lab.ids, logits.topk(16, -1).indices)
    torch.testing.assert_close(lab.logprobs[:, 0], torch.log_softmax(logits, -1).max(-1).values, atol=3e-3, rtol=0)
    assert set(lab.hidden) == {0, 2} and lab.hidden[0].shape == (len(enc.input_ids), 64)


@pytest.mark.integration
def test_relabel_reuses_finished_shards(labelled):
    t_dir, data, cache, _ = labelled
    (cache / "shard-00001.safetensors").unlink()
    m = run_label(LabelConfig(teacher=str(t_dir), data=str(data), out=str(cache), top_k=16, shard_size=4,
                              hidden_layers=[0, 2], batch_size=3))
    assert m["reused_examples"] == 6  # shards 0 and 2 were kept; only shard 1 was labelled again
    with pytest.raises(ConfigError, match="other settings.*top_k"):
        run_label(LabelConfig(teacher=str(t_dir), data=str(data), out=str(cache), top_k=8))


@pytest.mark.integration
def test_corrupt_or_truncated_shard_is_named(labelled):
    _, _, cache, _ = labelled
    shard = cache / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="shard-00001.safetensors is corrupted"):
        SoftLabelCache(cache)
    shard.write_bytes(bytes(raw[:-100]))
    with pytest.raises(CacheError, match="shard-00001.safetensors is truncated"):
        SoftLabelCache(cache)


@pytest.mark.integration
def test_cache_refuses_other_tokenizer_and_other_data(labelled, tokenizer, tmp_path):
    _, data, cache, _ = labelled
    reader = SoftLabelCache(cache)
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(CacheError, match="different chat template"):
        reader.check_compatible(other)
    with pytest.raises(CacheError, match="other data"):
        reader.check_compatible(tokenizer, "0" * 64)


@pytest.mark.integration
def test_distill_from_cache_never_loads_the_teacher(labelled, tmp_path, monkeypatch):
    t_dir, data, cache, _ = labelled
    from kdforge.stages.student import StudentConfig
    from kdforge.stages.student import run as run_student

    run_student(StudentConfig(teacher=str(t_dir), out=str(tmp_path / "s"), layers=[0, 2]))
    import kdforge.models.loading as loading  # the stage imports load_model from here when it runs

    real = loading.load_model
    loaded = []
    monkeypatch.setattr(loading, "load_model", lambda spec, *a, **k: loaded.append(spec) or real(spec, *a, **k))
    m = run_distill(DistillConfig(student=str(tmp_path / "s"), labels=str(cache), data=str(data),
                                  out=str(tmp_path / "o"), max_steps=4, batch_size=2, eval_every=2, log_every=1,
                                  hidden_loss="cosine", temperature=2.0, loss="reverse_kl"))
    assert loaded == [str(tmp_path / "s")]
    assert m["final"]["val_kl"] > 0 and m["final"]["hidden"] > 0 and math.isfinite(m["final"]["loss"])
    with pytest.raises(ConfigError, match="max_length"):
        run_distill(DistillConfig(student=str(tmp_path / "s"), labels=str(cache), data=str(data),
                                  out=str(tmp_path / "o2"), max_steps=1, max_length=128))


@pytest.mark.integration
def test_distill_cli_takes_labels(labelled, tmp_path):
    """`kdforge distill --labels DIR` trains from the cache with no --teacher."""
    t_dir, data, cache, _ = labelled
    from kdforge.cli import main

    assert main(["student", str(t_dir), "--out", str(tmp_path / "s"), "--layers", "0,2"]) == 0
    assert main(["distill", "--labels", str(cache), "--student", str(tmp_path / "s"), "--data", str(data),
                 "--out", str(tmp_path / "o"), "--steps", "2", "--batch-size", "2"]) == 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["metrics"]["steps"] == 2


@pytest.mark.integration
def test_label_killed_mid_way_resumes_without_relabelling_finished_shards(tokenizer, tmp_path):
    """SIGKILL a `kdforge label` process after its first shards land; the re-run reuses them and the
    cache equals an uninterrupted run's."""
    import signal

    teacher = make_tiny("llama", len(tokenizer), seed=7, layers=3)
    t_dir = tmp_path / "teacher"
    teacher.save_pretrained(t_dir)
    tokenizer.save_pretrained(t_dir)
    convs = CONVS * 6  # 60 conversations, 30 shards of 2
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n" for i, m in enumerate(convs)))
    out = tmp_path / "killed"
    rc = kill_when(["label", str(t_dir), "--data", str(data), "--out", str(out), "--top-k", "8", "--batch-size", "1",
                    "--set", "shard_size=2"], lambda: out.is_dir() and len(list(out.glob("shard-*.safetensors"))) >= 3)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()
    finished = len(list(out.glob("shard-*.safetensors")))
    assert 3 <= finished < 30
    m = run_label(LabelConfig(teacher=str(t_dir), data=str(data), out=str(out), top_k=8, batch_size=1, shard_size=2))
    assert m["reused_examples"] >= 2 * (finished - 1)  # at most the shard in flight is redone
    whole = tmp_path / "whole"
    run_label(LabelConfig(teacher=str(t_dir), data=str(data), out=str(whole), top_k=8, batch_size=1, shard_size=2))
    resumed, fresh = SoftLabelCache(out), SoftLabelCache(whole)
    for i in range(len(convs)):
        a, b = resumed.get(i), fresh.get(i)
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-3, rtol=0)


@pytest.mark.integration
def test_cached_signal_with_full_vocabulary_trains_like_the_live_teacher(tokenizer):
    """k = V: the trainer's sparse path (top-k bins + tail) gives the live teacher's losses and gradients."""
    from kdforge.data.batching import collate
    from kdforge.data.formats import Conversation
    from kdforge.distill.losses import SparseSignal
    from kdforge.distill.schedules import Progress
    from kdforge.distill.teacher_source import LiveTeacher, TeacherOutput
    from kdforge.distill.trainer import Distiller, encode_dataset
    from kdforge.models.forward import target_logits

    teacher = make_tiny("llama", len(tokenizer), seed=1)
    student = make_tiny("llama", len(tokenizer), seed=2, layers=1)
    data, _ = encode_dataset(tokenizer, [Conversation(f"c{i}", m) for i, m in enumerate(CONVS[:4])], 64)
    batch = collate(data, tokenizer.pad_token_id)
    v = len(tokenizer)
    with torch.no_grad():
        t_logits, _ = target_logits(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"], v)
    logp = torch.log_softmax(t_logits.float(), -1)
    top, ids = logp.topk(v, -1)  # every token: the tail is empty

    class FullCache:
        def __call__(self, *a, **k):
            return TeacherOutput(SparseSignal(ids, top, torch.full((ids.shape[0],), -30.0)))

    results = []
    for source in (LiveTeacher(teacher, v), FullCache()):
        for kind in ("forward_kl", "reverse_kl"):
            cfg = DistillConfig(teacher="t", student="s", data="d", temperature=2.0, alpha=0.3, loss=kind)
            student.zero_grad()
            r = Distiller(cfg.trainer_objective(), source, student, v, {}, None).step([batch], Progress(0, 10, 5))
            results.append((r, torch.cat([p.grad.flatten() for p in student.parameters()])))
    for (live, g_live), (cached, g_cached) in zip(results[:2], results[2:]):
        assert cached["loss"] == pytest.approx(live["loss"], rel=1e-4)
        assert cached["soft"] == pytest.approx(live["soft"], rel=1e-4)
        torch.testing.assert_close(g_cached, g_live, rtol=1e-3, atol=1e-6)


@pytest.mark.integration
def test_resume_in_another_precision_is_refused(tokenizer, tmp_path):
    """Resuming a cache in another dtype would mix bf16 and fp32 labels in one cache: refused, with the
    setting and both values named; a setting that may change (batch size, device) resumes."""
    teacher = make_tiny("llama", len(tokenizer), seed=7, layers=2)
    t_dir = tmp_path / "teacher"
    teacher.save_pretrained(t_dir)
    tokenizer.save_pretrained(t_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n" for i, m in enumerate(CONVS[:4])))
    base = dict(teacher=str(t_dir), data=str(data), out=str(tmp_path / "labels"), top_k=8, shard_size=2)
    run_label(LabelConfig(**base, dtype="float32", batch_size=2))
    manifest = (tmp_path / "labels" / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match=r"other settings.*dtype: 'float32' before, 'bfloat16' now"):
        run_label(LabelConfig(**base, dtype="bfloat16"))
    assert (tmp_path / "labels" / "manifest.json").read_bytes() == manifest  # the refused run touched nothing
    m = run_label(LabelConfig(**base, dtype="float32", batch_size=4, device="cpu"))
    assert m["reused_examples"] == 4


# The manifest's keys, in order, as the label stage has always written them (caches made before the typed
# manifest must keep reading), plus teacher.precision, added since with a default (a cache without it reads
# and writes back byte for byte: tests/test_parallel_stages.py).
MANIFEST_KEYS = {
    "": ["format_version", "teacher", "tokenizer", "data", "examples", "k", "temperature", "max_length", "vocab_size",
         "hidden_layers", "teacher_layers", "teacher_hidden_size", "dtypes", "counts", "bytes_per_target_token",
         "shards"],
    "teacher": ["spec", "weights_sha256", "precision"],
    "tokenizer": ["vocab_sha256", "chat_template_sha256", "special_tokens_sha256", "vocab_size"],
    "data": ["path", "sha256", "split", "limit"],
    "examples": ["id", "split"],
    "dtypes": ["topk_ids", "top1_logprob", "topk_codes", "tail_logmass", "hidden"],
    "counts": ["examples", "targets", "tokens"],
    "bytes_per_target_token": ["format", "on_disk"],
    "shards": ["file", "examples", "targets", "bytes", "sha256"],
}


@pytest.mark.integration
def test_typed_manifest_keeps_the_json_on_disk(labelled):
    from kdforge.artifacts import atomic_write_json
    from kdforge.softlabels.reader import read_manifest
    from kdforge.softlabels.writer import manifest_json

    _, _, cache, _ = labelled
    raw = json.loads((cache / "manifest.json").read_text())
    assert list(raw) == MANIFEST_KEYS[""]
    for key, keys in MANIFEST_KEYS.items():
        if key:
            value = raw[key][0] if isinstance(raw[key], list) else raw[key]
            assert list(value) == keys, key
    # Read and written again: byte for byte the same file.
    again = cache.parent / "again.json"
    atomic_write_json(again, manifest_json(read_manifest(cache / "manifest.json")))
    assert again.read_bytes() == (cache / "manifest.json").read_bytes()
    # No sidecars are left once the manifest is written.
    assert not list(cache.glob(".*.json"))


@pytest.mark.integration
def test_corrupt_or_foreign_manifest_names_the_file_and_field(labelled):
    _, _, cache, _ = labelled
    path = cache / "manifest.json"
    good = json.loads(path.read_text())
    bad = json.loads(path.read_text())
    bad["shards"][1]["bytes"] = "many"
    path.write_text(json.dumps(bad))
    with pytest.raises(CacheError, match=r"manifest.json: not a valid soft-label manifest: shards\.1\.bytes"):
        SoftLabelCache(cache)
    del bad["shards"][1]["bytes"], bad["k"]
    path.write_text(json.dumps(bad))
    with pytest.raises(CacheError, match=r"manifest.json: .*k: Field required.*shards\.1\.bytes: Field required"):
        SoftLabelCache(cache)
    path.write_text(json.dumps(good | {"extra": 1}))
    with pytest.raises(CacheError, match=r"manifest.json: .*extra: Extra inputs"):
        SoftLabelCache(cache)
    path.write_text(json.dumps({"name": "someone else's manifest"}))
    with pytest.raises(CacheError, match="manifest.json: format version None is not 1"):
        SoftLabelCache(cache)
    path.write_text(path.read_text()[:20])
    with pytest.raises(CacheError, match="manifest.json: corrupt manifest"):
        SoftLabelCache(cache)
