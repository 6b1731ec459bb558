"""The distillation trainer: exact accumulation, exact resume, vocabulary alignment, options."""

import json
import subprocess
import sys
import time

import pytest
import torch

from kdforge.config import ConfigError
from kdforge.data.batching import collate
from kdforge.data.formats import Conversation
from kdforge.distill.losses import kd_terms
from kdforge.distill.schedules import Progress, Schedule, as_schedule
from kdforge.distill.teacher_source import LiveTeacher
from kdforge.distill.trainer import Distiller, encode_dataset
from kdforge.models.forward import pack_rows, target_hidden, target_logits
from kdforge.models.student import build_layer_student
from kdforge.stages.distill import DistillConfig
from kdforge.stages.distill import run as run_distill

from .conftest import make_tiny

pytestmark = pytest.mark.integration

CONVS = [[{"role": "user", "content": f"Question {i}: what is {i} times {i + 1}?"},
          {"role": "assistant", "content": f"{i} times {i + 1} is {i * (i + 1)}." + " Indeed." * (i % 3)}]
         for i in range(8)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"id": f"c{i}", "messages": m, "split": "validation" if i >= 6 else "train",
             "category": "even" if i % 2 == 0 else "odd"} for i, m in enumerate(CONVS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pair(tmp_path, tokenizer, arch="llama", teacher_extra_rows=0, student_extra_rows=0):
    teacher = make_tiny(arch, len(tokenizer), seed=3, layers=3, extra_rows=teacher_extra_rows)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)  # peaked predictions, so KL has something to teach
    t_dir, s_dir = tmp_path / "teacher", tmp_path / "student"
    teacher.save_pretrained(t_dir)
    tokenizer.save_pretrained(t_dir)
    if student_extra_rows != teacher_extra_rows:
        student = make_tiny(arch, len(tokenizer), seed=4, layers=2, extra_rows=student_extra_rows)
    else:
        student = build_layer_student(teacher, [0, 2])
    student.save_pretrained(s_dir)
    tokenizer.save_pretrained(s_dir)
    return str(t_dir), str(s_dir)


def test_batch8_equals_batch1_times_accumulation8(tokenizer, tmp_path):
    teacher = make_tiny("llama", len(tokenizer), seed=1)
    student = make_tiny("llama", len(tokenizer), seed=2, layers=1)
    data, _ = encode_dataset(tokenizer, [Conversation(f"c{i}", m) for i, m in enumerate(CONVS)], 64)
    cfg = DistillConfig(teacher="t", student="s", data="d", hidden_loss="mse", hidden_weight=0.5,
                        attention_loss="none", temperature=2.0, alpha=0.3)
    grads = []
    for split in ([data], [[e] for e in data]):
        student.zero_grad()
        d = Distiller(cfg.trainer_objective(),
                      LiveTeacher(teacher, len(tokenizer)), student, len(tokenizer), {0: 1}, None)
        d.step([collate(chunk, tokenizer.pad_token_id) for chunk in split], Progress(0, 10, 5))
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pack_length", [8, 40, 4096])
def test_packed_rows_equal_the_padded_batch(tokenizer, arch, pack_length):
    """Packing (block-diagonal attention, positions restarting) gives the padded batch's hidden states at
    the same targets in the same order, and the same gradients, whatever the row length."""
    teacher = make_tiny(arch, len(tokenizer), seed=1)
    student = make_tiny(arch, len(tokenizer), seed=2, layers=1)
    data, _ = encode_dataset(tokenizer, [Conversation(f"c{i}", m) for i, m in enumerate(CONVS)], 64)
    batch = collate(data, tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the padded batch really has padding
    p = pack_rows(batch["input_ids"], batch["attention_mask"], batch["labels"], pack_length)
    real = batch["input_ids"][batch["attention_mask"].bool()]
    assert torch.equal(p["input_ids"][p["real"]], real)  # every real token once, in order
    assert p["input_ids"].shape[1] <= max(pack_length, int(lengths.max()))
    with torch.no_grad():
        h_pad, t_pad = target_hidden(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"])
        h_pack, t_pack = target_hidden(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                       pack_length)
    assert torch.equal(t_pad, t_pack)
    torch.testing.assert_close(h_pack, h_pad, rtol=1e-4, atol=1e-5)
    grads, losses = [], []
    for pack in (False, True):
        cfg = DistillConfig(teacher="t", student="s", data="d", temperature=2.0, alpha=0.3, pack=pack,
                            pack_length=max(pack_length, 9))
        student.zero_grad()
        r = Distiller(cfg.trainer_objective(),
                      LiveTeacher(teacher, len(tokenizer)), student, len(tokenizer), {}, None).step(
            [batch], Progress(0, 10, 5))
        losses.append(r["loss"])
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("hidden_only", [False, True])
def test_sparse_tied_embedding_gradient_equals_the_dense_one(tokenizer, hidden_only):
    """The tied embedding's sparse lookup gradient gives the dense gradients, and the optimizer sees a dense one."""
    teacher = make_tiny("llama", len(tokenizer), seed=1)
    student = make_tiny("llama", len(tokenizer), seed=2, layers=1)
    assert student.get_input_embeddings().weight is student.get_output_embeddings().weight
    data, _ = encode_dataset(tokenizer, [Conversation(f"c{i}", m) for i, m in enumerate(CONVS)], 64)
    micro = [collate(data[:4], tokenizer.pad_token_id), collate(data[4:], tokenizer.pad_token_id)]
    extra = {"kd_weight": 0.0, "hidden_loss": "mse", "hidden_weight": 1.0} if hidden_only else {}
    cfg = DistillConfig(teacher="t", student="s", data="d", temperature=2.0, alpha=0.3, **extra)
    grads = []
    for sparse in (True, False):
        student.zero_grad(set_to_none=True)
        d = Distiller(cfg.trainer_objective(),
                      LiveTeacher(teacher, len(tokenizer)), student, len(tokenizer), {0: 1}, None)
        assert d.tied_embedding is student.get_input_embeddings() and student.get_input_embeddings().sparse
        student.get_input_embeddings().sparse = sparse
        d.step(micro, Progress(0, 10, 5))
        emb_grad = student.get_input_embeddings().weight.grad
        assert emb_grad is not None and not emb_grad.is_sparse
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_chunked_projection_and_backward_equal_one_chunk(tokenizer, loss):
    """chunk_size=3 back-propagates the vocabulary projection 3 positions at a time: same loss, same gradients."""
    teacher = make_tiny("llama", len(tokenizer), seed=1)
    student = make_tiny("llama", len(tokenizer), seed=2, layers=1)
    data, _ = encode_dataset(tokenizer, [Conversation(f"c{i}", m) for i, m in enumerate(CONVS)], 64)
    batch = collate(data, tokenizer.pad_token_id)
    assert int((batch["labels"] != -100).sum()) > 3 * 4
    results = []
    for chunk in (None, 3):
        cfg = DistillConfig(teacher="t", student="s", data="d", temperature=2.0, alpha=0.3, loss=loss,
                            chunk_size=chunk)
        student.zero_grad()
        r = Distiller(cfg.trainer_objective(),
                      LiveTeacher(teacher, len(tokenizer)), student, len(tokenizer), {}, None).step(
            [batch], Progress(0, 10, 5))
        results.append((r, torch.cat([p.grad.flatten() for p in student.parameters()])))
    # Reference: plain autograd through the full (N, V) logits.
    student.zero_grad()
    s_logits, targets = target_logits(student, batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        t_logits, _ = target_logits(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref = kd_terms(s_logits, t_logits, targets, 0.3, 2.0, loss)["loss"] / targets.numel()
    ref.backward()
    g_ref = torch.cat([p.grad.flatten() for p in student.parameters()])
    (r_full, g_full), (r_chunk, g_chunk) = results
    assert r_full["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert r_chunk["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g_full, g_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_chunk, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied and untied output embedding
def test_the_head_routed_by_hand_gives_autograds_gradients(tokenizer, arch):
    """kdforge.distill.fused_head (logits as a leaf, gᵀx added into W.grad, gW into the hidden states' gradient)
    gives the same loss and gradients as autograd through lm_head, over two micro-batches of 3-position chunks,
    with embedding rows beyond the tokenizer that take no part (their gradient stays 0)."""
    teacher = make_tiny(arch, len(tokenizer), seed=1, extra_rows=5)
    student = make_tiny(arch, len(tokenizer), seed=2, layers=1, extra_rows=5)
    data, _ = encode_dataset(tokenizer, [Conversation(f"c{i}", m) for i, m in enumerate(CONVS)], 64)
    micro = [collate(data[:4], tokenizer.pad_token_id), collate(data[4:], tokenizer.pad_token_id)]
    cfg = DistillConfig(teacher="t", student="s", data="d", temperature=2.0, alpha=0.3, chunk_size=3)
    runs = []
    for by_hand in (True, False):
        student.zero_grad(set_to_none=True)
        d = Distiller(cfg.trainer_objective(), LiveTeacher(teacher, len(tokenizer)), student, len(tokenizer), {}, None)
        assert d.fused_head is not None
        if not by_hand:
            d.fused_head = None
        r = d.step(micro, Progress(0, 10, 5))
        runs.append((r["loss"], {n: p.grad.clone() for n, p in student.named_parameters()}))
    (loss_hand, g_hand), (loss_auto, g_auto) = runs
    assert loss_hand == pytest.approx(loss_auto, rel=1e-6)
    assert g_hand.keys() == g_auto.keys()
    for n in g_auto:
        torch.testing.assert_close(g_hand[n], g_auto[n], rtol=1e-5, atol=1e-7, msg=n)
    head = student.get_output_embeddings().weight.grad
    assert head[len(tokenizer):].abs().max() == 0 and head[:len(tokenizer)].abs().max() > 0


def test_killed_and_resumed_run_repeats_the_uninterrupted_losses(tokenizer, tmp_path, data_file):
    t, s = _pair(tmp_path, tokenizer)
    common = dict(teacher=t, student=s, data=str(data_file), max_steps=8, batch_size=2, log_every=1, lr=1e-3,
                  save_every=3, category_weights={"odd": 2.0})
    run_distill(DistillConfig(out=str(tmp_path / "full"), **common))
    full = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]

    out = tmp_path / "killed"
    sets = [f"--set={k}={json.dumps(v)}" for k, v in common.items() if k not in ("teacher", "student", "data")]
    cli = ["distill", "--teacher", t, "--student", s, "--data", str(data_file), "--out", str(out), *sets]
    args = [sys.executable, "-m", "kdforge.cli", *cli]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "step-000003" / "trainer_state.json").exists():
            proc.kill()
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -9, proc.stderr.read().decode()[-2000:]
    assert not (out / "meta.json").exists()
    from kdforge.cli import main

    assert main([*cli, "--resume"]) == 0
    resumed = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full, resumed):
        for k in ("loss", "ce", "soft", "lr", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)
    # Both final students are the same model.
    from safetensors.torch import load_file

    fa, fb = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)


def test_resume_with_changed_settings_is_refused(tokenizer, tmp_path, data_file):
    t, s = _pair(tmp_path, tokenizer)
    base = dict(teacher=t, student=s, data=str(data_file), out=str(tmp_path / "o"), max_steps=4, batch_size=2,
                save_every=2)
    run_distill(DistillConfig(**base))
    with pytest.raises(ConfigError, match="settings differ.*lr"):
        run_distill(DistillConfig(**base | {"lr": 1e-2}), resume=True)
    with pytest.raises(ConfigError, match="already exists"):
        run_distill(DistillConfig(**base))


def test_resume_may_change_bookkeeping_and_drops_a_torn_log_row(tokenizer, tmp_path, data_file):
    """A setting in MAY_CHANGE (keep_checkpoints) resumes; the log is cut back to the checkpoint by an atomic
    rewrite, and a row torn by the kill (no newline) is dropped rather than breaking the resume."""
    t, s = _pair(tmp_path, tokenizer)
    base = dict(teacher=t, student=s, data=str(data_file), out=str(tmp_path / "o"), max_steps=4, batch_size=2,
                save_every=2, log_every=1)
    run_distill(DistillConfig(**base))
    log = tmp_path / "o" / "train_log.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"step": 5, "loss": 1.')  # a kill mid-append
    run_distill(DistillConfig(**base | {"keep_checkpoints": 3}), resume=True)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert not [p.name for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]


def test_a_wall_clock_budget_stops_the_run_and_snapshots_are_the_weights_at_their_minute(tokenizer, tmp_path,
                                                                                          data_file):
    """max_minutes ends the run at the first step past the budget (the schedule still sized by max_steps);
    a snapshot taken at minute 0 is the student after step 1: with a budget spent by step 1 it equals the final
    student, and a run of max_steps 1 without a budget gives the same weights. Under gradient checkpointing the
    snapshot's config is the shipped one (K/V cache on), as the final folder's is."""
    from safetensors.torch import load_file

    t, s = _pair(tmp_path, tokenizer)
    common = dict(teacher=t, student=s, data=str(data_file), batch_size=2, log_every=1, lr=1e-3,
                  gradient_checkpointing=True)
    m = run_distill(DistillConfig(out=str(tmp_path / "budget"), max_steps=50, max_minutes=1e-9,
                                  snapshot_minutes=[0.0, 1e6], eval_every=25, **common))
    assert m["steps"] == 1
    rows = [json.loads(x) for x in (tmp_path / "budget" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and "val_kl" in rows[0]  # the last step is validated
    snaps = sorted(p.name for p in (tmp_path / "budget" / "snapshots").iterdir())
    assert snaps == ["0min"]  # the 1e6-minute snapshot was never reached
    assert json.loads((tmp_path / "budget" / "snapshots" / "0min" / "snapshot.json").read_text())["step"] == 1
    for folder in (tmp_path / "budget", tmp_path / "budget" / "snapshots" / "0min"):
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True, folder
    run_distill(DistillConfig(out=str(tmp_path / "one"), max_steps=1, **common))
    final = load_file(tmp_path / "budget" / "model.safetensors")
    snap = load_file(tmp_path / "budget" / "snapshots" / "0min" / "model.safetensors")
    one = load_file(tmp_path / "one" / "model.safetensors")
    # The schedules differ (max_steps 50 vs 1) only after warm-up's first step: step 1's lr is the same.
    assert set(final) == set(snap) == set(one)
    assert all(torch.equal(final[k], snap[k]) for k in final)
    assert all(torch.allclose(final[k], one[k], atol=1e-7) for k in final)
    with pytest.raises(ValueError, match="increasing order"):
        DistillConfig(teacher=t, student=s, data="d", snapshot_minutes=[5, 1])


def test_qwen_teacher_with_padded_vocab_distils_into_smaller_vocab_student(tokenizer, tmp_path, data_file):
    """Qwen2.5-style: teacher 152,064-like rows, student 151,936-like rows, one tokenizer."""
    t, s = _pair(tmp_path, tokenizer, arch="qwen2", teacher_extra_rows=256, student_extra_rows=128)
    m = run_distill(DistillConfig(teacher=t, student=s, data=str(data_file), out=str(tmp_path / "o"), max_steps=3,
                                  batch_size=2, eval_every=3))
    assert m["final"]["val_kl"] > 0 and torch.isfinite(torch.tensor(m["final"]["loss"]))


def test_a_tokenizer_that_does_not_fit_the_student_is_refused(tokenizer, tmp_path, data_file):
    # (A student with *another* tokenizer trains through the cross-tokenizer path: tests/test_cross_tokenizer.py.)
    t, s = _pair(tmp_path, tokenizer)
    from transformers import AutoTokenizer

    from kdforge.errors import UserError

    other = AutoTokenizer.from_pretrained(s)
    other.add_tokens(["<brand_new_token>"])
    other.save_pretrained(s)
    with pytest.raises(UserError, match="does not go with the model"):
        run_distill(DistillConfig(teacher=t, student=s, data=str(data_file), out=str(tmp_path / "o"), max_steps=1))
    assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("options", [
    {"preset": "two_stage"},
    {"hidden_loss": "nmse", "attention_loss": "mse", "loss": "jsd", "jsd_beta": 0.3, "temperature": "t6to1"},
    {"method": "lora", "loss": "reverse_kl"},
    {"freeze": ["self_attn"], "loss": "skew_kl", "gradient_checkpointing": True, "tensorboard": True},
    {"loss": "tv", "alpha": {"kind": "linear", "start": 0.0, "end": 0.5}, "lr_schedule": "linear"},
])
def test_training_options_run_and_save_loadable_students(tokenizer, tmp_path, data_file, options):
    from transformers import AutoModelForCausalLM

    t, s = _pair(tmp_path, tokenizer)
    out = tmp_path / "o"
    m = run_distill(DistillConfig(teacher=t, student=s, data=str(data_file), out=str(out), max_steps=4, batch_size=2,
                                  log_every=1, **options))
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    if options.get("preset") == "two_stage":
        assert log[0]["hidden"] > 0 and log[0]["kd_weight"] == 0 and log[-1]["kd_weight"] == 1
        assert log[-1]["attention"] > 0 and log[-1]["hidden_weight"] == 0
    if options.get("temperature") == "t6to1":
        assert log[0]["temperature"] == 6.0 and log[-1]["temperature"] == 1.0
    if "tensorboard" in options:
        assert list((out / "tb").iterdir())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in model.state_dict())
    assert m["final"]["step"] == 4


def test_freezing_keeps_frozen_weights(tokenizer, tmp_path, data_file):
    from safetensors.torch import load_file

    t, s = _pair(tmp_path, tokenizer)
    run_distill(DistillConfig(teacher=t, student=s, data=str(data_file), out=str(tmp_path / "o"), max_steps=2,
                              freeze=["self_attn"], lr=1e-2))
    before, after = load_file(f"{s}/model.safetensors"), load_file(tmp_path / "o" / "model.safetensors")
    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(before[q], after[q]) and not torch.equal(before[up], after[up])
    with pytest.raises(ConfigError, match="matches no parameter"):
        run_distill(DistillConfig(teacher=t, student=s, data=str(data_file), out=str(tmp_path / "o2"), max_steps=1,
                                  freeze=["no_such_module"]))


def test_schedules():
    p = lambda step: Progress(step, 11, 5)  # noqa: E731
    lin = Schedule(kind="linear", start=6, end=1)
    assert [lin.at(p(0)), lin.at(p(5)), lin.at(p(10))] == [6.0, 3.5, 1.0]
    cos = Schedule(kind="cosine", start=1, end=0)
    assert cos.at(p(0)) == 1.0 and cos.at(p(10)) == pytest.approx(0.0) and cos.at(p(5)) == pytest.approx(0.5)
    by_epoch = as_schedule("t2then1")
    assert [by_epoch.at(p(4)), by_epoch.at(p(5)), by_epoch.at(p(9))] == [2.0, 1.0, 1.0]
    steps = Schedule(kind="step", values=[1, 2, 3], boundaries=[2, 4], unit="step")
    assert [steps.at(p(i)) for i in range(6)] == [1, 1, 2, 2, 3, 3]
    assert as_schedule(0.7).at(p(3)) == 0.7
    with pytest.raises(ValueError, match="needs start, end"):
        Schedule(kind="linear")
    with pytest.raises(ValueError, match="unknown schedule preset"):
        as_schedule("t9to0")
