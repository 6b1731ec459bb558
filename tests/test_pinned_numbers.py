"""Pinned numbers: exact losses and weight checksums of two tiny fixed-seed distillation runs.

In torchtune's style, these tests hard-code the numbers the current code produces, so that a dependency
upgrade (torch, transformers, safetensors) or a refactor that changes what training computes fails here
loudly instead of drifting silently. Both runs start from the same inputs: a tiny random 4-layer Llama
teacher (seed 0, its final norm scaled by 32 so its predictions are peaked and the KL term is large), a
2-layer student cut from it with ``kdforge student --layers 0,3``, and eight one-turn conversations.

* ``test_live_teacher_pins``: 4 steps of forward-KL distillation (batch 2, T=2, alpha=0.5, no warm-up,
  cosine schedule) from the live teacher.
* ``test_label_cache_pins``: the same 4 steps from the top-16 soft-label cache (``kdforge label`` then
  ``kdforge distill --labels``).

Pinned per run: ``loss``, ``soft`` and ``ce`` of every step in ``train_log.jsonl`` (``log_every=1``), and
three checksums of the trained student's ``model.safetensors`` (float64 sums over sorted tensor names): the
sum of all weights, the sum of their absolute values, and the sum of absolute changes from the initial
student (the last one is not swamped by the untouched initial weights, so it sees small update changes).

Everything is driven through ``kdforge.cli.main`` and the files it writes, never through kdforge internals,
so these tests keep passing, unchanged, across refactors that move modules around. Device and precision are
fixed (``device=cpu``, fp32) so a machine with a GPU computes the same numbers; the results were checked to be
identical with 1 and 2 CPU threads.

When a number changes ON PURPOSE (a fix to the loss, a new default, a dependency upgrade known to change
kernels): re-derive the values by running the current code (each failing assertion prints the values it got, at full
precision), update the literals below, and give the reason for the change in the commit message.
When a number changes and nobody meant it to, that is the regression these tests exist to catch.
"""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from kdforge.cli import main

from .conftest import save_tiny

pytestmark = pytest.mark.integration

# One relative tolerance for every pinned value. The values span 0.1 (a soft term) to 5e4 (an absolute-value
# checksum), so a relative bound means the same thing for each, where an absolute 1e-5 would be 1% of a small
# soft term and 2e-10 of the big checksum. 1e-5 is ~100x float32's epsilon: room for reduction-order noise
# between BLAS builds and thread counts (1 vs 2 threads agree here to ~1e-15), while a real change to the
# objective, data order, optimizer, schedule or initialisation moves these numbers far more than that.
REL = 1e-5

CONVS = [[{"role": "user", "content": f"Question {i}: what is {i} times {i + 1}?"},
          {"role": "assistant", "content": f"{i} times {i + 1} is {i * (i + 1)}." + " Indeed." * (i % 3)}]
         for i in range(8)]

FIXED = ["--set", "device=cpu"]
DISTILL = ["--steps", "4", "--batch-size", "2", "--set", "loss=forward_kl", "--set", "temperature=2.0",
           "--set", "alpha=0.5", "--set", "log_every=1", "--set", "warmup_steps=0", "--set", "seed=0",
           "--set", "precision=fp32", *FIXED]

# (loss, soft, ce) per step 1..4, and the trained student's checksums.
LIVE_STEPS = [
    (21.87241472516741, 2.3479519798642112, 34.353021530877974),
    (17.90704119646991, 1.8014955873842593, 28.60810004340278),
    (14.60137685139974, 1.0457703272501628, 25.019673665364582),
    (13.985447933799342, 1.0430926272743626, 23.798524555407074),
]
LIVE_CHECKSUMS = {"sum": 2350.663829716798, "abs_sum": 53764.07408249228, "update_abs_sum": 1581.4157819735901}
CACHE_STEPS = [
    (22.004029773530505, 2.4137596856980097, 34.353021530877974),
    (16.423847339771413, 1.1836283648455586, 28.113181785300927),
    (12.55068842569987, 0.22746698061625162, 24.191507975260418),
    (11.82509331954153, 0.14003707233228183, 23.090038098787005),
]
CACHE_CHECKSUMS = {"sum": 2535.989950703514, "abs_sum": 53939.28949347135, "update_abs_sum": 1810.0813881666909}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer):
    """The fixed teacher, the student cut from it, and the conversations (built once for both tests)."""
    root = tmp_path_factory.mktemp("pinned")
    teacher = save_tiny(root / "teacher", "llama", tokenizer, seed=0, layers=4)
    weights = teacher / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 32.0  # peaked predictions: a large KL term
    save_file(tensors, weights, metadata={"format": "pt"})
    student = root / "student"
    assert main(["student", str(teacher), "--out", str(student), "--layers", "0,3"]) == 0
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": m, "split": "train"}) + "\n"
                            for i, m in enumerate(CONVS)))
    return teacher, student, data


def _steps(out: Path) -> list[tuple[float, float, float]]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    return [(r["loss"], r["soft"], r["ce"]) for r in rows]


def _checksums(trained: Path, initial: Path) -> dict[str, float]:
    after, before = load_file(trained / "model.safetensors"), load_file(initial / "model.safetensors")
    assert sorted(after) == sorted(before)
    names = sorted(after)
    return {"sum": sum(after[n].double().sum().item() for n in names),
            "abs_sum": sum(after[n].double().abs().sum().item() for n in names),
            "update_abs_sum": sum((after[n].double() - before[n].double()).abs().sum().item() for n in names)}


def _check(out: Path, student: Path, steps, checksums) -> None:
    got = _steps(out)
    for step, (row, want) in enumerate(zip(got, steps), 1):
        assert row == pytest.approx(want, rel=REL), f"step {step} (loss, soft, ce) changed: {row} != {want}"
    got_sums = _checksums(out, student)
    assert got_sums == pytest.approx(checksums, rel=REL), f"trained weights changed: {got_sums}"


def test_live_teacher_pins(inputs, tmp_path):
    teacher, student, data = inputs
    out = tmp_path / "live"
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
                 "--out", str(out), *DISTILL]) == 0
    _check(out, student, LIVE_STEPS, LIVE_CHECKSUMS)


def test_label_cache_pins(inputs, tmp_path):
    teacher, student, data = inputs
    cache = tmp_path / "labels"
    assert main(["label", str(teacher), "--data", str(data), "--out", str(cache), "--top-k", "16",
                 "--set", "dtype=float32", *FIXED]) == 0
    out = tmp_path / "cached"
    assert main(["distill", "--labels", str(cache), "--student", str(student), "--data", str(data),
                 "--out", str(out), *DISTILL]) == 0
    _check(out, student, CACHE_STEPS, CACHE_CHECKSUMS)
