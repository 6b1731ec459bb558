"""Process memory policy for CPU training and labelling: reuse freed buffers, or give them back to the OS.

glibc's malloc serves a block above its mmap threshold (128 KiB at start, raised dynamically to at
most 32 MiB) with a fresh mmap and unmaps it when freed. A CPU step allocates many (chunk, V)
buffers of 50-150 MB (logits, softmax, their gradients, the output projection's gradient): every one
of them is then a fresh mapping whose pages fault in on first touch, ~0.35 ms per MB on the 2-core
CI machine (a 50 MB buffer: 17.8 ms to allocate and fill vs 2.5 ms reused; benchmarks/train_throughput.py
has the step-level figures).

- `reuse_freed_memory` (the default): the mmap threshold at 1 GiB and the trim threshold at 2 GiB, so
  those buffers come from the heap and are reused step after step. Peak RSS is a few % higher.
- `return_freed_memory_to_os` (DistillConfig.release_memory): the trim threshold fixed, which also pins
  the mmap threshold at 128 KiB, so every large buffer is unmapped when freed: the lowest peak RSS
  (the freed pages never stay resident) at ~20% of a cached step's speed.
Both are no-ops (False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _mallopt(*settings: tuple[int, int]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(bool(libc.mallopt(param, value)) for param, value in settings)
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False


def return_freed_memory_to_os(trim_threshold: int = 64 << 20) -> bool:
    """Ask glibc to give freed large blocks back to the OS; False where that is not glibc (no-op)."""
    return _mallopt((_M_TRIM_THRESHOLD, trim_threshold))


def reuse_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 2 << 30) -> bool:
    """Ask glibc to serve blocks below ``mmap_threshold`` from the heap and keep up to ``trim_threshold``
    of freed heap: re-allocated large buffers then cost no page faults. False where that is not glibc."""
    return _mallopt((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold))
