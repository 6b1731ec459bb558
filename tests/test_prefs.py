"""`kdforge prefs`: sampled candidates ranked by the teacher, as DPO pairs and KTO singles; and the readers the
trainer uses (`load_pairs`, `load_singles`), on the artifact and on TRL-format user files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdforge.cli import main
from kdforge.data.formats import DataError
from kdforge.distill import preference_data as prefdata
from kdforge.distill.preference_data import Candidate, PreferencePair, PreferenceSingle, load_pairs, load_singles
from kdforge.stages.prefs import PrefsConfig
from kdforge.stages.prefs import run as run_prefs

from .conftest import make_tiny, save_tiny

pytestmark = pytest.mark.integration

TURNS = [("Name a colour.", "Blue is the colour of the sky."), ("Say hello.", "Hello! How can I help you today?"),
         ("Count to three.", "One, two, three."), ("What is two plus two?", "Two plus two is four."),
         ("Name an animal.", "A cat is an animal.")]
PRODUCTS = ("candidates.jsonl", "pairs.jsonl", "singles.jsonl")


def _data(path: Path) -> Path:
    """Five one-turn conversations, the last two in the validation split."""
    rows = [{"id": f"c{i}", "split": "train" if i < 3 else "validation", "category": "demo" if i % 2 else "chat",
             "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            for i, (u, a) in enumerate(TURNS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Qwen2 (untied, another chat template than the sampler's) as the ranking teacher."""
    return save_tiny(tmp_path_factory.mktemp("prefs-teacher"), "qwen2", tokenizer, seed=7)


@pytest.fixture(scope="module")
def trained_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama trained for 20 steps on the data's own answers: it clearly prefers them."""
    from kdforge.data.batching import collate
    from kdforge.data.chat import encode_conversation

    model = make_tiny("llama", len(tokenizer), seed=3).train()
    encs = [encode_conversation(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a}])
            for u, a in TURNS]
    batch = collate(encs, tokenizer.pad_token_id or 0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    torch.manual_seed(0)
    for _ in range(20):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("prefs-trained")
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cfg(tmp_path, sampler, teacher, out="p", **kw) -> PrefsConfig:
    base = dict(data=str(_data(tmp_path / "data.jsonl")), sampler=str(sampler), teacher=str(teacher),
                out=str(tmp_path / out), num_samples=3, max_new_tokens=5, batch_size=4)
    return PrefsConfig(**{**base, **kw})


def _rows(folder: Path, name: str = "candidates.jsonl") -> list[dict]:
    return [json.loads(x) for x in (folder / name).read_text(encoding="utf-8").splitlines()]


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in PRODUCTS}


def reference_loglik(model, tok, prompt: list[dict], answer: str) -> float:
    """The teacher's mean log-probability of the answer's tokens (end-of-turn included), computed without
    kdforge: render prompt+answer with the chat template, the answer starts after the generation prompt's
    tokens and ends at its <|im_end|>; one forward pass, log_softmax, gather, mean."""
    full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    prefix = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert full.startswith(prefix)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    start = len(tok(prefix, add_special_tokens=False)["input_ids"])
    end = ids.index(tok.convert_tokens_to_ids("<|im_end|>"), start)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # (T, V)
    return float(torch.stack([logp[t - 1, ids[t]] for t in range(start, end + 1)]).double().mean())


# ---- (1) reproducible -----------------------------------------------------------------------------------

def test_same_seed_same_candidates_whatever_the_batch_size(tiny_llama_dir, teacher_dir, tmp_path):
    run_prefs(_cfg(tmp_path, tiny_llama_dir, teacher_dir, "a", batch_size=4))
    run_prefs(_cfg(tmp_path, tiny_llama_dir, teacher_dir, "b", batch_size=1))
    run_prefs(_cfg(tmp_path, tiny_llama_dir, teacher_dir, "c", batch_size=4, seed=1))
    a, b, c = (_rows(tmp_path / x) for x in "abc")
    assert a == b  # texts, token counts, finished flags and scores, bit for bit
    assert [r["id"] for r in a] == [f"c{i}" for i in range(5)]
    assert [[x["text"] for x in r["candidates"]] for r in a] != [[x["text"] for x in r["candidates"]] for r in c]
    for r in a:
        assert [x["sample"] for x in r["candidates"]] == [0, 1, 2]
        assert all(x["from"] == "sampler" and x["tokens"] <= 5 for x in r["candidates"])
        # Random models rarely end a turn within 5 tokens: a candidate cut at the cap is kept, marked unfinished.
        assert all(x["finished"] == (bool(x["text"]) and x["tokens"] < 5) for x in r["candidates"])
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["stage"] == "prefs" and meta["files"] == {"candidates": "candidates.jsonl", "pairs": "pairs.jsonl",
                                                          "singles": "singles.jsonl"}
    m = meta["metrics"]
    assert m["prompts"] == 5 and m["candidates"] == 15 and m["pairs"] == len(_rows(tmp_path / "a", "pairs.jsonl"))
    assert m["pairs"] + sum(m["skipped"].values()) == 5 and m["seconds_sampling_this_run"] > 0


# ---- (2) resumable ------------------------------------------------------------------------------------

def test_a_run_stopped_midway_finishes_with_the_files_of_one_uninterrupted_run(tiny_llama_dir, teacher_dir, tmp_path,
                                                                               monkeypatch):
    import kdforge.stages.prefs as stage

    run_prefs(_cfg(tmp_path, tiny_llama_dir, teacher_dir, "whole", batch_size=3))  # one conversation per group
    whole = _files(tmp_path / "whole")

    real, calls = stage.append_lines, []

    def dies_on_the_third(path, lines):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill between two groups
        real(path, lines)

    monkeypatch.setattr(stage, "append_lines", dies_on_the_third)
    cut = _cfg(tmp_path, tiny_llama_dir, teacher_dir, "cut", batch_size=3)
    with pytest.raises(KeyboardInterrupt):
        run_prefs(cut)
    assert len(_rows(tmp_path / "cut")) == 2 and not (tmp_path / "cut" / "meta.json").exists()
    assert not (tmp_path / "cut" / "pairs.jsonl").exists()  # no product before the run is complete
    monkeypatch.setattr(stage, "append_lines", real)
    m = run_prefs(cut)
    assert m["resumed_prompts"] == 2 and _files(tmp_path / "cut") == whole

    # A smaller selection first (limit 1 per split: c0, c3), then all: the same files, in the data's order.
    run_prefs(_cfg(tmp_path, tiny_llama_dir, teacher_dir, "grow", batch_size=6, limit=1))
    assert [r["id"] for r in _rows(tmp_path / "grow")] == ["c0", "c3"]
    assert run_prefs(_cfg(tmp_path, tiny_llama_dir, teacher_dir, "grow", batch_size=6))["resumed_prompts"] == 2
    assert _files(tmp_path / "grow") == whole


def test_resume_refuses_other_sampling_settings_and_rebuilds_for_product_settings(tiny_llama_dir, teacher_dir,
                                                                                  tmp_path):
    from kdforge.config import ConfigError

    run_prefs(_cfg(tmp_path, tiny_llama_dir, teacher_dir, num_samples=2, max_new_tokens=3))
    with pytest.raises(ConfigError, match="temperature"):
        run_prefs(_cfg(tmp_path, tiny_llama_dir, teacher_dir, num_samples=2, max_new_tokens=3, temperature=0.5))
    before = (tmp_path / "p" / "candidates.jsonl").read_bytes()
    m = run_prefs(_cfg(tmp_path, tiny_llama_dir, teacher_dir, num_samples=2, max_new_tokens=3, min_margin=1e9))
    assert m["resumed_prompts"] == 5 and m["pairs"] == 0 and m["skipped"]["margin"] + m["skipped"]["tie"] == 5
    assert (tmp_path / "p" / "candidates.jsonl").read_bytes() == before  # nothing sampled again


# ---- (3) and (4): the ranking and the score --------------------------------------------------------------

def test_the_teacher_prefers_its_own_answers_and_the_order_follows_its_loglik(tiny_llama_dir, trained_teacher_dir,
                                                                              tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, tiny_llama_dir, trained_teacher_dir, include_reference=True, pairs="all")
    m = run_prefs(cfg)
    teacher = AutoModelForCausalLM.from_pretrained(trained_teacher_dir).eval()
    rows = _rows(tmp_path / "p")
    for row, (_, answer) in zip(rows, TURNS):
        cands = row["candidates"]
        assert cands[-1] == {**cands[-1], "text": answer, "from": "data", "sample": None, "finished": True}
        mine = [reference_loglik(teacher, tokenizer, row["messages"], c["text"]) for c in cands]
        assert [c["score"] for c in cands] == pytest.approx(mine, abs=1e-5)
        assert max(mine) == mine[-1] and mine[-1] > max(mine[:-1]) + 1.0  # clearly the teacher's favourite
    pairs = load_pairs(tmp_path / "p", "all")
    assert len(pairs) == m["pairs"] == 5 * 6  # pairs=all: every (better, worse) pair of 4 distinct scores
    for row, (_, answer) in zip(rows, TURNS):
        mine = sorted(row["candidates"], key=lambda c: -c["score"])
        expected = [(a["text"], b["text"]) for i, a in enumerate(mine) for b in mine[i + 1:]]
        got = [(p.chosen, p.rejected) for p in pairs if p.id == row["id"]]
        assert got == expected and got[0][0] == answer
        for p in (p for p in pairs if p.id == row["id"]):
            assert p.chosen_score > p.rejected_score
    # best_worst: the data's answer against the worst sample; singles: the median split.
    m = run_prefs(_cfg(tmp_path, tiny_llama_dir, trained_teacher_dir, include_reference=True))
    for p, row, (_, answer) in zip(load_pairs(tmp_path / "p", "all"), rows, TURNS):
        assert (p.chosen, p.chosen_from) == (answer, "data")
        assert p.rejected_score == min(c["score"] for c in row["candidates"])
        assert p.messages == [{"role": "user", "content": row["messages"][0]["content"]}]
    singles = load_singles(tmp_path / "p", "all")
    assert m["singles"] == len(singles) == 5 * 4  # 4 distinct scores: the median lies between two of them
    for row in rows:
        mine = [s for s in singles if s.id == row["id"]]
        assert [s.desirable for s in mine] == [True, True, False, False]
        assert mine[0].completion == row["candidates"][-1]["text"] and mine[0].source == "data"
    assert {p.split for p in load_pairs(tmp_path / "p", "validation")} == {"validation"}
    assert [p.id for p in load_pairs(tmp_path / "p")] == ["c0", "c1", "c2"]  # default: train


def test_loglik_equals_an_independent_computation(teacher_dir, tokenizer):
    """A multi-turn prompt: only the last assistant turn is scored, in the teacher's own template (Qwen-style)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.runtime import open_model

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    answers = ["Blue.", "Green, like grass in spring.", "", "Red"]
    with open_model(str(teacher_dir), "transformers", "cpu") as lm:
        got = prefdata.loglik_scores(lm, prompt, answers, len(tok))
    assert got == pytest.approx([reference_loglik(model, tok, prompt, a) for a in answers], abs=1e-5)
    enc = prefdata.answer_encoding(tok, prompt, "Blue.")
    scored = [t for t, x in zip(enc.input_ids, enc.labels) if x != -100]
    assert tok.decode(scored) == "Blue.<|im_end|>"  # the earlier "Hello." turn is not scored
    cut = prefdata.answer_encoding(tok, prompt, "Blue.", max_length=len(enc.input_ids) - 1)
    assert cut.labels == enc.labels[:-1]


# ---- the judge -----------------------------------------------------------------------------------------

class FakeJudge:
    """A runtime that grades by what the judge prompt holds: 9 for GOOD, "2/10" for BAD, no grade otherwise."""

    def __init__(self, tok):
        self.tokenizer, self.seen = tok, []

    def stop_ids(self, tokenizer=None):
        return [self.tokenizer.eos_token_id]

    def generate(self, prompts, params, stop_ids, generators=None, batch_size=16, vocab=None):
        assert params.greedy and params.max_tokens == prefdata.JUDGE_MAX_TOKENS
        out = []
        for p in prompts:
            text = self.tokenizer.decode(p)
            self.seen.append(text)
            answer = text.split("[Answer]\n", 1)[1].split("\n\nReply with the score only", 1)[0]
            reply = "Score: 9" if "GOOD" in answer else "2/10" if "BAD" in answer else f"{len(answer) % 10 + 1}"
            out.append(self.tokenizer(reply if "meh" not in answer else "no idea", add_special_tokens=False)
                       ["input_ids"])
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_judge_prompt_and_parsing(tokenizer):
    assert [prefdata.parse_judge_score(x) for x in ("8", "Score: 7", "8/10", "10.", "0", "11", "none", " 3.5")] == \
        [8.0, 7.0, 8.0, 10.0, None, None, None, 3.5]
    judge = FakeJudge(tokenizer)
    scores, replies = prefdata.judge_scores(judge, [{"role": "user", "content": "Say hi."}],
                                            ["GOOD hi", "BAD hi", "meh"])
    assert scores == [9.0, 2.0, None] and replies == ["Score: 9", "2/10", "no idea"]
    assert "User: Say hi.\n\n[Answer]\nGOOD hi\n\nReply with the score only" in judge.seen[0]
    assert prefdata.JUDGE_PROMPT in (Path(__file__).parent.parent / "docs" / "preferences.md").read_text()


def test_rank_by_judge_runs_the_stage(tiny_llama_dir, tokenizer, tmp_path, monkeypatch):
    import kdforge.runtime as runtime

    real = runtime.open_model
    monkeypatch.setattr(runtime, "open_model", lambda spec, *a, **k: FakeJudge(tokenizer) if spec == "judge"
                        else real(spec, *a, **k))
    m = run_prefs(_cfg(tmp_path, tiny_llama_dir, "judge", rank_by="judge", include_reference=True))
    rows = _rows(tmp_path / "p")
    for row in rows:
        assert all(c["score"] == float(len(c["text"]) % 10 + 1) for c in row["candidates"])
        assert all(c["judge"] == str(int(c["score"])) for c in row["candidates"])
    assert m["pairs"] + sum(m["skipped"].values()) == 5
    for p in load_pairs(tmp_path / "p", "all"):
        assert p.chosen_score > p.rejected_score


# ---- pairs and singles, unit by unit ---------------------------------------------------------------------

def _cands(*scores, texts=None):
    texts = texts or [f"answer {i}" for i in range(len(scores))]
    return [Candidate(t, "sampler", i, 3, True, s) for i, (t, s) in enumerate(zip(texts, scores))]


ROW = {"id": "x", "split": "train", "category": "general", "messages": [{"role": "user", "content": "q"}]}


def test_ranking_ties_duplicates_margins_and_the_median():
    # Ties keep list order; a repeated text counts once; an unscored candidate is left out.
    cands = _cands(-1.0, -2.0, -1.0, None, -2.0, texts=["a", "b", "c", "d", "b"])
    assert prefdata.rank(cands) == [0, 2, 1]
    pairs, reason = prefdata.build_pairs(ROW, cands, "best_worst", 0.0)
    assert reason is None and [(p.chosen, p.rejected) for p in pairs] == [("a", "b")]
    pairs, _ = prefdata.build_pairs(ROW, cands, "all", 0.0)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("c", "b")]  # a vs c: no gap, no pair
    assert prefdata.build_pairs(ROW, cands, "all", 1.5) == ([], "margin")
    assert prefdata.build_pairs(ROW, _cands(-1.0, -1.0), "best_worst", 0.0) == ([], "tie")
    assert prefdata.build_pairs(ROW, _cands(-1.0, None), "best_worst", 0.0) == ([], "too_few_scored")
    pairs, _ = prefdata.build_pairs(ROW, _cands(-1.0, -2.0, -4.0), "all", 1.5)
    assert [(p.chosen, p.rejected) for p in pairs] == [("answer 0", "answer 2"), ("answer 1", "answer 2")]
    singles, _ = prefdata.build_singles(ROW, _cands(-1.0, -2.0, -3.0), 0.0)
    assert [(s.completion, s.desirable) for s in singles] == [("answer 0", True), ("answer 2", False)]  # median out
    assert prefdata.build_singles(ROW, _cands(-1.0, -1.0), 0.0) == ([], "tie")


def test_seeds_depend_on_the_conversation_and_sample_alone():
    assert prefdata.candidate_seed(0, "c1", 2) == prefdata.candidate_seed(0, "c1", 2)
    assert len({prefdata.candidate_seed(s, c, k) for s in (0, 1) for c in ("c1", "c2") for k in (0, 1)}) == 8


# ---- (5) bad input -------------------------------------------------------------------------------------

def test_bad_settings_are_one_line_and_write_nothing(tiny_llama_dir, tmp_path, capsys):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="num_samples"):
        PrefsConfig(data="d", sampler="s", teacher="t", num_samples=1)
    with pytest.raises(ValidationError, match="sampler runs locally"):
        PrefsConfig(data="d", sampler="http://h:8000/v1", teacher="t")
    with pytest.raises(ValidationError, match="needs its tokenizer"):
        PrefsConfig(data="d", sampler="s", teacher="http://h:8000/v1")
    data, out = _data(tmp_path / "d.jsonl"), tmp_path / "o"
    base = ["prefs", "--data", str(data), "--sampler", str(tiny_llama_dir), "--out", str(out)]
    assert main([*base, "--teacher", str(tiny_llama_dir), "--num-samples", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdforge: error:") and "num_samples" in err and "Traceback" not in err
    assert main([*base, "--teacher", str(tmp_path / "no_such_teacher")]) == 2
    assert "no_such_teacher" in capsys.readouterr().err and not out.exists()  # nothing blocks the fix


def test_bad_preference_rows_name_file_line_and_field(tmp_path):
    f = tmp_path / "pairs.jsonl"
    good = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}
    f.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "Say hi.", "chosen": "Hi!"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: no 'rejected' field.*docs/preferences\.md"):
        load_pairs(f)
    f.write_text(json.dumps(good) + "\n\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: not valid JSON"):
        load_pairs(f)
    f.write_text(json.dumps({**good, "chosen": [{"role": "user", "content": "Hi!"}]}) + "\n")
    with pytest.raises(DataError, match=r":1: 'chosen' must be a string or a list of exactly one assistant"):
        load_pairs(f)
    f.write_text(json.dumps({**good, "chosen_score": "high"}) + "\n")
    with pytest.raises(DataError, match=r":1: 'chosen_score' must be a number"):
        load_pairs(f)
    f.write_text(json.dumps({**good, "split": "test"}) + "\n")
    with pytest.raises(DataError, match=r":1: 'split' is 'test'"):
        load_pairs(f)
    f.write_text(json.dumps({**good, "split": "validation"}) + "\n")
    with pytest.raises(DataError, match="no pairs in split 'train'"):
        load_pairs(f)
    s = tmp_path / "singles.jsonl"
    s.write_text(json.dumps({"prompt": "Say hi.", "completion": "Hi!", "label": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"singles\.jsonl:1: 'desirable' \(or TRL's 'label'\) must be true or false"):
        load_singles(s)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(DataError, match=r"incomplete \(no meta\.json\).*same --out"):
        load_pairs(tmp_path / "unfinished")
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")


# ---- (6) TRL-format user data ----------------------------------------------------------------------------

def test_trl_format_rows_load_into_the_same_pairs_and_singles(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    ours = {"id": "p1", "split": "train", "category": "chat", "messages": prompt, "chosen": "Hi!",
            "rejected": "Go away.", "chosen_score": -0.5, "rejected_score": -3.0, "chosen_from": "data",
            "rejected_from": "data"}
    explicit = {"id": "p1", "category": "chat", "prompt": prompt, "chosen": [{"role": "assistant", "content": "Hi!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}], "chosen_score": -0.5,
                "rejected_score": -3.0}
    implicit = {"id": "p1", "category": "chat", "chosen_score": -0.5, "rejected_score": -3.0,
                "chosen": [*prompt, {"role": "assistant", "content": "Hi!"}],
                "rejected": [*prompt, {"role": "assistant", "content": "Go away."}]}
    files = []
    for name, row in (("ours", ours), ("explicit", explicit), ("implicit", implicit)):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text(json.dumps(row) + "\n")
    loaded = [load_pairs(f) for f in files]
    assert loaded[0] == loaded[1] == loaded[2] == [PreferencePair("p1", "train", "chat", prompt, "Hi!", "Go away.",
                                                                  -0.5, -3.0, "data", "data")]
    # A plain-string prompt is one user turn; rows without an id are named by their line.
    f = tmp_path / "plain.jsonl"
    f.write_text(json.dumps({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}) + "\n")
    assert load_pairs(f) == [PreferencePair("line1", "train", "general", [{"role": "user", "content": "Say hi."}],
                                            "Hi!", "Go away.", None, None, "data", "data")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**implicit, "rejected": [{"role": "user", "content": "Other."},
                                                        {"role": "assistant", "content": "Go away."}]}) + "\n")
    with pytest.raises(DataError, match="must share every message but the last"):
        load_pairs(bad)
    # KTO: TRL's {"prompt", "completion", "label"} and kdforge's singles rows.
    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"id": "k", "prompt": prompt, "completion": [{"role": "assistant", "content": "Hi!"}],
                               "label": True}) + "\n" +
                   json.dumps({"id": "k", "messages": prompt, "completion": "Go away.", "desirable": False,
                               "score": -3.0, "from": "sampler"}) + "\n")
    assert load_singles(kto) == [PreferenceSingle("k", "train", "general", prompt, "Hi!", True, None, "data"),
                                 PreferenceSingle("k", "train", "general", prompt, "Go away.", False, -3.0, "sampler")]


def test_the_command_line_and_a_run_file(tiny_llama_dir, teacher_dir, tmp_path):
    from kdforge.stages import plan_file

    data, out = _data(tmp_path / "d.jsonl"), tmp_path / "cli"
    assert main(["prefs", "--data", str(data), "--sampler", str(tiny_llama_dir), "--teacher", str(teacher_dir),
                 "--out", str(out), "--num-samples", "2", "--max-new-tokens", "3", "--split", "train"]) == 0
    assert [p.id for p in load_pairs(out)] == [r["id"] for r in _rows(out, "pairs.jsonl")]
    assert {r["split"] for r in _rows(out)} == {"train"}
    f = tmp_path / "run.yaml"
    f.write_text(f"vars:\n  root: {tmp_path}\ngenerate:\n  model: m\n  out: ${{root}}/g\nprefs:\n  data: ${{root}}/g\n"
                 f"  sampler: s\n  teacher: m\n  out: ${{root}}/prefs\ndistill:\n  student: s\n  data: d.jsonl\n"
                 "  teacher: m\n")
    # prefs before distill: it ranks a KD run's student for the DPO distill after it
    assert [s.name for s, _ in plan_file(str(f))] == ["generate", "prefs", "distill"]
