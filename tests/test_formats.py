import collections
import json

import pytest

from kdforge.data.formats import DataError, load_conversations, select_split
from kdforge.data.prompts import load_prompt_set


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return p


def test_all_formats(tmp_path):
    p = write(tmp_path, [
        {"prompt": "hi", "system": "be brief"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
        {"instruction": "Translate", "input": "hello", "output": "bonjour"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]},
    ])
    a, b, c, d = load_conversations(p)
    assert a.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert [m["role"] for m in b.messages] == ["user", "assistant", "user"]
    assert b.prompt_messages == b.messages
    assert c.messages == [{"role": "user", "content": "Translate\n\nhello"},
                          {"role": "assistant", "content": "bonjour"}]
    assert d.prompt_messages == [{"role": "user", "content": "q"}] and d.has_answer


@pytest.mark.parametrize("line, msg", [
    ('{"prompt": "ok"', "not valid JSON"),
    ('{"foo": 1}', "unrecognised record"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role is 'robot'"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}', "from is 'alien'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, msg):
    p = write(tmp_path, [{"prompt": "fine"}, line])
    with pytest.raises(DataError) as e:
        load_conversations(p)
    assert f"{p}:2" in str(e.value) and msg in str(e.value)


def test_bundled_prompt_set():
    convs = load_prompt_set("bundled")
    assert len(convs) >= 600
    recs = [json.loads(x) for x in open(__import__("kdforge.data.prompts", fromlist=["x"]).bundled_prompts_path(),
                                           encoding="utf-8")]
    assert sum(r["lang"] == "zh" for r in recs) / len(recs) >= 0.15
    cats = collections.Counter(r["category"] for r in recs)
    assert {"everyday", "office_writing", "code", "reasoning", "knowledge", "creative"} <= set(cats)
    assert len({r["prompt"] for r in recs}) == len(recs), "duplicate prompts"
    # The documented split: within each (category, lang) group, every 10th prompt is validation.
    seen = collections.Counter()
    for r in recs:
        seen[(r["category"], r["lang"])] += 1
        assert r["split"] == ("validation" if seen[(r["category"], r["lang"])] % 10 == 0 else "train"), r["id"]
    val = select_split(convs, "validation")
    assert 0.08 <= len(val) / len(convs) <= 0.12


def test_select_split_limits(tmp_path, prompts_file):
    convs = load_conversations(prompts_file)
    assert len(select_split(convs, "all", limit=2)) == 4
    assert len(select_split(convs, "all", limit=5, val_limit=1)) == 6
    assert [c.id for c in select_split(convs, "validation")] == ["v0", "v1", "v2"]
