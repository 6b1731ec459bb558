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
