"""Artifact folders: the only way stages talk to each other.

Every stage writes one folder holding its product, the resolved ``config.yaml`` it ran with and
``meta.json`` (stage, kdforge version, parent artifacts with their hashes, metrics, wall time).
Writes are atomic: a file is written under a temporary name, fsynced, then renamed, so a crash
never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from kdforge import __version__

META_NAME = "meta.json"
CONFIG_NAME = "config.yaml"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) so the rename survives a power cut."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` folders next to ``final`` left by a process that
    no longer runs (killed by SIGKILL, or the machine went down), so they do not pile up; returns them."""
    removed = []
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only on success.

    Yields the temporary path. If the body raises, the temporary folder is removed and any
    existing ``final`` folder is left untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"{final} already exists; pass --overwrite to replace it or choose another --out"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def artifact_hash(folder: str | Path) -> str | None:
    """Identity of an artifact: the hash of its meta.json (which names its products)."""
    meta = Path(folder) / META_NAME
    return file_sha256(meta) if meta.is_file() else None


def parent_entry(path: str | Path) -> dict[str, Any]:
    """How a child artifact records one of its inputs: the path and, if it is an artifact, its hash."""
    p = Path(path)
    entry: dict[str, Any] = {"path": str(p.resolve()) if p.exists() else str(path)}
    if p.is_dir():
        entry["meta_sha256"] = artifact_hash(p)
    elif p.is_file() and p.stat().st_size < (64 << 20):
        entry["sha256"] = file_sha256(p)
    return entry


def write_config(folder: str | Path, config: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / CONFIG_NAME, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def write_meta(
    folder: str | Path,
    stage: str,
    parents: dict[str, str | Path | None],
    metrics: dict[str, Any] | None = None,
    wall_time_s: float | None = None,
    extra: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """meta.json: written last, its presence marks a finished artifact. ``files`` is the stage's layout
    (role -> file name inside the folder, declared once next to the stage): downstream stages find a
    product through it (:func:`product`), never by a file name of their own."""
    meta: dict[str, Any] = {
        "stage": stage,
        "kdforge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parents": {k: parent_entry(v) for k, v in parents.items() if v is not None},
        "metrics": metrics or {},
        "wall_time_s": None if wall_time_s is None else round(wall_time_s, 3),
    }
    if files:
        meta["files"] = dict(files)
    if extra:
        meta.update(extra)
    atomic_write_json(Path(folder) / META_NAME, meta)
    return meta


def product(folder: str | Path, role: str) -> Path | None:
    """The file a finished artifact declares for ``role`` in its meta.json (None when it declares none)."""
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, ValueError):
        return None
    name = (meta.get("files") or {}).get(role)
    return Path(folder) / name if isinstance(name, str) else None


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a kdforge artifact folder: {META_NAME} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt meta.json ({e}); re-run the stage that wrote it") from e
