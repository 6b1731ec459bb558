"""Bad input and failed writes on the command line: one clear line, exit code 2, nothing half-written
that blocks the corrected command (found by a hostile probe of the CLI)."""

from __future__ import annotations

import errno
import json

import pytest

from kdforge.cli import main

pytestmark = pytest.mark.integration


def _conversations(path, n=6):
    rows = [{"id": f"c{i}", "split": "train" if i < n - 2 else "validation",
             "messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}!"}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdforge: error:") and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("stage", ["generate", "label", "student", "distill", "export", "quantize", "eval"])
def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(stage, tiny_llama_dir, tmp_path, capsys,
                                                                 monkeypatch):
    """Root writes through permission bits, so the unwritable --out here is a path under a regular file.
    The check comes before any model loads: loading is made to fail loudly if it is reached."""
    import kdforge.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the output folder was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "out"
    data = _conversations(tmp_path / "data.jsonl")
    t = str(tiny_llama_dir)
    argv = {"generate": ["generate", t, "--prompts", str(data)],
            "label": ["label", t, "--data", str(data)],
            "student": ["student", t, "--num-layers", "1"],
            "distill": ["distill", "--teacher", t, "--student", t, "--data", str(data)],
            "export": ["export", t],
            "quantize": ["quantize", t],
            "eval": ["eval", "--teacher", t, "--data", str(data)]}[stage]
    assert main([*argv, "--out", str(out)]) == 2
    _one_line_error(capsys, "cannot write", str(out))
    assert blocker.read_text() == "x"


def test_a_full_disk_mid_stage_is_one_line_and_leaves_no_folder(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import kdforge.stages.student as student

    def full(folder, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(student, "write_meta", full)
    out = tmp_path / "s"
    assert main(["student", str(tiny_llama_dir), "--num-layers", "1", "--out", str(out)]) == 2
    _one_line_error(capsys, "no space left")
    assert not out.exists() and not list(tmp_path.glob(".s.*"))  # the atomic folder was removed


def test_a_failed_start_leaves_nothing_that_blocks_the_fix(tiny_llama_dir, tmp_path, capsys):
    data = _conversations(tmp_path / "data.jsonl")
    out = tmp_path / "g"
    assert main(["generate", str(tmp_path / "no_such_model"), "--prompts", str(data), "--out", str(out)]) == 2
    _one_line_error(capsys, "no_such_model")
    assert not out.exists()
    assert main(["generate", str(tiny_llama_dir), "--prompts", str(data), "--out", str(out),
                 "--max-new-tokens", "2"]) == 0
    lab = tmp_path / "l"
    assert main(["label", str(tmp_path / "no_such_model"), "--data", str(out), "--out", str(lab)]) == 2
    assert not lab.exists()


def test_teacher_and_labels_together_are_refused(tmp_path, capsys):
    assert main(["distill", "--teacher", "t", "--labels", "l", "--student", "s", "--data", "d",
                 "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "not both")


def test_a_cache_of_other_data_names_the_data_the_user_gave(tiny_llama_dir, tmp_path, capsys):
    data = _conversations(tmp_path / "data.jsonl")
    cache = tmp_path / "labels"
    assert main(["label", str(tiny_llama_dir), "--data", str(data), "--out", str(cache), "--top-k", "4"]) == 0
    capsys.readouterr()  # the label stage's progress bar
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("Say 1.", "Say one."))
    assert main(["distill", "--labels", str(cache), "--student", str(tiny_llama_dir), "--data", str(other),
                 "--out", str(tmp_path / "d"), "--steps", "1"]) == 2
    err = _one_line_error(capsys, str(other), "made from other data")
    assert str(data.resolve()) in err  # and the file it was labelled from


def test_a_jsonl_error_reads_well(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "unterminated}\n')
    assert main(["generate", "m", "--prompts", str(bad), "--out", str(tmp_path / "g")]) == 2
    err = _one_line_error(capsys, "bad.jsonl:1", "column")
    assert "at at" not in err


def test_a_truncated_gguf_says_truncated(tmp_path, tokenizer):
    from kdforge.export.gguf_writer import write_gguf
    from kdforge.models.loading import ModelLoadError, load_model

    from .conftest import make_tiny

    path = tmp_path / "m.gguf"
    write_gguf(make_tiny("llama", len(tokenizer), seed=3), tokenizer, path, "f32")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(str(path))
