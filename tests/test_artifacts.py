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
