"""Teacher placement (kdforge.models.placement): a device map with memory bounds, precisions, the rank's share
of a node's GPUs, and the clear errors. On a CPU a map can place modules on the CPU and on disk: that
runs the same path a multi-GPU map runs (accelerate's dispatch and its hooks) and must give the logits
and answers of a plain load."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from kdforge.config import ConfigError
from kdforge.models.loading import input_device, load_model
from kdforge.models.placement import (
    TeacherPlacement,
    earlier_precision,
    from_pretrained_kwargs,
    local_gpus,
    localize,
    precision_of,
    resolve_precision,
    size_bytes,
)

from .conftest import save_tiny

GiB = 2**30


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tokenizer):
    return save_tiny(tmp_path_factory.mktemp("placed-qwen2"), "qwen2", tokenizer, seed=5)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device=input_device(model))).logits.float().cpu()


IDS = [1, 17, 230, 4000, 12, 9, 77]
# Every module of the tiny Qwen2, half on the CPU and half on disk (what a GPU + CPU map does with devices).
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.norm": "cpu", "lm_head": "disk"}


def test_device_maps_give_the_plain_load_s_logits(qwen_dir, tmp_path):
    plain, _ = load_model(str(qwen_dir), "cpu")
    ref = _logits(plain, IDS)
    for kw in ({"device_map": {"": "cpu"}}, {"device_map": "auto", "max_memory": {"cpu": "1GiB"}},
               {"device_map": SPLIT, "offload_folder": str(tmp_path / "offload")}):
        model, _ = load_model(str(qwen_dir), **kw)
        assert torch.equal(_logits(model, IDS), ref), kw
        assert precision_of(model) == "fp32"
    # The split map really dispatched: disk-offloaded weights sit on "meta" until their module runs.
    assert getattr(model, "hf_device_map", None) == SPLIT
    assert model.lm_head.weight.device.type == "meta" and input_device(model) == torch.device("cpu")


def test_runtime_generates_the_same_with_a_device_map(qwen_dir, tmp_path):
    """open_model's placement reaches load_model: a mapped teacher answers (greedy, batched) as a plain one."""
    from kdforge.data.chat import render
    from kdforge.runtime import SamplingParams, open_model

    answers = []
    for placement in (None, {"device_map": SPLIT, "offload_folder": str(tmp_path / "off")}):
        with open_model(str(qwen_dir), "transformers", "cpu", placement=placement) as lm:
            tok = lm.tokenizer
            prompts = [tok(render(tok, [{"role": "user", "content": q}], add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"] for q in ("Name a colour.", "What is 2 plus 2?")]
            answers.append(lm.generate(prompts, SamplingParams(max_tokens=6, temperature=0), lm.stop_ids()))
    assert answers[0] == answers[1] and all(answers[0])


def test_int8_and_4bit_need_cuda_and_bitsandbytes(qwen_dir, tmp_path, monkeypatch):
    import importlib.util

    from kdforge.stages.label import LabelConfig
    from kdforge.stages.label import run as run_label

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the errors below are for machines without one")
    for precision in ("int8", "4bit"):
        with pytest.raises(ConfigError, match=rf"precision {precision} .*bitsandbytes.*CUDA GPU.*pip install "
                                              "bitsandbytes"):
            load_model(str(qwen_dir), precision=precision)
    # Refused before the stage creates its folder (nothing half-written to clean up).
    out = tmp_path / "labels"
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        run_label(LabelConfig(teacher=str(qwen_dir), data=str(tmp_path / "none.jsonl"), out=str(out), precision="int8"))
    assert not out.exists()
    # With bitsandbytes installed but no GPU, the message names the GPU alone.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="needs a CUDA GPU: this machine has no CUDA GPU") as e:
        load_model(str(qwen_dir), precision="4bit")
    assert "not installed" not in str(e.value)


def test_placement_fields_are_checked_when_the_config_is_read():
    ok = TeacherPlacement(device_map="auto", max_memory={0: "70GiB", "1": 2 * GiB, "cpu": "200GiB"})
    assert ok.load_kwargs("cuda:1")["device"] == "cuda:1" and ok.load_kwargs()["max_memory"]["cpu"] == "200GiB"
    bad = {
        "max_memory bounds device_map=auto": dict(max_memory={0: "70GiB"}),
        "memory size 'lots'": dict(device_map="auto", max_memory={"cpu": "lots"}),
        "device 'tpu'": dict(device_map={"": "tpu"}),
        "needs offload_folder": dict(device_map={"": "disk"}),
        "leave device at auto": dict(device="cuda:0", device_map="auto"),
        "dtype float32 and precision bf16 disagree": dict(dtype="float32", precision="bf16"),
        "device_map is empty": dict(device_map={}),
    }
    for message, fields in bad.items():
        with pytest.raises(ValidationError, match=message):
            TeacherPlacement(**fields)
    with pytest.raises(ValidationError, match="precision"):
        TeacherPlacement(precision="int4")


def test_dtype_and_precision_are_one_setting():
    """The older dtype field keeps working and fills in precision (and the reverse), so a config written
    either way resumes the other; auto is bf16 on CUDA, fp32 on CPU."""
    assert TeacherPlacement(dtype="bfloat16").precision == "bf16"
    assert TeacherPlacement(precision="fp16").dtype == "float16"
    assert TeacherPlacement(precision="int8").dtype == "auto"
    assert resolve_precision("auto", "auto", cuda=True) == "bf16" and resolve_precision("auto", "auto", False) == "fp32"
    assert resolve_precision("auto", "float16", False) == "fp16" and resolve_precision("4bit", "auto", True) == "4bit"
    # A config.yaml written before precision existed resumes as its dtype's precision.
    assert earlier_precision({"dtype": "float32"})["precision"] == "fp32"
    assert earlier_precision({"dtype": "auto", "precision": "bf16"})["precision"] == "bf16"


def test_each_rank_places_on_its_own_gpus():
    """Under torchrun, local rank l of L takes GPUs l*g .. l*g+g-1 (g = visible // L), and the numbers in a map
    count within them: one config means the same at any world size."""
    assert local_gpus(8, 0, 1) == list(range(8))
    assert local_gpus(8, 1, 2) == [4, 5, 6, 7] and local_gpus(8, 3, 4) == [6, 7]
    assert local_gpus(0, 1, 2) == []  # CPU only: nothing to share
    with pytest.raises(ConfigError, match="3 processes on this node share 2 GPU"):
        local_gpus(2, 0, 3)
    dmap, mem = localize("auto", {0: "70GiB", "1": "10GB", "cpu": "200GiB", "disk": 5}, [4, 5, 6, 7])
    assert dmap == "auto" and mem == {4: 70 * GiB, 5: 10 * 10**9, "cpu": 200 * GiB, "disk": 5}
    dmap, _ = localize({"model.layers.0": 0, "model.layers.1": "cuda:1", "lm_head": "cpu"}, None, [2, 3])
    assert dmap == {"model.layers.0": 2, "model.layers.1": 3, "lm_head": "cpu"}
    with pytest.raises(ConfigError, match=r"device 2 in device_map/max_memory: this rank has GPUs \[2, 3\]"):
        localize({"": 2}, None, [2, 3])
    assert size_bytes("1.5GiB") == int(1.5 * GiB) and size_bytes("500MB") == 500 * 10**6 and size_bytes(7) == 7


def test_from_pretrained_arguments_on_cpu(tmp_path):
    kw = from_pretrained_kwargs("auto", "auto", "auto", "auto", {"cpu": "1GiB"}, None)
    assert kw == {"dtype": torch.float32, "device_map": "auto", "max_memory": {"cpu": GiB}}
    kw = from_pretrained_kwargs("cpu", "auto", "bf16", None, None, None)
    assert kw == {"dtype": torch.bfloat16}


def test_llama_cpp_refuses_a_placement():
    from kdforge.runtime.llamacpp import LlamaCppRuntime

    with pytest.raises(ConfigError, match="device_map, precision need the transformers backend"):
        LlamaCppRuntime.load("m.gguf", placement={"device_map": "auto", "precision": "int8", "max_memory": None})
    from kdforge.stages.generate import GenerateConfig

    with pytest.raises(ValidationError, match="apply to the transformers backend"):
        GenerateConfig(model="m.gguf", backend="llama.cpp", precision="4bit")


def test_label_records_the_precision_and_old_caches_keep_their_bytes(qwen_dir, tmp_path):
    """The manifest names the teacher's precision; a cache made before it did reads, and writes back byte for
    byte (the key stays absent rather than null)."""
    from kdforge.artifacts import atomic_write_json
    from kdforge.softlabels.reader import SoftLabelCache, read_manifest
    from kdforge.softlabels.writer import manifest_json
    from kdforge.stages.label import LabelConfig
    from kdforge.stages.label import run as run_label

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi there."},
                                                       {"role": "assistant", "content": "Hello, friend."}]}) + "\n")
    out = tmp_path / "labels"
    run_label(LabelConfig(teacher=str(qwen_dir), data=str(data), out=str(out), top_k=4, device_map="auto",
                          max_memory={"cpu": "2GiB"}))
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["teacher"]["precision"] == "fp32"
    del raw["teacher"]["precision"]  # as a cache from before
    old = tmp_path / "old.json"
    atomic_write_json(old, raw)
    manifest = read_manifest(old)
    assert manifest.teacher.precision is None
    again = tmp_path / "again.json"
    atomic_write_json(again, manifest_json(manifest))
    assert again.read_bytes() == old.read_bytes()
    (out / "manifest.json").write_bytes(old.read_bytes())
    assert len(SoftLabelCache(out)) == 1


def test_distill_with_a_device_mapped_live_teacher_trains_as_a_plain_one(qwen_dir, tmp_path, tokenizer, monkeypatch):
    """`distill.teacher_placement.device_map`: the live teacher placed by accelerate's dispatch (CPU + disk here,
    the path a multi-GPU map takes) gives the losses of a plain load, step for step."""
    import kdforge.models.loading as loading
    from kdforge.cli import main

    maps = []

    def recording_load(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)
        maps.append(getattr(model, "hf_device_map", None))
        return model, tok

    monkeypatch.setattr(loading, "load_model", recording_load)

    student = save_tiny(tmp_path / "student", "qwen2", tokenizer, seed=6)
    convs = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"Count to {i}."},
                                          {"role": "assistant", "content": " ".join(str(j) for j in range(i + 2))}]}
             for i in range(6)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    common = ["distill", "--teacher", str(qwen_dir), "--student", str(student), "--data", str(data), "--steps", "3",
              "--batch-size", "2", "--set", "log_every=1", "--set", "device=cpu", "--set", "precision=fp32"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    split = json.dumps(SPLIT)  # some modules on the CPU, the head on disk (loaded into place when it runs)
    assert main([*common, "--out", str(tmp_path / "mapped"), "--set", f"teacher_placement.device_map={split}",
                 "--set", f"teacher_placement.offload_folder={tmp_path / 'offload'}"]) == 0

    def losses(name):
        return [json.loads(x)["loss"] for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    assert losses("mapped") == pytest.approx(losses("plain"), rel=1e-6)
    assert SPLIT in maps  # the teacher really was dispatched by the map (the head on disk, loaded when it runs)
