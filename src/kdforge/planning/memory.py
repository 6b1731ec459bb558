"""The byte formulas, one per component of a device's memory; docs/distributed.md states each one.

Sizes are decimal (1 GB = 10^9 bytes), as model cards and the "80GB" of a GPU's name count them.
Every formula is per device; ``shards`` is the number of devices a strategy spreads a quantity over.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kdforge.errors import UserError
from kdforge.planning.architecture import Architecture

GB = 10**9

# Bytes per weight of a linear projection, by precision. int8 and 4-bit are bitsandbytes' (LLM.int8 and
# NF4 with double quantisation, blocks of 64, as `kdforge quantize` and a 4-bit teacher load them):
# NF4 adds one 8-bit absmax per block of 64 and one fp32 scale per 256 blocks. Embeddings, the output
# head, norms and biases stay in 16 bits under both (transformers keeps the head unquantised).
LINEAR_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
INT8_ROW_SCALE = 4  # LLM.int8: one fp32 scale per output row
TEACHER_PRECISIONS = {"gpu": ("bf16", "int8", "nf4"), "cpu": ("fp32", "bf16")}

# Full training with AdamW, per trainable parameter, before any sharding: what kdforge's trainer holds
# (fp32 parameters, fp32 gradients, two fp32 moments). DeepSpeed's bf16 optimizer splits the same 16
# bytes as 2 (bf16 weights) + 2 (bf16 grads) + 4 (fp32 master) + 8 (moments).
STATE_BYTES = {"weights": 4, "gradients": 4, "adam": 8}
# How a GPU computes, by strategy (one CPU trains in fp32 throughout):
#   autocast  one device and DDP: bf16 autocast over the fp32 parameters; the residual stream stays fp32
#   bf16      FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), as distill/parallel.py
#             wraps the student, and DeepSpeed's bf16 engine: the units are gathered as bf16 copies of
#             the fp32 master shards, so the model computes in bf16 weights and its residual stream is bf16
AUTOCAST, BF16, FP32 = "autocast", "bf16", "fp32"
# autocast caches the bf16 cast of every fp32 weight it multiplies until its context (the whole forward)
# exits, and the backward keeps them: 2 bytes a layer weight of the whole model (single, DDP). Under
# FSDP2's bf16 policy the gathered weights are bf16 already and autocast casts nothing.
COMPUTE_COPY = 2
DDP_BUCKETS = 4      # DDP copies the fp32 gradients into its all-reduce buckets (gradient_as_bucket_view=False)
# A parallel run (DDP, FSDP2, DeepSpeed) sums the output projection's per-chunk gradients in an fp32 buffer
# of the head's full shape (Parallel.zeros_like in distill/parallel.py) under every strategy, then hands
# the sum to the weight in its own dtype.
HEAD_GRAD = 4
# FSDP2 with the bf16 policy, bytes per parameter of a unit: its bf16 gathered copy (2), its bf16
# unsharded gradient (2) and the fp32 reduce-scatter input it is copied into (4, reduce_dtype=fp32).
FSDP_GATHER, FSDP_GRAD, FSDP_REDUCE = 2, 2, 4
ZERO3_MAX_LIVE = 10**9  # DeepSpeed stage3_max_live_parameters (its default)
# (chunk, V) buffers of the chunked loss, per position and vocabulary entry: the student's logits and
# their fp32 copy, log-probabilities and gradient; 16 bytes covers bf16 on GPU and fp32 on CPU.
LOGIT_CHUNK_BYTES = 16


@dataclass(frozen=True)
class Hardware:
    kind: str           # "gpu" or "cpu" (host memory only)
    count: int          # devices (1 for cpu)
    memory: int         # bytes per device
    host_memory: int | None = None

    @property
    def reserve(self) -> int:
        """Kept free: the CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation on a GPU (5%,
        at least 1 GB); the OS, Python and torch themselves on a CPU (10%, at least 2 GB)."""
        if self.kind == "cpu":
            return max(2 * GB, self.memory // 10)
        return max(GB, self.memory // 20)

    @property
    def usable(self) -> int:
        return self.memory - self.reserve

    @property
    def host_usable(self) -> int | None:
        """Host memory for offloaded state, where it was given (the same reserve as a CPU's)."""
        return None if self.host_memory is None else self.host_memory - max(2 * GB, self.host_memory // 10)

    @property
    def unit(self) -> str:
        return "CPU" if self.kind == "cpu" else "GPU"

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"CPU only, {fmt(self.memory)} RAM ({fmt(self.usable)} usable)"
        return f"{self.count} GPU{'s' if self.count > 1 else ''} x {fmt(self.memory)} ({fmt(self.usable)} usable each)"


_MEM_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)b?|(b))\s*", re.IGNORECASE)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_memory(text: str, flag: str = "--device-memory") -> int:
    """``80GB``, ``80G``, ``24 GiB``, ``81920MiB``, ``1.5TB`` -> bytes (GB decimal, GiB binary)."""
    m = _MEM_RE.fullmatch(str(text))
    if not m:
        raise UserError(f"{flag} {text!r}: expected a size with its unit, e.g. 80GB, 24GiB or 81920MiB")
    number, prefix, binary, _ = m.groups()
    scale = 1 if prefix is None else (1024 if binary else 1000) ** _POWER[prefix.lower()]
    value = int(float(number) * scale)
    if value < 10**8:
        raise UserError(f"{flag} {text!r}: under 0.1 GB; give the size with its unit, e.g. 80GB")
    return value


def parse_devices(text: str) -> tuple[str, int]:
    """``8`` -> ("gpu", 8); ``cpu`` -> ("cpu", 1)."""
    t = str(text).strip().lower()
    if t == "cpu":
        return "cpu", 1
    if not t.isdigit():
        raise UserError(f"--devices {text!r}: expected a number of GPUs (e.g. 8) or 'cpu'")
    if int(t) < 1:
        raise UserError(f"--devices {text}: need at least one GPU; for host memory only, use --devices cpu")
    return "gpu", int(t)


def fmt(n: float) -> str:
    """Bytes as GB with one decimal (MB under 1 GB)."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 10**6:.0f} MB"


# --- weights -------------------------------------------------------------------------------------------

def _other_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def layer_weight_bytes(arch: Architecture, precision: str) -> int:
    """One decoder layer's weights at ``precision``."""
    n = arch.layer_linear * LINEAR_BYTES[precision] + arch.layer_other * _other_bytes(precision)
    if precision == "int8":
        n += arch.layer_rows * INT8_ROW_SCALE
    return math.ceil(n)


def edge_weight_bytes(arch: Architecture, precision: str) -> tuple[int, int]:
    """(embedding, output head + final norm) bytes: never quantised."""
    b = _other_bytes(precision)
    return arch.embedding * b, (arch.head + arch.hidden_size) * b


def weight_bytes(arch: Architecture, precision: str) -> int:
    emb, head = edge_weight_bytes(arch, precision)
    return arch.num_hidden_layers * layer_weight_bytes(arch, precision) + emb + head


def mapped_weight_bytes(arch: Architecture, precision: str, n: int) -> int:
    """The most any one of ``n`` devices holds when the model is mapped across them by layers (a
    ``device_map``): its share of the layers, rounded up, plus the embedding or the head, whichever is
    larger (they sit on the first and last device)."""
    if n <= 1:
        return weight_bytes(arch, precision)
    emb, head = edge_weight_bytes(arch, precision)
    return math.ceil(arch.num_hidden_layers / n) * layer_weight_bytes(arch, precision) + max(emb, head)


def mapped_layers(arch: Architecture, n: int) -> int:
    return math.ceil(arch.num_hidden_layers / max(n, 1))


def largest_unit(arch: Architecture) -> int:
    """Parameters of the largest unit a sharded strategy gathers at once: a decoder layer, the embedding
    or the untied head."""
    return max(arch.layer_params, arch.embedding, arch.head)


# --- training state ------------------------------------------------------------------------------------

def training_state(params: int, shards: int = 1) -> dict[str, int]:
    """fp32 weights, fp32 gradients and the two AdamW moments of full training, split over ``shards``."""
    return {k: math.ceil(params * b / shards) for k, b in STATE_BYTES.items()}


def root_params(arch: Architecture) -> int:
    """What FSDP2's root unit holds as kdforge wraps it: embeddings, final norm and the untied head."""
    return arch.embedding + arch.head + arch.hidden_size


def fsdp_gathered(arch: Architecture) -> int:
    """FSDP2 as kdforge wraps the student (each decoder layer a unit; the root gathered from its forward to
    its backward) under the bf16 policy: the root's bf16 copy, its bf16 gradient and fp32 reduce-scatter
    input (8 bytes a root parameter); two layers gathered in bf16 (the one computing and the prefetched
    one) and one layer's bf16 gradient with its fp32 reduce-scatter input (10 bytes a layer parameter)."""
    unit = FSDP_GATHER + FSDP_GRAD + FSDP_REDUCE
    return root_params(arch) * unit + arch.layer_params * (FSDP_GATHER + unit)


def head_grad_bytes(arch: Architecture) -> int:
    """The buffer a parallel run sums the output projection's chunk gradients in: V x hidden in fp32 under
    every strategy (DDP, FSDP2, ZeRO-3; the head's full shape, not a shard's)."""
    return arch.vocab_size * arch.hidden_size * HEAD_GRAD


def zero3_gathered(arch: Architecture) -> int:
    """ZeRO-3: the parameters gathered at once, capped at stage3_max_live_parameters (bf16), and one unit's
    bf16 gradient in the reduce bucket."""
    u = largest_unit(arch)
    return min(2 * u, ZERO3_MAX_LIVE) * 2 + u * 2


# --- activations ---------------------------------------------------------------------------------------

def layer_activation_bytes(arch: Architecture, compute: str) -> int:
    """Bytes one decoder layer keeps for its backward pass, per token, as transformers' Llama/Qwen2 layers
    keep them (Korthikanti et al. 2022's method, counting the tensors autograd saves; the terms were read
    off saved-tensor hooks, and tests/test_plan.py measures them on tiny models, under FSDP2 over two
    processes for bf16). SDPA attention, which saves no (s, s) scores; no dropout.

    autocast (bf16 autocast over fp32 weights: one GPU, DDP): the residual stream stays fp32, so each
    RMSNorm keeps its fp32 input and output and the rsqrt (2 x (8h + 4)); autocast casts the norm's output
    to bf16 once for each projection that reads it (q, k, v: 6h; gate, up: 4h); SDPA keeps bf16 q, k, v
    and its output (4q + 4g) and an fp32 log-sum-exp per head; the MLP keeps gate, up, SiLU(gate) and the
    down projection's input in bf16 (8I): 26h + 4q + 4g + 8I + 4 heads + 8.
    bf16 (bf16 weights: FSDP2's bf16 policy, DeepSpeed): the residual stream is bf16; each RMSNorm keeps the
    fp32 upcast of its input, the rsqrt, the normalised value cast back to bf16 and its bf16 output, which
    the projections share (2 x (4h + 4 + 2h + 2h)); attention and MLP as above: 16h + 4q + 4g + 8I + 4 heads + 8.
    fp32 (a CPU): the norms as under autocast, their outputs shared by the projections (8h), SDPA 8q + 8g +
    4 heads, the MLP 16I: 24h + 8q + 8g + 16I + 4 heads + 8.
    """
    h, q, g, i, heads = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size, arch.num_attention_heads
    if compute == AUTOCAST:
        return 26 * h + 4 * q + 4 * g + 8 * i + 4 * heads + 8
    if compute == BF16:
        return 16 * h + 4 * q + 4 * g + 8 * i + 4 * heads + 8
    return 24 * h + 8 * q + 8 * g + 16 * i + 4 * heads + 8


def activation_bytes(arch: Architecture, tokens: int, checkpointing: bool, compute: str) -> int:
    """A training micro-batch of ``tokens`` tokens: every layer's saved tensors, or with activation
    checkpointing each layer's input (the residual stream: 4h a token in fp32 and under autocast, 2h in
    bf16) plus one layer's tensors recomputed during its backward; plus, a token, the final norm (8h + 4;
    6h + 4 in bf16, whose normalised value is kept in bf16), the token ids (8) and the rotary cos/sin
    (8 head_dim; 4 head_dim in bf16)."""
    per_layer = tokens * layer_activation_bytes(arch, compute)
    if compute == BF16:
        residual, top = 2, tokens * (6 * arch.hidden_size + 4 * arch.head_dim + 12)
    else:
        residual, top = 4, tokens * (8 * arch.hidden_size + 8 * arch.head_dim + 12)
    if checkpointing:
        return arch.num_hidden_layers * tokens * residual * arch.hidden_size + per_layer + top
    return arch.num_hidden_layers * per_layer + top


def compute_copy_bytes(arch: Architecture) -> int:
    """autocast's bf16 casts of every layer's projection weights and biases, kept from the forward to the
    backward (the embeddings are looked up, not cast; the head is cast chunk by chunk and freed): one GPU
    and DDP only (under FSDP2's bf16 policy the gathered weights are bf16 already)."""
    return COMPUTE_COPY * arch.num_hidden_layers * (arch.layer_linear + arch.layer_biases)


def logits_chunk_bytes(arch: Architecture, targets: int, chunk_size: int) -> int:
    """The chunked loss's (chunk, V) buffers: only ``chunk_size`` target positions are projected at once."""
    return min(chunk_size, max(targets, 1)) * arch.vocab_size * LOGIT_CHUNK_BYTES


# --- inference (teacher) -------------------------------------------------------------------------------

def kv_cache_bytes(arch: Architecture, tokens: int, batch: int, elem: int, layers: int | None = None) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes x tokens x batch."""
    n = arch.num_hidden_layers if layers is None else layers
    return 2 * n * arch.num_key_value_heads * arch.head_dim * elem * tokens * batch


def forward_working_bytes(arch: Architecture, tokens: int, elem: int) -> int:
    """A no-grad forward's largest live set, one layer at a time: the residual stream and the normed input,
    plus the attention's q, k, v and output or the MLP's gate, up and product, whichever is larger."""
    inner = max(2 * arch.q_dim + 2 * arch.kv_dim, 3 * arch.intermediate_size)
    return tokens * (2 * arch.hidden_size + inner) * elem


def label_logits_bytes(arch: Architecture, targets: int, elem: int) -> int:
    """The label stage's logits at the target positions, their fp32 copy divided by T and the log-softmax."""
    return targets * arch.vocab_size * (elem + 4 + 4)


def sampling_logits_bytes(arch: Architecture, batch: int) -> int:
    """Generation projects the last position only; the sampler works on fp32 copies (logits, probabilities)."""
    return batch * arch.vocab_size * 4 * 2


# --- the label cache on disk ---------------------------------------------------------------------------

def id_bytes(vocab_size: int) -> int:
    """Token ids in the cache: uint16 up to 65,536 tokens, else int32 (softlabels/format.py)."""
    return 2 if vocab_size <= 65536 else 4


def bytes_per_target(k: int, vocab_size: int) -> int:
    """softlabels/format.py's per-target-token record: top-1 log-prob (fp16), k ids, k-1 uint8 codes of the
    other log-probs, tail mass (fp16)."""
    return 2 + k * id_bytes(vocab_size) + (k - 1) + 2


def label_cache_bytes(arch: Architecture, targets: int, tokens: int, examples: int, k: int,
                      hidden_layers: int = 0) -> int:
    """Shards' bytes: the per-target records, int64 example offsets, and fp16 hidden states of every token
    for each kept teacher layer (with their own int64 offsets)."""
    n = targets * bytes_per_target(k, arch.vocab_size) + 8 * (examples + 1)
    if hidden_layers:
        n += hidden_layers * tokens * arch.hidden_size * 2 + 8 * (examples + 1)
    return n


def max_batch(need, usable: int, limit: int = 4096) -> int:
    """The largest batch b <= limit with need(b) <= usable (need grows with b); 0 when not even 1 fits."""
    if need(1) > usable:
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo
