"""`kdforge eval` on tiny models: the report, its figures, the task scorer, the code sandbox,
the stability measure, plots and the lm-evaluation-harness path."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from kdforge.cli import main
from kdforge.eval import stability as stab
from kdforge.eval.sandbox import run_python
from kdforge.eval.tasks import (
    TaskItem,
    chance_level,
    extract_code,
    load_tasks,
    normalize,
    numbers_in,
    predicted_number,
    score_item,
    score_short,
)

from .conftest import make_tiny

# Small enough for seconds on 2 cores; every section still runs.
FAST = ["--task-limit", "2", "--set", "task_max_new_tokens=4", "--set", "code_max_new_tokens=8",
        "--set", "stability_prompts=2", "--set", "stability_samples=2", "--set", "stability_max_new_tokens=4",
        "--set", "decode_tokens=2", "--set", "speed_batch=2", "--set", "threads=1"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tokenizer):
    """A tiny teacher, its answers (two categories), a 1-layer student and a short distill run."""
    root = tmp_path_factory.mktemp("evalpipe")
    teacher = make_tiny("llama", len(tokenizer), seed=1)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(12.0)  # peaked predictions: KL between models is not ~0
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    rows = [{"id": f"t{i}", "prompt": f"Name a colour number {i}.", "split": "train", "category": "demo"}
            for i in range(4)]
    rows += [{"id": f"m{i}", "prompt": f"What is {i} plus {i}?", "split": "validation", "category": "math"}
             for i in range(3)]
    rows += [{"id": f"p{i}", "prompt": f"Write a line about {i} cats.", "split": "validation", "category": "poem"}
             for i in range(2)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = str(root / "teacher")
    assert main(["generate", t, "--prompts", str(root / "prompts.jsonl"), "--out", str(root / "gen"),
                 "--max-new-tokens", "6", "--batch-size", "8"]) == 0
    assert main(["student", t, "--out", str(root / "stu"), "--layers", "1"]) == 0
    assert main(["distill", "--teacher", t, "--student", str(root / "stu"), "--data", str(root / "gen"),
                 "--out", str(root / "dis"), "--steps", "4", "--batch-size", "2", "--lr", "3e-3",
                 "--set", "log_every=2", "--set", "eval_every=2", "--set", "split=all"]) == 0
    return root


@pytest.fixture(scope="module")
def report_dir(pipeline):
    r = pipeline
    assert main(["eval", "--teacher", str(r / "teacher"), "--students", str(r / "stu"), str(r / "dis"),
                 "--names", "raw", "kd", "--data", str(r / "gen"), "--out", str(r / "ev"), *FAST]) == 0
    return r / "ev"


def _json_numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _json_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _json_numbers(v)]
    return []


def _md_tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (header first, separator dropped)."""
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line):
                cur.append([c.strip() for c in line.strip("|").split("|")])
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def test_report_files_and_sections(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert {"report.json", "report.md", "config.yaml", "meta.json", "task_answers.jsonl", "stability_answers.jsonl",
            "quality_vs_size.png", "quality_vs_speed.png", "training_kd.png"} <= names
    report = json.loads((report_dir / "report.json").read_text())
    rows = {m["name"]: m for m in report["models"]}
    assert list(rows) == ["teacher", "raw", "kd"]
    assert rows["teacher"]["kl"] == pytest.approx(0, abs=1e-6) and rows["teacher"]["top1"] == 1.0
    assert report["ranking"]["order"][0] == "teacher" and rows["teacher"]["rank"] == 1
    for m in rows.values():
        assert m["tasks"]["short_items"] == 2 and m["tasks"]["code_items"] == 2
        assert 0 <= m["stability"]["divergence"] <= 1 and 0 <= m["stability"]["distinct"] <= 1
        sp = m["speed"]
        assert sp["decode_tokens_per_s_b1"] > 0 and sp["decode_tokens_per_s_bn"] > 0 and sp["ttft_ms_bn"] > 0
        assert sp["peak_rss_mb"] > sp["rss_start_mb"] > 0 and sp["threads"] == 1
        assert m["size"]["disk_bytes"] > 4 * m["size"]["params"] * 0.9  # fp32 safetensors
    assert report["threads"] == 1 and report["speed_batch"] == 2
    answers = [json.loads(x) for x in (report_dir / "task_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 * 4 and {"model", "id", "answer", "score", "status"} <= set(answers[0])


def test_every_figure_in_markdown_equals_report_json(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    md = (report_dir / "report.md").read_text()
    numbers = _json_numbers(report)
    tables = _md_tables(md)
    assert len(tables) >= 7
    checked = 0
    for t in tables:
        for row in t[1:]:
            for c in row[1:]:
                if not re.fullmatch(r"-?\d+(\.\d+)?", c):
                    assert c == "–" or not re.search(r"\d", c), f"unparsed figure {c!r}"
                    continue
                d = len(c.split(".")[1]) if "." in c else 0
                assert any(f"{v:.{d}f}" == c for v in numbers), f"{c} in report.md is not in report.json"
                checked += 1
    assert checked > 50
    # The summary table, column by column, against the named fields.
    summary = tables[0]
    assert summary[0][:3] == ["model", "params (M)", "NLL"]
    for row, m in zip(summary[1:], report["models"]):
        assert row == [m["name"], f"{m['params_m']:.1f}", f"{m['nll']:.4f}", f"{m['kl']:.4f}", f"{m['top1']:.3f}",
                       f"{m['decode_tokens_per_s']:.1f}", f"{m['ttft_ms']:.0f}"]
    # Prose figures too.
    assert f"{report['examples']} conversations, {report['target_tokens']} teacher-answer tokens" in md


def test_agreement_by_category(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    cats = report["categories"]
    assert set(cats) == {"math", "poem"}
    assert cats["math"]["conversations"] == 3 and cats["poem"]["conversations"] == 2
    assert sum(c["tokens"] for c in cats.values()) == report["target_tokens"]
    assert all(c["teacher_entropy"] > 0 for c in cats.values())
    for m in report["models"]:
        for k in ("nll", "kl", "top1"):
            # Token-weighted category means recombine into the overall mean.
            pooled = sum(m["by_category"][c][k] * cats[c]["tokens"] for c in cats) / report["target_tokens"]
            assert pooled == pytest.approx(m[k], rel=1e-6, abs=1e-9)
    assert report["models"][0]["by_category"]["math"]["kl"] == pytest.approx(0, abs=1e-6)
    md = (report_dir / "report.md").read_text()
    assert "| math | 3 |" in md and "teacher entropy (nats)" in md


def test_agreement_equals_shared_scoring(tokenizer):
    """Splitting the conversations into categories leaves the overall figures as they are."""
    from kdforge.data.chat import encode_conversation
    from kdforge.scoring import agreement, agreement_by_category

    teacher, student = make_tiny("llama", len(tokenizer), seed=1), make_tiny("llama", len(tokenizer), seed=2)
    convs = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "An answer " * (i + 1)}]
             for i in range(5)]
    data = [encode_conversation(tokenizer, c) for c in convs]
    ref = agreement(teacher, [teacher, student], data, tokenizer.pad_token_id, len(tokenizer), batch_size=2)
    got = agreement_by_category(teacher, [teacher, student], data, ["a", "b", "a", "c", "b"],
                                tokenizer.pad_token_id, len(tokenizer), batch_size=2)
    for r, g in zip(ref, got["models"]):
        for k in ("nll", "kl", "top1"):
            assert g[k] == pytest.approx(r[k], rel=1e-5, abs=1e-7)
        assert g["tokens"] == r["tokens"]
    assert got["categories"]["a"]["conversations"] == 2


def test_plots_are_nonempty_pngs(report_dir):
    md = (report_dir / "report.md").read_text()
    for name in ("quality_vs_size.png", "quality_vs_speed.png", "training_kd.png"):
        data = (report_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"]({name})" in md


def test_plots_without_validation_rows(tmp_path):
    from kdforge.eval.plots import plot_training

    rows = [{"step": s, "loss": 3.0 / s, "ce": 2.0 / s, "soft": 1.0 / s, "hidden": 0.0} for s in (1, 2, 3)]
    out = plot_training(rows, tmp_path / "t.png", "x")
    assert out.stat().st_size > 5_000


def test_eval_config_errors_before_loading(pipeline, tmp_path, capsys):
    r = pipeline
    assert main(["eval", "--teacher", str(r / "teacher"), "--students", str(r / "stu"), "--data", str(r / "gen"),
                 "--out", str(tmp_path / "e"), "--set", "lm_eval_models=[nobody]"]) == 2
    assert "lm_eval_models" in capsys.readouterr().err
    assert main(["eval", "--teacher", str(r / "teacher"), "--data", str(r / "gen"), "--out", str(tmp_path / "e"),
                 "--set", "distill_logs=[missing_dir]"]) == 2
    assert "distill_logs" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------- the task set and its scorer

def test_task_set_is_large_held_out_and_bilingual():
    items = load_tasks()
    assert len(items) >= 150 and len({it.id for it in items}) == len(items)
    shorts = [it for it in items if it.type == "short"]
    assert sum(it.lang == "zh" for it in shorts) >= 0.15 * len(items)
    assert sum(it.type == "code" for it in items) >= 40
    bundled = Path(__file__).parent.parent / "src" / "kdforge" / "data" / "prompts.jsonl"
    train = {normalize(json.loads(line)["prompt"]) for line in bundled.read_text(encoding="utf-8").splitlines()}
    text = bundled.read_text(encoding="utf-8")
    for it in items:
        assert it.prompt not in text and normalize(it.prompt) not in train, it.id
    for it in shorts:
        assert score_short(it, it.answer) == 1.0, it.id  # the gold answer scores
        if it.match == "text":
            # Echoing the question must not score: the answer is not in the prompt.
            assert score_short(it, it.prompt) == 0.0, it.id


def test_reference_solutions_pass_and_chance_is_low():
    items = load_tasks()
    for it in items:
        if it.type == "code":
            res = score_item(it, f"```python\n{it.solution}\n```")
            assert res["status"] == "pass", (it.id, res)
    chance = chance_level(items)
    assert 0 < chance["short"] < 0.15 and chance["code"] == 0


def _item(answer: str, match: str, prompt: str = "q", aliases=()) -> TaskItem:
    return TaskItem(id="x", type="short", category="c", lang="en", prompt=prompt, answer=answer, match=match,
                    aliases=list(aliases))


@pytest.mark.parametrize("answer,prompt,gold,ok", [
    ("7", "What is 3 + 4?", "7", True),
    ("3 + 4 = 7.", "What is 3 + 4?", "7", True),  # the operands are skipped
    ("The answer is seven.", "What is 3 + 4?", "7", True),
    ("3 + 4 = 8", "What is 3 + 4?", "7", False),
    ("9-3=6", "What is 9 - 3?", "6", True),  # "-3" here is subtraction, not a negative number
    ("There are 1,000 grams in a kilogram.", "How many grams are in one kilogram?", "1000", True),
    ("twenty-four", "How many hours are in one day?", "24", True),
    ("一小时有60分钟。", "一小时有多少分钟？只回答数字。", "60", True),  # 一 (the question's "one") skipped
    ("七天", "一周有几天？只回答数字。", "7", True),
    ("十二个月", "一年有几个月？", "12", True),
    ("７", "3 加 4 等于多少？", "7", True),  # full-width digit
    ("I don't know.", "What is 3 + 4?", "7", False),
    ("7\nand then 3 + 4 = 8 more text", "What is 3 + 4?", "7", True),  # a short first line with a new number
    ("Two hours is equal to 2 * 60 = 120 minutes.", "How many minutes are in two hours?", "120", True),
    ("A box holds 4 pens.\n2 boxes hold 2 * 4 = 8 pens.", "A box holds 4 pens. How many in 2 boxes?", "8", True),
    ("Let me see: 4 and 2.\n#### 8\nso 9", "A box holds 4 pens. How many in 2 boxes?", "8", True),
    ("The answer is 9. There are 9 planets.", "How many planets?", "8", False),
    ("Anna is 7 years old.", "Anna is 7 years old. How old will she be in 2 years?", "9", False),
    ("1. 9 + 1 = 2\n\nThis is 10.", "What is 9 + 1?", "10", False),  # only the first paragraph counts
])
def test_number_scoring(answer, prompt, gold, ok):
    assert score_short(_item(gold, "number", prompt), answer) == float(ok)


@pytest.mark.parametrize("answer,gold,aliases,ok", [
    ("Paris", "Paris", (), True),
    ("The capital of France is Paris.", "Paris", (), True),
    ("**PARIS**!", "Paris", (), True),
    ("Parisian food is great", "Paris", (), False),  # whole words only
    ("巴黎。", "巴黎", ("Paris",), True),
    ("法国的首都是巴黎", "巴黎", ("Paris",), True),  # Chinese: substring
    ("It is Paris", "巴黎", ("Paris",), True),  # an English alias of a Chinese item
    ("蓝色", "蓝", ("blue",), True),
    ("Ｂｌｕｅ", "blue", (), True),  # NFKC folds full-width letters
    ("red\nblue", "blue", (), False),  # only the first line counts
])
def test_text_scoring(answer, gold, aliases, ok):
    assert score_short(_item(gold, "text", aliases=aliases), answer) == float(ok)


def test_normalisation_and_numbers():
    assert normalize("  Hello,   WORLD!! ") == "hello world"
    assert normalize("（北京）。") == "北京"
    assert numbers_in("x 2.5 and -3 and 二十") == [2.5, -3.0, 20.0]
    assert numbers_in("one two", words=False) == []
    assert predicted_number("no numbers here", "What is 1 + 1?") is None


def test_extract_code():
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nThis adds."
    assert extract_code(fenced, "add") == "def add(a, b):\n    return a + b"
    two = "```python\nimport math\n```\n```python\ndef sq(x):\n    return x * x\n```"
    assert extract_code(two, "sq").startswith("def sq")
    cut = "```python\ndef f(x):\n    return x"  # a cut-off answer: the fence never closes
    assert extract_code(cut, "f") == "def f(x):\n    return x"
    bare = "def f(x):\n    return x + 1\n\nThis function returns x plus one."
    assert extract_code(bare, "f") == "def f(x):\n    return x + 1"
    assert extract_code("I cannot write code.", "f") == ""


# ---------------------------------------------------------------- sandbox

def test_sandbox_pass_and_fail():
    assert run_python("def add(a, b):\n    return a + b", "assert add(2, 3) == 5\n").status == "pass"
    assert run_python("def add(a, b):\n    return a - b", "assert add(2, 3) == 5\n").status == "fail"
    assert run_python("def add(a, b) return", "assert add(2, 3) == 5\n").status == "error"
    # Exiting early does not skip the tests into a pass.
    assert run_python("import sys\nsys.exit(0)", "assert False\n").status == "error"
    # `if __name__ == "__main__":` demos do not run (they often call input()).
    assert run_python("def f():\n    return 1\nif __name__ == '__main__':\n    input()", "assert f() == 1\n").status \
        == "pass"


def test_sandbox_kills_infinite_loop():
    res = run_python("while True:\n    pass", "", timeout_s=1.0)
    assert res.status == "timeout" and res.seconds < 5


def test_sandbox_kills_memory_bomb():
    res = run_python("x = bytearray(4 * 1024 ** 3)", "", memory_mb=256)
    assert res.status == "memory"


def test_sandbox_blocks_network_and_processes(tmp_path):
    res = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)", "")
    assert res.status == "error" and "disabled" in res.stderr and res.network in ("namespace", "python-guard")
    res = run_python("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)", "")
    assert res.status == "error"
    marker = tmp_path / "touched"
    res = run_python(f"import os\nos.system('touch {marker}')", "")
    assert res.status == "error" and not marker.exists()


def test_sandbox_cwd_is_empty_and_env_stripped():
    res = run_python("import os\nassert os.listdir('.') == []\nassert 'PATH' not in os.environ\nimport sys\n"
                     "assert not any('site-packages' in p for p in sys.path)", "")
    assert res.status == "pass", res.stderr


# ---------------------------------------------------------------- stability

def test_stability_at_its_limits(tokenizer):
    assert stab.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert stab.edit_distance([1, 2, 3], [1, 3]) == 1
    assert stab.edit_distance([], [4, 5]) == 2
    assert stab.normalized_edit_distance([1, 2], [3, 4]) == 1.0
    assert stab.normalized_edit_distance([], []) == 0.0
    same = stab.stability([["The sky is blue."] * 4, ["ok"] * 4], tokenizer)
    assert same["divergence"] == 0 and same["distinct"] == 0
    diff = stab.stability([["alpha", "beta gamma", "delta", "epsilon zeta eta"]], tokenizer)
    assert diff["distinct"] == 1.0 and 0 < diff["divergence"] <= 1
    # Case and spacing do not make answers distinct.
    assert stab.distinct_share(["Yes", "yes ", "YES"]) == 0.0


def test_stability_prompts_spread_over_categories():
    from kdforge.data.formats import Conversation

    convs = [Conversation(id=f"{c}{i}", messages=[{"role": "user", "content": f"{c} {i}"}], category=c)
             for c in ("a", "b") for i in range(3)]
    assert [p["id"] for p in stab.pick_prompts(convs, 3)] == ["a0", "b0", "a1"]


def test_sampled_generation_is_reproducible(tokenizer):
    from kdforge.eval.generation import Sampling, generate_texts

    model = make_tiny("llama", len(tokenizer), seed=4)
    s = Sampling(temperature=1.0, top_p=1.0, seed=3)
    a = generate_texts(model, tokenizer, ["Hi", "Tell me a joke"], 5, batch_size=4, sampling=s, num_samples=2)
    b = generate_texts(model, tokenizer, ["Hi", "Tell me a joke"], 5, batch_size=4, sampling=s, num_samples=2)
    assert a == b and len(a) == 2 and all(len(x) == 2 for x in a)


# ---------------------------------------------------------------- lm-evaluation-harness

def test_lm_eval_metric_is_kdforge_scorer():
    pytest.importorskip("lm_eval")
    from kdforge.eval.lmeval import local_task

    items = load_tasks(limit=3)
    qa = local_task("kdforge_qa", items, ["<|im_end|>"], 8)
    code = local_task("kdforge_code", items, ["<|im_end|>"], 8)
    docs = qa["custom_dataset"]()["test"]
    for doc, answer in zip(docs, ["5", "I think 8.", "nothing"]):
        it = TaskItem(**doc)
        assert qa["process_results"](doc, [answer]) == {"exact_match": score_short(it, answer)}
    cdoc = code["custom_dataset"]()["test"][0]
    good = f"```python\n{cdoc['solution']}\n```"
    assert code["process_results"](cdoc, [good]) == {"pass_at_1": 1.0}
    assert code["process_results"](cdoc, ["no code"]) == {"pass_at_1": 0.0}


def test_lm_eval_local_task_equals_kdforge(tokenizer):
    """lm-eval (HFLM on the live model, chat template, greedy) gives kdforge's answers and scores."""
    pytest.importorskip("lm_eval")
    from kdforge.eval.generation import render_prompts
    from kdforge.eval.lmeval import run_lm_eval
    from kdforge.eval.tasks import run_tasks

    # Untied embeddings: a tiny random Llama with tied ones repeats the "\n" before the answer forever.
    model = make_tiny("qwen2", len(tokenizer), seed=5)
    items = [it for it in load_tasks(limit=3) if it.type == "short"]
    first = run_tasks(model, tokenizer, items[:1], batch_size=1, short_tokens=6)["items"][0]["answer"]
    # An item whose gold answer is what the model says, so that both paths must score it 1.
    items.append(dataclasses.replace(items[0], id="planted", match="text", answer=normalize(first).split()[0]))
    ours = run_tasks(model, tokenizer, items, batch_size=2, short_tokens=6)
    assert all(r["answer"] for r in ours["items"]) and ours["summary"]["short_em"] > 0
    theirs = run_lm_eval(model, tokenizer, ["kdforge_qa"], items, batch_size=2, short_tokens=6, code_tokens=6)
    samples = theirs["kdforge_qa"]["samples"]
    assert len(samples) == len(items)
    by_id = {r["id"]: r for r in ours["items"]}
    for s in samples:
        assert s["response"].strip() == by_id[s["id"]]["answer"]
        assert s["score"] == by_id[s["id"]]["score"]
        assert s["context"] == render_prompts(tokenizer, [s["prompt"]])[0]  # the same rendered prompt
    assert theirs["kdforge_qa"]["metrics"]["exact_match"] == pytest.approx(ours["summary"]["short_em"])
