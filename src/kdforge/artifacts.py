"""Artifact folders: the only way stages talk to each other.

Every stage writes one folder holding its product, the resolved ``config.yaml`` it ran with and
``meta.json`` (stage, kdforge version, parent artifacts with their hashes, metrics, wall time).
Writes are atomic, by one mechanism: a file is written under a temporary name, fsynced, then renamed
(:func:`atomic_file`, and :func:`atomic_dir` for a folder), so a crash never leaves a half-written
file behind. Append-only logs (JSONL) are the other mechanism: whole lines appended with one fsynced
write, a torn last line dropped when read (:func:`append_lines`, :func:`read_lines`). Resuming a
stage compares its settings with the earlier run's, allowing only those it declares may change
(:func:`check_resume`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from kdforge import __version__
from kdforge.errors import UserError

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


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk: a rename is only atomic for data that reached the disk first."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (what a library such as ``save_pretrained`` wrote there)."""
    for p in sorted(root.rglob("*"), reverse=True):  # deepest first: files before the folders that list them
        if p.is_file() and not p.is_symlink():
            fsync_file(p)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(root)


def _temporary(final: Path, kind: str) -> Path:
    """``.<name>.<kind>-<pid><suffix>``: hidden, owned by this process (so a crashed process's can be
    found and removed), and with the final suffix kept for libraries that pick a format from it."""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}{final.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """The one way a file is written: yield a temporary path next to ``path`` for the caller to write by
    any means (``save_file``, ``torch.save``, a GGUF writer, ``write_bytes``), then fsync it, rename it
    over ``path`` and fsync the folder. If the body raises, the temporary is removed and an existing
    ``path`` is untouched, so a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary(path, "tmp")
    _remove(tmp)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_lines(path: str | Path, lines: Iterable[str]) -> None:
    """Append whole lines to an append-only file (a JSONL log) with one write + fsync.

    Rewriting such a file per record would cost O(n^2); appending is safe because a kill can at most
    tear the last line, and readers drop (or, resuming, cut) a line without its newline: read_lines.
    """
    data = "".join(f"{line}\n" for line in lines).encode("utf-8")
    if not data:
        return
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: str | Path, repair: bool = False) -> list[str]:
    """The complete lines of an append-only file (none if it is missing). A last line without its newline
    is a write torn by a kill: it is ignored, and with ``repair`` also cut off the file, so the next
    append starts on a line of its own."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1  # everything after the last newline is a partial write
    if repair and keep != len(raw):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return raw[:keep].decode("utf-8").splitlines()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` files and folders next to ``final`` left by a process
    that no longer runs (killed by SIGKILL, or the machine went down), so they do not pile up; returns them."""
    removed = []
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{glob.escape(final.name)}.{kind}-*"):
            pid = path.name[len(f".{final.name}.{kind}-"):]
            pid = pid[:-len(final.suffix)] if final.suffix and pid.endswith(final.suffix) else pid
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                _remove(path)
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False, first_wins: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only on success.

    Yields the temporary path; everything written there is fsynced before the rename. If the body
    raises, the temporary folder is removed and any existing ``final`` folder is left untouched.
    ``first_wins`` is for a shared cache that other processes may build at the same time: if ``final``
    appeared while this one was built (another process finished first), theirs is kept and ours
    dropped, so a folder another process may be reading is never swapped under it.
    """
    final = Path(final)
    if final.exists() and not overwrite and not first_wins:
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
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if first_wins:
        try:
            os.rename(tmp, final)  # refused when final is a non-empty folder: the other process won
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():
                raise
    elif final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_files(folder: str | Path) -> Iterator[Path]:
    """For a library that writes several files into a folder (``save_pretrained``) when ``folder`` already
    holds others (a distill run's checkpoints and log): yield a temporary folder inside it, then fsync
    each file written there and rename it into ``folder``. Each file appears whole; the set is marked
    finished by whatever the caller writes last (meta.json). On error nothing is moved."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder / ".files")
    tmp = folder / f".files.tmp-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        for item in sorted(tmp.iterdir()):
            target = folder / item.name
            if item.is_dir() and target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Unset:
    def __repr__(self) -> str:
        return "(not set)"


_UNSET = _Unset()


class OutputError(UserError):
    """An output folder that cannot be written: the message names the path and the reason."""


def check_writable(out: str | Path) -> None:
    """Fail now, naming ``out``, if it cannot be created and written (read-only file system, no
    permission, a file in the way), so that a stage finds out before it loads a model.

    Creates nothing that stays: missing folders are probed in their nearest existing ancestor.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write {out}: it is a file, not a folder; choose another --out")
    probe_in = out
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise OutputError(f"cannot write {out}: {probe_in} is a file, not a folder; choose another --out")
    try:
        fd, name = tempfile.mkstemp(prefix=".kdforge-probe-", dir=probe_in)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e} ({probe_in}); choose another --out or "
                          "fix its permissions") from None


@contextlib.contextmanager
def removed_if_unstarted(out: str | Path) -> Iterator[None]:
    """For stages that build their folder in place (generate, label, distill): when the stage fails
    before it has written anything but its config (a wrong model path, say), remove the folder it
    created, so that the corrected command is not refused as "different settings"."""
    out = Path(out)
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and out.is_dir() and all(
                p.name == CONFIG_NAME or (p.is_file() and p.stat().st_size == 0) for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise


def describe_write_error(e: OSError) -> str | None:
    """A one-line message for an OSError of a failed write (no space, read-only, no permission, a file
    or folder in the way), or None for other errors (which keep their traceback: those are bugs)."""
    import errno

    writes = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted", errno.ENOTDIR: "a file is in the way of a folder",
              errno.EISDIR: "a folder is in the way of a file", errno.EEXIST: "it already exists"}
    if e.errno not in writes:
        return None
    where = e.filename or "the output"
    return (f"cannot write {where}: {writes[e.errno]}; free space or choose another --out (artifact folders "
            "appear only when complete; generate, label and distill resume what they finished)")


def check_resume(folder: str | Path, previous: dict[str, Any], current: dict[str, Any],
                 may_change: Collection[str], what: str, how_to_fix: str,
                 error: type[Exception] = UserError) -> None:
    """Refuse to continue the run in ``folder`` when a setting outside ``may_change`` differs.

    Every stage resumes this way: it declares the settings that *may* change (bookkeeping such as the
    output folder, batch size, device) and every other one must match, so a setting added to a config
    later is refused by default instead of silently mixing two kinds of output. A setting only one of
    the two configs has counts as changed. ``error`` is the type raised (the stages pass ConfigError:
    this module sits below kdforge.config). The message names each setting with both values.
    """
    keys = list(current) + [k for k in previous if k not in current]
    diffs = [f"{k}: {previous.get(k, _UNSET)!r} before, {current.get(k, _UNSET)!r} now"
             for k in keys if k not in may_change and previous.get(k, _UNSET) != current.get(k, _UNSET)]
    if diffs:
        raise error(f"{folder} holds {what} made with other settings; these settings differ and may not change "
                    f"on resume: {'; '.join(diffs)}. {how_to_fix}")


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
