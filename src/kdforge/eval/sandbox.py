"""Run model-written Python against tests in a separate, limited process.

What the limits are, honestly:
- a fresh interpreter in isolated mode (``-I``: no PYTHON* variables, no user site, no script
  folder on sys.path) without site-packages (``-S``: only the standard library), an empty
  temporary working directory, and an environment with nothing in it but the I/O encoding;
- ``RLIMIT_AS`` (address space, default 512 MiB: a memory bomb gets MemoryError), ``RLIMIT_CPU``
  (CPU seconds), ``RLIMIT_FSIZE`` (1 MiB per written file, output included), ``RLIMIT_NOFILE``,
  and a wall-clock timeout after which the whole process group is killed;
- network: the child first tries to move into new user + network namespaces (Linux
  ``unshare(CLONE_NEWUSER | CLONE_NEWNET)``), where no interface but a downed loopback exists, so
  the kernel refuses every connection. Where the kernel does not allow that, it falls back to a
  Python-level guard (socket creation, name resolution, subprocesses and ``ctypes`` replaced by
  functions that raise). ``Result.network`` says which one was in force.

This protects a run from accidents in generated code (endless loops, huge allocations, stray
downloads, deleting files in the working directory). It is not a security boundary against code
written to escape: the Python-level guard in particular can be undone from Python. Run untrusted
task sets in a container or VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SENTINEL = "__KDFORGE_TESTS_PASSED__"

# Runs in the child before the model's code. Limits first, then the network, then the code and
# the tests in one namespace (named "solution", so `if __name__ == "__main__":` demos do not run).
_RUNNER = r'''
import resource, sys
_mem, _cpu = int(sys.argv[1]), int(sys.argv[2])
_code = open(sys.argv[3], encoding="utf-8").read()
_tests = open(sys.argv[4], encoding="utf-8").read()
resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

def _isolate_network():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
            return "namespace"
    except Exception:
        pass
    return "python-guard"

_network = _isolate_network()
print("__KDFORGE_NETWORK__=" + _network, file=sys.stderr, flush=True)

def _blocked(*args, **kwargs):
    raise OSError("network and process access are disabled in the kdforge sandbox")

import os, socket
class _NoSocket:
    def __init__(self, *args, **kwargs):
        _blocked()
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
              "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    setattr(socket, _name, _NoSocket if _name == "socket" else _blocked)
for _name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execvp",
              "execvpe", "spawnv", "spawnve", "spawnl", "posix_spawn", "posix_spawnp", "kill", "killpg"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
for _name in ("_socket", "_ssl", "ssl", "ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing"):
    sys.modules[_name] = None
del socket._socket

_ns = {"__name__": "solution"}
exec(compile(_code, "solution.py", "exec"), _ns)
exec(compile(_tests, "tests.py", "exec"), _ns)
print("''' + SENTINEL + r'''", flush=True)
'''


@dataclass
class Result:
    status: str  # pass | fail (assertion) | error (exception) | timeout | memory | no_code
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    network: str  # "namespace" | "python-guard" | "unknown"


def run_python(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512) -> Result:
    """Run ``code`` then ``tests`` (assert statements) in a sandboxed child; pass = tests finished."""
    with tempfile.TemporaryDirectory(prefix="kdforge-sbx-") as root:
        files = Path(root) / "files"
        work = Path(root) / "work"  # the child's cwd: empty
        files.mkdir()
        work.mkdir()
        (files / "runner.py").write_text(_RUNNER, encoding="utf-8")
        (files / "solution.py").write_text(code, encoding="utf-8")
        (files / "tests.py").write_text(tests, encoding="utf-8")
        out_path, err_path = files / "stdout.txt", files / "stderr.txt"
        cmd = [sys.executable, "-I", "-S", str(files / "runner.py"), str(memory_mb << 20),
               str(max(1, int(timeout_s + 0.999))), str(files / "solution.py"), str(files / "tests.py")]
        t0 = time.perf_counter()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # Output goes to files (bounded by RLIMIT_FSIZE), never into this process's memory.
            proc = subprocess.Popen(cmd, cwd=work, env={"PYTHONIOENCODING": "utf-8"}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
        seconds = time.perf_counter() - t0
        stdout = out_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        stderr = err_path.read_text(encoding="utf-8", errors="replace")
    network = "unknown"
    for line in stderr.splitlines():
        if line.startswith("__KDFORGE_NETWORK__="):
            network = line.split("=", 1)[1].strip()
    stderr = "\n".join(ln for ln in stderr.splitlines() if not ln.startswith("__KDFORGE_NETWORK__="))[-4000:]
    rc = proc.returncode
    if timed_out or rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
        status = "timeout"
    elif "MemoryError" in stderr:
        status = "memory"
    elif rc == 0 and SENTINEL in stdout:
        status = "pass"
    elif "AssertionError" in stderr:
        status = "fail"
    else:
        status = "error"
    return Result(status, rc, seconds, stdout, stderr, network)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()
