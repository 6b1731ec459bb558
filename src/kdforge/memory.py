"""Process memory hygiene for long CPU training runs.

glibc's malloc raises its mmap threshold after the first large block is freed, so later (N, V)
logits and activation buffers come from the heap and their freed pages stay resident: a training
process's RSS then creeps up by hundreds of MB over the first steps. Fixing the trim threshold
(which also pins the mmap threshold at its 128 KiB default) makes large tensors mmap'd and returned
to the OS when freed. Measured on the 8-layer demo student: peak RSS 1.74 -> 1.59 GB over 6 steps.
The price is page faults on re-allocated buffers, ~10% of a CPU step, so the trainer uses it where
memory is the point (see DistillConfig.release_memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1


def return_freed_memory_to_os(trim_threshold: int = 64 << 20) -> bool:
    """Ask glibc to give freed large blocks back to the OS; False where that is not glibc (no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
