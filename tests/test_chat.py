from kdforge.data.chat import IGNORE_INDEX, encode_conversation, encode_prompt

CONV = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And 3+3? 答案是什么"},
    {"role": "assistant", "content": "It is 6. 答案是六。"},
]


def labelled_runs(enc):
    """Contiguous runs of labelled token ids."""
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            assert lab == tid
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_chatml_mask_covers_every_assistant_turn_and_end_token(tokenizer):
    enc = encode_conversation(tokenizer, CONV)
    runs = [tokenizer.decode(r) for r in labelled_runs(enc)]
    assert runs == ["2+2 is 4.<|im_end|>", "It is 6. 答案是六。<|im_end|>"]
    # The prompt ids are exactly the prefix that generation starts from.
    prefix = encode_prompt(tokenizer, CONV[:1])
    assert enc.input_ids[:len(prefix)] == prefix
    assert all(x == IGNORE_INDEX for x in enc.labels[:len(prefix)])


def test_template_without_generation_marker(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n\n{% endfor %}"
                         "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    enc = encode_conversation(tok, CONV)
    runs = [tok.decode(r) for r in labelled_runs(enc)]
    assert [r.strip() for r in runs] == ["2+2 is 4.", "It is 6. 答案是六。"]


def test_truncation_keeps_alignment(tokenizer):
    full = encode_conversation(tokenizer, CONV)
    cut = encode_conversation(tokenizer, CONV, max_length=20)
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
