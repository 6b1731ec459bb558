"""Where this process sits in a `torchrun` / `accelerate launch` job, and the few collectives kdforge uses.

kdforge brings no launcher of its own: `torchrun --nproc-per-node N kdforge STAGE ...` and
`accelerate launch -m kdforge.cli STAGE ...` both set RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR,
and `init()` joins that job's process group through accelerate (NCCL on CUDA, gloo on CPU). Without
those variables every function here answers for one process (rank 0 of 1) and no group is made, so
stages call them unconditionally.

Rules every stage keeps (docs/distributed.md): the work of a step or a shard is assigned from the rank
alone, the same on every rank; only rank 0 writes artifact folders, logs and meta.json; the others
write only files of their own (their shards), and everyone meets at a `barrier()` before rank 0 reads them.
"""

from __future__ import annotations

import os
from typing import Any


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True under torchrun / accelerate launch with more than one process."""
    return world_size() > 1


def init(device: str = "auto") -> str:
    """Join the launcher's process group (once); return the device this rank computes on.

    ``device``: "auto" takes this rank's GPU (LOCAL_RANK) when CUDA is there, else the CPU; an
    explicit "cuda" also becomes "cuda:LOCAL_RANK" so that ranks never share a GPU by accident.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and launched():
        device = f"cuda:{local_rank()}"
    if launched():
        import torch.distributed as dist

        if not dist.is_initialized():
            from accelerate import PartialState

            # accelerate picks the backend (nccl / gloo) and sets this rank's CUDA device.
            PartialState(cpu=not device.startswith("cuda"))
    return device


def _group_ready() -> bool:
    if not launched():
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (any picklable object)."""
    if not _group_ready():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _group_ready():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out



def shard_of(items: list, r: int | None = None, n: int | None = None) -> list:
    """Rank ``r``'s share of ``items`` (whole items, round robin: rank r takes items r, r+n, ...)."""
    r = rank() if r is None else r
    n = world_size() if n is None else n
    return items[r::n]


def on_main(fn, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` run on rank 0 only; its result, or the error it raised, on every rank (so that a
    bad --out found by rank 0 stops all ranks with the same message instead of leaving them waiting)."""
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # re-raised below, on every rank
            error = e
    result, error = broadcast((result, error))
    if error is not None:
        raise error
    return result




def leave() -> None:
    """Destroy this rank's process group, if it has one, without waiting for the others (a rank that failed
    must not hang in a barrier; the stages' own collectives already kept the ranks in step)."""
    if _group_ready():
        import torch.distributed as dist

        dist.destroy_process_group()
