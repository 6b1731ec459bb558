import pytest

from kdforge.artifacts import atomic_dir, atomic_write_json, read_meta, write_meta


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-write")
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_to_clobber_and_replaces_on_overwrite(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError, match="--overwrite"), atomic_dir(final):
        pass
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]


def test_meta_records_parents_with_hashes(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    write_meta(parent, "generate", {}, {"n": 1})
    child = tmp_path / "child"
    child.mkdir()
    meta = write_meta(child, "student", {"data": parent, "missing": None}, wall_time_s=1.23456)
    assert meta["parents"]["data"]["meta_sha256"] and "missing" not in meta["parents"]
    assert read_meta(child)["wall_time_s"] == 1.235
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has ended
    stale = tmp_path / f".out.tmp-{dead_pid}"
    stale_old = tmp_path / f".out.old-{dead_pid}"
    running = tmp_path / f".out.tmp-{os.getppid()}"  # a live process's work in progress: not ours to delete
    other = tmp_path / f".other.tmp-{dead_pid}"  # another artifact's leftovers: not touched here
    for p in (stale, stale_old, running, other):
        p.mkdir()
        (p / "half-written").write_text("x")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name, "out"])


def test_sigterm_removes_the_temporary_folder(tmp_path, tokenizer):
    """`kill` (SIGTERM) during a stage: it exits with 143 and leaves neither the artifact nor its temporary."""
    import signal

    from .conftest import kill_when, save_tiny

    save_tiny(tmp_path / "src", "llama", tokenizer)
    out = tmp_path / "export"
    rc = kill_when(["export", str(tmp_path / "src"), "--quant", "f16", "q8_0", "--out", str(out)],
                   lambda: any(tmp_path.glob(".export.tmp-*")), sig=signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_atomic_file_takes_any_writer_and_leaves_nothing_on_failure(tmp_path):
    """The one atomic-write helper: a library writes the temporary path (here safetensors and torch.save),
    the file appears whole under its name; a failure keeps the old file and removes the temporary."""
    import torch
    from safetensors.torch import load_file, save_file

    from kdforge.artifacts import atomic_file

    path = tmp_path / "w.safetensors"
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".") and tmp.suffix == ".safetensors"
        save_file({"x": torch.ones(3)}, str(tmp))
    assert torch.equal(load_file(path)["x"], torch.ones(3))
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        torch.save({"half": 1}, tmp)
        raise RuntimeError("killed mid-write")
    assert torch.equal(load_file(path)["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_atomic_file_removes_a_dead_process_temporary(tmp_path):
    import subprocess
    import sys

    from kdforge.artifacts import atomic_write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.json.tmp-{int(dead.stdout)}.json"  # what a SIGKILLed writer leaves
    stale.write_text("{")
    atomic_write_text(tmp_path / "a.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_append_lines_and_a_torn_last_line(tmp_path):
    from kdforge.artifacts import append_lines, read_lines

    log = tmp_path / "log.jsonl"
    assert read_lines(log) == []
    append_lines(log, ['{"a": 1}', '{"a": 2}'])
    append_lines(log, [])
    with open(log, "ab") as f:
        f.write(b'{"a": 3')  # a kill mid-append
    assert read_lines(log) == ['{"a": 1}', '{"a": 2}'] and log.read_bytes().endswith(b"3")
    assert read_lines(log, repair=True) == ['{"a": 1}', '{"a": 2}']
    append_lines(log, ['{"a": 3}'])  # the next append starts on a line of its own
    assert read_lines(log) == ['{"a": 1}', '{"a": 2}', '{"a": 3}']


def test_check_resume_names_each_setting_and_refuses_new_ones(tmp_path):
    from kdforge.artifacts import check_resume
    from kdforge.config import ConfigError

    before = {"out": "a", "batch_size": 4, "dtype": "float32", "top_k": 8}
    may_change = {"out", "batch_size"}
    check_resume(tmp_path, before, before | {"out": "b", "batch_size": 16}, may_change, "labels", "fix.", ConfigError)
    with pytest.raises(ConfigError, match=r"other settings.*dtype: 'float32' before, 'bfloat16' now; "
                                          r"top_k: 8 before, 16 now\. Use another --out") as e:
        check_resume(tmp_path, before, before | {"dtype": "bfloat16", "top_k": 16}, may_change, "labels",
                     "Use another --out.", ConfigError)
    assert str(tmp_path) in str(e.value)
    # A setting the earlier run did not have (a field added to the config since) is refused by default,
    # and so is one it had that is gone.
    with pytest.raises(ConfigError, match=r"seed: \(not set\) before, 0 now"):
        check_resume(tmp_path, before, before | {"seed": 0}, may_change, "labels", "", ConfigError)
    with pytest.raises(ConfigError, match=r"top_k: 8 before, \(not set\) now"):
        check_resume(tmp_path, before, {k: v for k, v in before.items() if k != "top_k"}, may_change, "labels", "",
                     ConfigError)


def test_every_stage_declares_settings_that_exist():
    """Each resumable stage's MAY_CHANGE names fields of its config (a misspelt name would refuse it)."""
    from kdforge.stages import distill, generate, label

    for module, config in ((generate, generate.GenerateConfig), (label, label.LabelConfig),
                           (distill, distill.DistillConfig)):
        assert module.MAY_CHANGE <= set(config.model_fields), module.__name__
    assert "dtype" not in generate.MAY_CHANGE and "dtype" not in label.MAY_CHANGE


def test_atomic_dir_first_wins_keeps_the_folder_another_process_finished(tmp_path):
    """A shared cache (the converted embedded teacher): two builders, the first rename wins, the second
    drops its copy instead of replacing a folder someone may be reading."""
    final = tmp_path / "model-v1"
    with atomic_dir(final, first_wins=True) as tmp:
        (tmp / "mine").write_text("second")
        final.mkdir()  # meanwhile another process finished its conversion
        (final / "theirs").write_text("first")
    assert sorted(p.name for p in final.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-v1"]
    other = tmp_path / "fresh"
    with atomic_dir(other, first_wins=True) as tmp:
        (tmp / "mine").write_text("only")
    assert (other / "mine").read_text() == "only"


def test_atomic_files_moves_each_file_into_a_folder_in_use(tmp_path):
    from kdforge.artifacts import atomic_files

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_files(out) as tmp:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("crash in save_pretrained")
    assert (out / "config.json").read_text() == "old"
    with atomic_files(out) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_bytes(b"w")
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "model.safetensors"]
