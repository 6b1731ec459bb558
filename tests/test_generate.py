import json
import signal

import pytest

from kdforge.data.formats import select_split
from kdforge.data.prompts import load_prompt_set
from kdforge.stages.generate import GenerateConfig
from kdforge.stages.generate import run as run_generate

from .conftest import kill_when

pytestmark = pytest.mark.integration


def records(path):
    return [json.loads(x) for x in (path / "data.jsonl").read_text(encoding="utf-8").splitlines()]


def test_generate_batched_with_records(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "gen"
    cfg = GenerateConfig(model=str(tiny_model_dir), prompts=str(prompts_file), out=str(out),
                         batch_size=4, max_new_tokens=8)
    m = run_generate(cfg)
    recs = records(out)
    assert m["records"] == 9 and sorted(r["id"] for r in recs) == sorted([f"t{i}" for i in range(6)] +
                                                                          [f"v{i}" for i in range(3)])
    for r in recs:
        assert r["messages"][-1]["role"] == "assistant" and r["finish_reason"] in ("stop", "length")
        assert 1 <= r["completion_tokens"] <= 8 and r["prompt_tokens"] > 0
    assert {r["split"] for r in recs} == {"train", "validation"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["parents"]["prompts"]["sha256"]
    # A re-run has nothing to do and changes nothing.
    before = (out / "data.jsonl").read_bytes()
    assert run_generate(cfg)["resumed_records"] == 9
    assert (out / "data.jsonl").read_bytes() == before


def test_greedy_batched_equals_unbatched(tiny_llama_dir, prompts_file, tmp_path):
    outs = []
    for bs in (1, 4):
        cfg = GenerateConfig(model=str(tiny_llama_dir), prompts=str(prompts_file), out=str(tmp_path / f"b{bs}"),
                             batch_size=bs, max_new_tokens=6)
        run_generate(cfg)
        outs.append({r["id"]: r["messages"][-1]["content"] for r in records(tmp_path / f"b{bs}")})
    assert outs[0] == outs[1]


def test_sampled_several_per_prompt(tiny_llama_dir, prompts_file, tmp_path):
    cfg = GenerateConfig(model=str(tiny_llama_dir), prompts=str(prompts_file), out=str(tmp_path / "s"),
                         preset="recipe", num_samples=2, max_new_tokens=5, split="validation")
    run_generate(cfg)
    ids = sorted(r["id"] for r in records(tmp_path / "s"))
    assert ids == ["v0/0", "v0/1", "v1/0", "v1/1", "v2/0", "v2/1"]


def test_changed_settings_refuse_to_resume(tiny_llama_dir, prompts_file, tmp_path):
    base = dict(model=str(tiny_llama_dir), prompts=str(prompts_file), out=str(tmp_path / "g"), split="validation")
    run_generate(GenerateConfig(**base, max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens: 4 before, 5 now"):
        run_generate(GenerateConfig(**base, max_new_tokens=5))


def test_other_precision_or_a_new_setting_refuse_to_resume(tiny_llama_dir, prompts_file, tmp_path):
    """dtype changes the answers, so it may not change; a setting the earlier run did not record (a field
    added to the config since) is refused by default; one that may change (batch size, limits) resumes."""
    import yaml

    base = dict(model=str(tiny_llama_dir), prompts=str(prompts_file), out=str(tmp_path / "g"), max_new_tokens=4)
    run_generate(GenerateConfig(**base, split="validation", dtype="float32"))
    with pytest.raises(ValueError, match="dtype: 'float32' before, 'bfloat16' now"):
        run_generate(GenerateConfig(**base, split="validation", dtype="bfloat16"))
    m = run_generate(GenerateConfig(**base, dtype="float32", batch_size=2, limit=2, device="cpu"))
    assert m["resumed_records"] == 3 and m["records"] == 5  # 2 train prompts added to the 3 validation ones
    config = tmp_path / "g" / "config.yaml"
    old = yaml.safe_load(config.read_text())
    del old["seed"]
    config.write_text(yaml.safe_dump(old))
    with pytest.raises(ValueError, match=r"seed: \(not set\) before, 0 now"):
        run_generate(GenerateConfig(**base, dtype="float32", limit=2))


def test_torn_last_line_is_dropped_and_redone(tiny_llama_dir, prompts_file, tmp_path):
    cfg = GenerateConfig(model=str(tiny_llama_dir), prompts=str(prompts_file), out=str(tmp_path / "g"),
                         max_new_tokens=4)
    run_generate(cfg)
    data = tmp_path / "g" / "data.jsonl"
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[:-1]) + lines[-1][:10])  # as if killed mid-write
    m = run_generate(cfg)
    assert m["resumed_records"] == 8 and m["records"] == 9
    ids = [r["id"] for r in records(tmp_path / "g")]
    assert len(ids) == len(set(ids)) == 9


def test_killed_run_resumes_without_duplicates_or_losses(tiny_llama_dir, tmp_path):
    out = tmp_path / "killed"
    data = out / "data.jsonl"
    rc = kill_when(["generate", str(tiny_llama_dir), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "24",
                    "--limit", "60"], lambda: data.is_file() and data.read_bytes().count(b"\n") >= 6)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "meta.json").exists()
    expected = {c.id for c in select_split(load_prompt_set("bundled"), "all", limit=60)}
    done_before = data.read_bytes().count(b"\n")
    assert 6 <= done_before < len(expected)
    m = run_generate(GenerateConfig(model=str(tiny_llama_dir), out=str(out), batch_size=2, max_new_tokens=24,
                                    limit=60))
    ids = [r["id"] for r in records(out)]
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert m["resumed_records"] == done_before


def test_sampled_answers_are_per_record_and_use_the_one_sampler(tiny_llama_dir, prompts_file, tmp_path):
    """Each record draws from its own seeded generator through kdforge's sampler: the same answers at
    another batch size, other answers with another seed, and exactly what the runtime's sampler gives."""
    from kdforge.data.chat import encode_prompt
    from kdforge.runtime import SamplingParams, make_generator, open_model

    def sampled(name, batch_size, seed):
        cfg = GenerateConfig(model=str(tiny_llama_dir), prompts=str(prompts_file), out=str(tmp_path / name),
                             batch_size=batch_size, max_new_tokens=6, preset="recipe", num_samples=2, seed=seed)
        run_generate(cfg)
        return {r["id"]: r["messages"][-1]["content"] for r in records(tmp_path / name)}

    a, b, c = sampled("a", 4, 1), sampled("b", 3, 1), sampled("c", 4, 2)
    assert a == b and a != c
    assert a["t0/0"] != a["t0/1"] or a["t1/0"] != a["t1/1"]  # two samples of a prompt differ
    import zlib

    with open_model(str(tiny_llama_dir), "transformers") as lm:
        conv = next(x for x in load_prompt_set(str(prompts_file)) if x.id == "t2")
        ids = encode_prompt(lm.tokenizer, conv.prompt_messages)
        g = make_generator(1 * 1_000_003 + zlib.crc32(b"t2/1"))
        (answer,) = lm.generate([ids], SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9), lm.stop_ids(), [g])
    assert a["t2/1"] == lm.tokenizer.decode(answer, skip_special_tokens=True).strip()
