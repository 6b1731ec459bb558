"""Data-parallel and sharded training on torch's own engines: DDP and FSDP2 (`fully_shard`).

kdforge launches nothing itself: under `torchrun` or `accelerate launch` every rank runs the same
`kdforge distill`, joins the process group (kdforge.distributed.init) and wraps its modules here.

What is wrapped. The trainer never calls the student's `forward` (that would project all (B, T, V)
logits); it runs the decoder, gathers the target positions and projects those in chunks. DDP and
FSDP2 hook a module's `forward`, so the module they wrap is `TargetHidden`: the student plus the
optional hidden-alignment projection, whose forward is exactly what a micro-batch needs. Under
FSDP2 each decoder layer is its own shard unit and `TargetHidden` is the root (embeddings, final
norm and output projection stay gathered from the root's forward until its backward, so the
chunked output projection can use them in between).

Why the head's gradient is deferred. A micro-batch's loss is back-propagated in pieces: each chunk of
target positions through the output projection, then the decoder once. DDP's reducer allows one
gradient per parameter per backward pass, so in a parallel run each chunk's gradient for the output
projection is taken with `torch.autograd.grad` (no hooks fire) and summed, and the one backward
pass of the micro-batch carries it in as `sum(W * dW)`. One process keeps the plain per-chunk
`backward` (the pinned numbers were produced by it).

Equal to one process. Rank r takes micro-batches r, r+N, ... of a step's global list, every term is
normalised by the token counts of the whole global step (known on every rank from the labels), and
the loss is multiplied by N because DDP and FSDP2 average gradients over ranks. Only the last
micro-batch of a step synchronises gradients (no_sync / set_requires_gradient_sync before it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kdforge import distributed
from kdforge.models.forward import target_hidden

Strategy = Literal["none", "ddp", "fsdp", "deepspeed"]


class _GradInto(torch.autograd.Function):
    """A zero scalar whose backward hands ``grad`` to ``param``: a gradient computed elsewhere enters the one
    backward pass through the parameter's own accumulation hooks (DDP's reducer, FSDP2's reduce-scatter,
    ZeRO's partitioning). Nothing of ``param`` is saved or read: a ZeRO-3 weight outside its module's forward
    is an empty partition."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        ctx.dtype = param.dtype  # cast at the hand-over, not before: no second (V, H) copy waits for the backward
        return grad.new_zeros(())

    @staticmethod
    def backward(ctx, out_grad: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * out_grad).to(ctx.dtype), None


def grad_into(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum of zero scalars carrying each (parameter, gradient) pair's gradient into the backward pass."""
    return sum((_GradInto.apply(p, g) for p, g in pairs), torch.zeros(()))


class TargetHidden(torch.nn.Module):
    """The student as the trainer runs it: final hidden states at the target positions, (N, H), and the
    target ids, (N,); with ``targets=False`` only the decoder runs (hidden/attention alignment alone)."""

    def __init__(self, model: torch.nn.Module, projection: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        self.projection = projection  # student width -> teacher width for hidden alignment; None if equal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                pack_length: int | None = None, targets: bool = True):
        if targets:
            return target_hidden(self.model, input_ids, attention_mask, labels, pack_length)
        return self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state


@dataclass
class Parallel:
    """How this rank trains: the strategy, its rank and the world size (one process: strategy none)."""

    strategy: Strategy = "none"
    rank: int = 0
    world: int = 1
    zero_stage: int = 3  # DeepSpeed only: 2 shards gradients and optimizer state, 3 the weights too

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def shards(self) -> bool:
        """True where no rank holds the whole student's weights (FSDP2, ZeRO-3)."""
        return self.strategy == "fsdp" or self.zero3

    @property
    def zero3(self) -> bool:
        return self.strategy == "deepspeed" and self.zero_stage == 3

    def mine(self, items: list) -> list:
        """This rank's share of a step's global micro-batch list."""
        return distributed.shard_of(items, self.rank, self.world) if self.active else items

    # -- wrapping -------------------------------------------------------------------------------------

    def wrap_student(self, root: TargetHidden, bf16: bool = False) -> torch.nn.Module:
        """The module the trainer calls and the optimizer sees (call before building the optimizer:
        FSDP2 replaces the parameters with sharded DTensors). ``bf16``: FSDP2 gathers bf16 copies of the
        fp32 master shards for compute and reduces gradients in fp32, so no rank ever holds a full
        fp32 or autocast-cast copy of the student (autocast alone would keep one per layer)."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(root.parameters()).device
            # find_unused_parameters=False: the deferred head gradient is not reachable from the forward's
            # output, and a traversal would mark it unused; the trainer sends every parameter a gradient.
            return DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
            kw = {"mp_policy": policy} if policy is not None else {}
            _fully_shard_layers(root.model, **kw)
            fully_shard(root, **kw)
        return root

    def wrap_teacher(self, root: torch.nn.Module, shard: bool) -> torch.nn.Module:
        """A frozen teacher: each rank holds 1/N of its layers (FSDP2, forward only) when ``shard``."""
        if self.active and shard:
            from torch.distributed.fsdp import fully_shard

            _fully_shard_layers(root.model)
            fully_shard(root)
        return root

    def sync(self, module: torch.nn.Module, last: bool):
        """Context for one micro-batch: gradients are reduced across ranks only on the step's last one."""
        if self.strategy == "ddp" and not last:
            return module.no_sync()
        if self.strategy == "fsdp":
            module.set_requires_gradient_sync(last)
        if self.strategy == "deepspeed":
            module.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, module: torch.nn.Module, loss: torch.Tensor) -> None:
        """The micro-batch's one backward pass (DeepSpeed's engine runs it; already normalised: no 1/accumulation)."""
        if self.strategy == "deepspeed":
            module.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    def gathered(self, params: list[torch.Tensor]):
        """Context in which ``params`` hold their full values on every rank (ZeRO-3 keeps a partition each)."""
        if self.zero3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params)
        return contextlib.nullcontext()

    def zeros_like(self, p: torch.Tensor) -> torch.Tensor:
        """An fp32 zero tensor of ``p``'s full shape (a ZeRO-3 parameter's own shape is its empty partition's):
        a gradient summed over chunks in fp32, then handed to ``p`` in its own dtype (bf16 under FSDP2's
        mixed precision)."""
        shape = getattr(p, "ds_shape", None) or p.shape
        return torch.zeros(shape, dtype=torch.float32, device=p.device)

    def deepspeed_engine(self, root: torch.nn.Module, opt: torch.optim.Optimizer, micro_batches_per_rank: int,
                         batch_size: int, max_grad_norm: float, bf16: bool) -> torch.nn.Module:
        """DeepSpeed's engine around the student and the client AdamW: ZeRO-2/3 partitions the optimizer state
        and gradients (and at stage 3 the weights), clips at ``max_grad_norm`` and steps; the trainer keeps
        its own data order, normalisation and LambdaLR schedule (which sets the client optimizer's lr)."""
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": batch_size,
                  "gradient_accumulation_steps": micro_batches_per_rank,
                  "gradient_clipping": max_grad_norm,
                  "zero_optimization": {"stage": self.zero_stage},
                  "bf16": {"enabled": bf16},
                  "steps_per_print": 10**9, "wall_clock_breakdown": False}
        engine, _opt, _, _ = deepspeed.initialize(model=root, optimizer=opt, config=config)
        return engine

    def step(self, module: torch.nn.Module, opt: torch.optim.Optimizer, params: list[torch.Tensor],
             max_grad_norm: float) -> float:
        """Clip and take the optimizer step; returns the global gradient norm before clipping."""
        if self.strategy == "deepspeed":
            module.step()  # clips, steps the partitioned optimizer, zeroes the gradients
            return float(module.get_global_grad_norm())
        norm = self.clip_grad_norm(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    # -- reductions -----------------------------------------------------------------------------------

    def broadcast_float(self, value: float) -> float:
        """Rank 0's value on every rank (one clock for a wall-clock budget: ranks never disagree on stopping)."""
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, src=0)
        return float(t.item())

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over ranks (the step's terms: every rank holds its micro-batches' share)."""
        if not self.active:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor; its full value is the global norm
            norm = norm.full_tensor()
        return float(norm)

    # -- state ----------------------------------------------------------------------------------------

    def full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The unsharded state dict on rank 0 (CPU tensors), {} on the others; a collective under FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.strategy == "deepspeed":
            inner = module.module  # the engine's TargetHidden
            with self.gathered(list(inner.parameters())):
                return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()} if self.rank == 0 else {}
        if not self.shards:
            inner = module.module if self.strategy == "ddp" else module
            return inner.state_dict() if self.rank == 0 else {}
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fully_shard_layers(model: torch.nn.Module, **kw: Any) -> None:
    """One FSDP2 unit per decoder layer (the usual transformer wrapping policy)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer, **kw)


def resolve(strategy: str, world: int) -> Strategy:
    """The strategy this run uses: "auto" is FSDP when an accelerate config asked for it, else DDP when
    launched with several processes; one process does not wrap (nothing to synchronise), except that
    "fsdp" named explicitly under a launcher (`torchrun --nproc-per-node 1`, whose rendezvous variables
    let `fully_shard` make its one-process group) runs FSDP2 at world size 1: what a one-GPU run of a
    sharded recipe measures (benchmarks/cuda_check.py). A process started without a launcher never wraps."""
    import os

    if world <= 1:
        launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
        return "fsdp" if strategy == "fsdp" and launched else "none"
    if strategy == "auto":
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            return "deepspeed"
        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "ddp"
    return strategy  # type: ignore[return-value]


def current(strategy: str, zero_stage: int = 3) -> Parallel:
    """This rank's Parallel; ``zero_stage`` is what DeepSpeed uses (an accelerate DeepSpeed config's wins)."""
    import os

    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", zero_stage))
    return Parallel(resolve(strategy, distributed.world_size()), distributed.rank(), distributed.world_size(), stage)
