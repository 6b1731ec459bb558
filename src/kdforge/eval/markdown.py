"""report.md from the report dict (the same dict written as report.json).

Every figure in the Markdown is a value of report.json formatted to a stated number of decimals;
nothing is computed here. Absent values (a section switched off) print as "–".
"""

from __future__ import annotations

from typing import Any

DASH = "–"


def cell(value: Any, fmt: str = "{}") -> str:
    if value is None:
        return DASH
    return fmt.format(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "| " + " | ".join(header) + " |"
    sep = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join([head, sep, *("| " + " | ".join(r) + " |" for r in rows)])


# The summary table: the one `kdforge demo` prints and the README shows.
COLUMNS = [("name", "model", "{}"), ("params_m", "params (M)", "{:.1f}"), ("nll", "NLL", "{:.4f}"),
           ("kl", "KL(teacher‖model)", "{:.4f}"), ("top1", "top-1 agree", "{:.3f}"),
           ("decode_tokens_per_s", "decode tok/s", "{:.1f}"), ("ttft_ms", "TTFT (ms)", "{:.0f}")]


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the models' headline figures; also readable as plain text in a terminal."""
    return table([c[1] for c in COLUMNS], [[cell(r.get(key), fmt) for key, _, fmt in COLUMNS] for r in rows])


def _pct(x: float | None) -> str:
    return cell(x, "{:.3f}")


def tasks_table(report: dict[str, Any]) -> str:
    chance = report["tasks"]["chance"]
    rows = [[m["name"], _pct(m["tasks"]["short_em"]), _pct(m["tasks"]["short_em_en"]), _pct(m["tasks"]["short_em_zh"]),
             _pct(m["tasks"]["code_pass"]), _pct(m["tasks"]["overall"])] for m in report["models"]]
    rows.append(["chance (answer prior)", _pct(chance["short"]), _pct(chance["short_en"]), _pct(chance["short_zh"]),
                 _pct(chance["code"]), _pct(chance["overall"])])
    return table(["model", "short-answer EM", "EM (en)", "EM (zh)", "code pass", "all items"], rows)


def _agreement_by_category(report: dict[str, Any]) -> str:
    students = report["models"][1:]
    header = ["category", "conversations", "answer tokens", "teacher entropy (nats)"]
    for m in students:
        header += [f"KL {m['name']}", f"top-1 {m['name']}"]
    rows = []
    for cat, c in report["categories"].items():
        r = [cat, cell(c["conversations"]), cell(c["tokens"]), cell(c["teacher_entropy"], "{:.3f}")]
        for m in students:
            q = m["by_category"][cat]
            r += [cell(q["kl"], "{:.4f}"), cell(q["top1"], "{:.3f}")]
        rows.append(r)
    return table(header, rows)


def _tasks_by_category(report: dict[str, Any]) -> str:
    chance = report["tasks"]["chance"]
    cats = list(report["models"][0]["tasks"]["by_category"])
    header = ["category", *(m["name"] for m in report["models"]), "chance"]
    rows = [[c, *(_pct(m["tasks"]["by_category"][c]) for m in report["models"]),
             _pct(chance.get(f"short/{c}", 0.0))] for c in cats]
    return table(header, rows)


def _code_status(report: dict[str, Any]) -> str:
    kinds = ["pass", "fail", "error", "timeout", "memory", "no_code"]
    rows = [[m["name"], *(cell(m["tasks"]["code_status"].get(k, 0)) for k in kinds)] for m in report["models"]]
    return table(["model", "pass", "fail (assert)", "error", "timeout", "memory", "no code found"], rows)


def _stability(report: dict[str, Any]) -> str:
    rows = [[m["name"], cell(m["stability"]["divergence"], "{:.3f}"), cell(m["stability"]["distinct"], "{:.3f}")]
            for m in report["models"]]
    return table(["model", "answer divergence", "distinct answers"], rows)


def _speed(report: dict[str, Any]) -> str:
    b = report.get("speed_batch")
    rows = []
    for m in report["models"]:
        s = m.get("speed") or {}
        rows.append([m["name"], m.get("backend", "transformers"), cell(m["params_m"], "{:.1f}"),
                     cell(m["size"]["disk_mb"], "{:.1f}"),
                     cell(s.get("ttft_ms_b1"), "{:.0f}"), cell(s.get("decode_tokens_per_s_b1"), "{:.1f}"),
                     cell(s.get("ttft_ms_bn"), "{:.0f}"), cell(s.get("decode_tokens_per_s_bn"), "{:.1f}"),
                     cell(s.get("peak_rss_mb"), "{:.0f}"), cell(s.get("threads", report["threads"]))])
    return table(["model", "runtime", "params (M)", "weights on disk (MB)", "TTFT b1 (ms)", "decode tok/s b1",
                  f"TTFT b{b} (ms)", f"decode tok/s b{b}", "peak RSS (MB)", "threads"], rows)


def _lm_eval(report: dict[str, Any]) -> str:
    rows = []
    for m in report["models"]:
        for task, e in (m.get("lm_eval") or {}).items():
            for metric, v in e["metrics"].items():
                if metric == "sample_len":
                    continue
                rows.append([m["name"], task, metric, cell(v, "{:.3f}"), cell(e.get("kdforge_score"), "{:.3f}"),
                             cell(e.get("same_answers")), cell(e.get("items"))])
    return table(["model", "task", "lm-eval metric", "lm-eval", "kdforge scorer", "identical answers", "items"], rows)


def measured_table(report: dict[str, Any]) -> str:
    """Per model: its tokenizer against the teacher's, what its agreement figures are over, bits per byte."""
    rows = []
    for m in report["models"]:
        rows.append([m["name"], m.get("tokenizer", "same"), m.get("measured_on", "tokens"),
                     cell(m.get("answer_tokens")), cell(m.get("bits_per_byte"), "{:.4f}"), cell(m.get("spans")),
                     cell(m.get("coverage"), "{:.3f}"), cell(m.get("retokenized")),
                     cell(m.get("teacher_dropped_mass"), "{:.4f}")])
    return table(["model", "tokenizer", "KL and top-1 over", "answer tokens (own)", "bits per byte", "aligned spans",
                  "tokens in spans", "conversations retokenized", "teacher mass on dropped ids"], rows)


def render(report: dict[str, Any], summary: str) -> str:
    """The whole report.md."""
    out = [
        "# kdforge eval", "",
        f"Data: `{report['data']}` (split `{report['split']}`): {report['examples']} conversations, "
        f"{report['target_tokens']} teacher-answer tokens. Speed: {report['threads']} threads.", "",
        "## Summary", "", summary, "",
        "Ranking by KL(teacher‖model), closest first: " + " > ".join(report["ranking"]["order"]) + ".", "",
        "NLL: mean negative log-likelihood of the teacher's answer tokens. KL: mean forward KL(teacher‖model) "
        "per answer token at T=1. Top-1: share of answer positions where the model's most likely next token "
        "is the teacher's. Decoding: greedy, batch 1, "
        f"{report['decode_tokens']} new tokens; TTFT includes the prompt's prefill.", "",
        "## Tokenizers and what was measured", "",
        measured_table(report), "",
        "A model with the teacher's tokenizer (`same`) reads the teacher's tokens. A `trimmed` one (its vocabulary "
        "cut from the teacher's) reads its own ids, the teacher the same tokens; KL and top-1 are over the kept ids, "
        "the teacher's distribution renormalised over them (conversations retokenized: text the trimmed "
        "tokenizer spells in shorter tokens, which the teacher then reads too; teacher mass on dropped ids: its mean "
        "probability per answer token on the ids the trimmed model lacks, which the kept-ids KL does not see). "
        "A model with `other` tokenizer "
        "reads its own encoding: KL is the forward KL over the shared vocabulary per aligned span at T=1, top-1 "
        "is span top-1 agreement (the first tokens agree on the text), tokens in spans the share of its answer "
        "tokens the spans cover. NLL is per the model's own answer token; bits per byte (the same NLL in bits, "
        "per byte of the answer the tokens spell) compares models across tokenizers. Every model is prompted "
        "through its own tokenizer and chat template in the tasks, stability and speed sections.", "",
        "## Agreement with the teacher by category", "",
        _agreement_by_category(report), "",
        "Teacher entropy: the teacher's mean entropy per answer token (nats). Where it is low the teacher is "
        "nearly certain and its soft labels add little beyond its answer.", "",
    ]
    if "tasks" in report:
        t = report["tasks"]
        out += ["## Tasks", "",
                f"`{t['file']}`: {t['short_items']} short-answer items (normalised exact match) and "
                f"{t['code_items']} code items (run against tests in a sandbox), greedy answers.", "",
                tasks_table(report), "", "By category:", "", _tasks_by_category(report), "",
                "Code runs:", "", _code_status(report), "",
                "Chance (answer prior): the expected score of answering every question with the gold answer of a "
                "random other question of its category; code has no chance level (0). Every answer is in "
                "`task_answers.jsonl`.", ""]
    if "stability" in report:
        s = report["stability"]
        out += ["## Stability", "",
                f"{len(s['prompts'])} prompts, {s['samples']} sampled answers each (temperature "
                f"{s['temperature']}, top-p {s['top_p']}, up to {s['max_new_tokens']} tokens, seed {s['seed']}).", "",
                _stability(report), "",
                "Answer divergence: mean pairwise token edit distance between answers to the same prompt, divided "
                "by the longer answer's length (0: identical, 1: nothing in common). Distinct answers: (distinct "
                "answers − 1) / (samples − 1). Answers are in `stability_answers.jsonl`.", ""]
    out += ["## Speed and size", "", _speed(report), "",
            "Each model is loaded and timed in its own process (forked from one that has imported torch and "
            "transformers). TTFT: prefill plus the first token; decode tok/s: tokens after the first, summed over "
            "the batch, greedy, forced length; best of two after a warm-up. Peak RSS: the peak resident memory of "
            "that process (Linux VmHWM), libraries included. Weights on disk: the files the model spec points to.",
            ""]
    if any(m.get("lm_eval") for m in report["models"]):
        out += ["## lm-evaluation-harness", "", _lm_eval(report), "",
                "kdforge_qa / kdforge_code are kdforge's task set run by lm-eval (chat template, greedy, kdforge's "
                "scorer as the metric); `kdforge scorer` is kdforge's own score on the same items.", ""]
    plots = report.get("plots") or {}
    if plots:
        out += ["## Plots", ""]
        for p in plots.get("training", []):
            out += [f"Training curves of {p['title']} (`{p['log']}`):", "",
                    f"![training {p['title']}]({p['file']})", ""]
        if "quality_vs_size" in plots:
            out += ["Quality against size:", "", f"![quality against size]({plots['quality_vs_size']})", ""]
        if "quality_vs_speed" in plots:
            out += ["Quality against speed:", "", f"![quality against speed]({plots['quality_vs_speed']})", ""]
    return "\n".join(out)
