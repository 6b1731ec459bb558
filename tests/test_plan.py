"""`kdforge plan`: parameter counts against the published totals and real models, the byte formulas against
numbers worked out by hand here, the recommendation, and the command line (its output and its errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdforge.cli import main
from kdforge.errors import UserError
from kdforge.planning import memory as mem
from kdforge.planning.architecture import KNOWN, from_config, resolve
from kdforge.planning.plans import Workload, make_plan

GB = 10**9
Q72, Q7, Q3, Q15, Q05 = (KNOWN[f"qwen2.5-{s}-instruct"] for s in ("72b", "7b", "3b", "1.5b", "0.5b"))


def _workload(**kw) -> Workload:
    base = dict(conversations=1000, max_length=4096, answer_tokens=2048, batch_size=1, global_batch=128,
                teacher_batch=8, top_k=64, chunk_size=256)
    return Workload(**(base | kw))


def _rows(plan, stage, **match):
    return [r for r in plan.rows if r.stage == stage and all(getattr(r, k) == v for k, v in match.items())]


@pytest.mark.parametrize("arch, total, non_embedding, exact", [
    (Q72, 72.7, None, 72_706_203_648), (Q7, 7.62, 6.53, 7_615_616_512), (Q3, 3.09, 2.77, 3_085_938_688),
    (Q15, 1.54, 1.31, 1_543_714_304), (Q05, 0.49, 0.36, 494_032_768)])
def test_known_counts_are_the_published_totals(arch, total, non_embedding, exact):
    """The published totals (72.7B, 7.62B, 3.09B, 1.54B, 0.49B) and the cards' non-embedding counts (6.53B, 2.77B,
    1.31B, 0.36B; the 72B card's 70.0B is not parameters minus embeddings and head, 70.2B). The exact counts
    are worked out by hand, e.g. the 7B: per layer q 3584*3584+3584, k and v 3584*512+512 each, o 3584*3584,
    MLP 3*3584*18944, norms 2*3584 = 233,057,792; x 28, + embeddings and head 2*152064*3584 + final norm 3584
    = 7,615,616,512."""
    assert arch.params == exact
    assert round(arch.params / 1e9, 1 if total > 10 else 2) == total
    if non_embedding is not None:
        assert round((arch.params - arch.embedding - arch.head) / 1e9, 2) == non_embedding
    assert KNOWN["smollm2-135m-instruct"].params == 134_515_008  # README: the embedded teacher's 134.5M


def test_names_resolve_in_their_common_spellings():
    for spec in ("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct", " QWEN2.5-7B "):
        assert resolve(spec) is Q7
    assert resolve("embedded:smollm2-135m-instruct").vocab_size == 49152
    with pytest.raises(UserError, match="not a folder, a config.json or a known name"):
        resolve("qwen2.5-14b", "teacher")


TINY = ("qwen2 untied", "qwen2 tied", "llama tied", "llama biases, head_dim 32", "qwen3")


def _tiny_config(name: str):
    import transformers

    common = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2)
    if name == "qwen3" and not hasattr(transformers, "Qwen3Config"):
        pytest.skip("this transformers has no Qwen3")
    return {"qwen2 untied": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=False),
            "qwen2 tied": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
            "llama tied": lambda: transformers.LlamaConfig(**common, tie_word_embeddings=True),
            "llama biases, head_dim 32": lambda: transformers.LlamaConfig(**common, attention_bias=True,
                                                                          mlp_bias=True, head_dim=32),
            "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=16)}[name]()


@pytest.mark.parametrize("name", TINY)
def test_counts_equal_a_random_transformers_model_built_from_its_config_json(name, tmp_path):
    """Qwen2's q/k/v biases, tied and untied heads, Llama's attention_bias and mlp_bias, a head_dim that is
    not hidden/heads, Qwen3's per-head q/k norms: the count from the written config.json is the model's."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(name))
    model.save_pretrained(tmp_path)
    arch = resolve(str(tmp_path))  # the folder: its config.json
    assert arch.params == sum(p.numel() for p in model.parameters()), name
    assert resolve(str(tmp_path / "config.json")).params == arch.params
    # bf16 weights are 2 bytes a parameter, exactly what the model holds in bf16
    assert mem.weight_bytes(arch, "bf16") == sum(p.numel() * 2 for p in model.parameters())


def test_a_bad_config_json_names_the_field(tmp_path):
    good = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "vocab_size": 100}
    for key in good:
        with pytest.raises(UserError, match=f"missing '{key}'"):
            from_config({k: v for k, v in good.items() if k != key}, "x/config.json")
    with pytest.raises(UserError, match="'hidden_size' must be a positive integer"):
        from_config(good | {"hidden_size": "64"}, "x")
    with pytest.raises(UserError, match="not a multiple of num_key_value_heads"):
        from_config(good | {"num_key_value_heads": 3}, "x")
    with pytest.raises(UserError, match="mixture-of-experts"):
        from_config(good | {"num_local_experts": 8}, "x")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable JSON config"):
        resolve(str(tmp_path))


def test_parse_memory_and_devices():
    assert mem.parse_memory("80GB") == 80 * GB
    assert mem.parse_memory("80G") == 80 * GB
    assert mem.parse_memory("24 GiB") == 24 * 2**30
    assert mem.parse_memory("81920MiB") == 80 * 2**30
    assert mem.parse_memory("1.5TB") == 1500 * GB
    for bad in ("80", "lots", "GB", "-8GB", "10MB", "80 GBB"):
        with pytest.raises(UserError, match="--device-memory"):
            mem.parse_memory(bad)
    assert mem.parse_devices("8") == ("gpu", 8)
    assert mem.parse_devices("cpu") == ("cpu", 1)
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(UserError, match="--devices"):
            mem.parse_devices(bad)


def test_weights_by_precision_by_hand():
    """72B in bf16: every parameter 2 bytes, 145.4 GB. int8: each layer's linear weights 877,658,112 at 1 byte,
    plus a 4-byte scale per output row (8192 + 2*1024 + 8192 + 2*29568 + 8192 = 85,760 rows) and the layer's
    26,624 norm and bias values at 2 bytes; embeddings and head stay in 16 bits."""
    assert mem.weight_bytes(Q72, "bf16") == 72_706_203_648 * 2 == 145_412_407_296
    per_layer = 877_658_112 + 85_760 * 4 + 26_624 * 2
    assert mem.weight_bytes(Q72, "int8") == 80 * per_layer + (2 * 152064 * 8192 + 8192) * 2
    # mapped over 2 GPUs: 40 layers each, and the head (with the final norm) on the last
    assert mem.mapped_weight_bytes(Q72, "bf16", 2) == 40 * 877_684_736 * 2 + (152064 * 8192 + 8192) * 2
    nf4 = mem.weight_bytes(Q72, "nf4")
    assert 0.27 < nf4 / mem.weight_bytes(Q72, "bf16") < 0.3  # 4.13 bits per weight plus the 16-bit edges


def test_a_72b_bf16_teacher_fits_two_80gb_gpus_mapped_but_not_one():
    hw = mem.Hardware("gpu", 2, 80 * GB)
    plan = make_plan(Q72, Q7, hw, _workload(max_length=512, answer_tokens=256, teacher_batch=1))
    one, two = (_rows(plan, "label", precision="bf16", devices=n)[0] for n in (1, 2))
    assert one.parts["weights"] == 145_412_407_296 and not one.fits
    assert two.parts["weights"] == 72_706_211_840 and two.fits
    assert hw.usable == 76 * GB  # 5% kept free


def test_full_adamw_of_a_7b_student_per_strategy_by_hand():
    """16 bytes a parameter (fp32 weights, fp32 gradients, two fp32 moments), sharded by the world size under
    FSDP and ZeRO-3: 7,615,616,512 * 16 / 8 = 15,231,233,024 bytes a GPU. DDP keeps all of it, plus its
    gradient buckets (4 bytes a parameter); under bf16 autocast (one GPU, DDP) the trainer keeps the bf16
    casts of the layers' weights (2 bytes each); FSDP2's bf16 policy gathers bf16 copies instead and keeps
    no such copy; ZeRO-Offload keeps bf16 weight and gradient shards (4 / 8 bytes a parameter) and moves
    the 16 bytes to the host."""
    p = 7_615_616_512
    plan = make_plan(Q72, Q7, mem.Hardware("gpu", 8, 80 * GB), _workload())
    state = ("weights", "gradients", "adam")
    for strategy in ("fsdp", "zero3"):
        r = _rows(plan, "distill", strategy=strategy, checkpointing=True)[0]
        assert sum(r.parts[k] for k in state) == p * 16 // 8 == 15_231_233_024
    ddp = _rows(plan, "distill", strategy="ddp", checkpointing=True)[0]
    # the bf16 casts: every layer's projection weights and q/k/v biases, 28 x 233,050,624, 2 bytes each
    assert sum(ddp.parts[k] for k in state) == p * 16 and ddp.parts["compute_copy"] == 2 * 28 * 233_050_624
    assert ddp.parts["buckets"] == p * 4 and not ddp.fits
    single = _rows(plan, "distill", strategy="single", checkpointing=True)[0]
    assert single.parts["compute_copy"] == ddp.parts["compute_copy"]
    off = _rows(plan, "distill", strategy="zero3-offload", checkpointing=True)[0]
    assert off.parts["weights"] + off.parts["gradients"] == p * 4 // 8 and off.host == p * 16
    # FSDP2 as kdforge wraps it, bf16 policy: the root (embeddings, untied head, final norm) as a bf16 copy
    # with its bf16 gradient and the fp32 reduce-scatter input, 2 + 2 + 4 bytes each; two layers gathered in
    # bf16 and one layer's bf16 gradient with its fp32 reduce-scatter input, 2*2 + 2 + 4 bytes a layer
    # parameter; no autocast copy. Every parallel run (DDP, FSDP2, ZeRO-3 with or without offload) sums the
    # head's gradient over the loss chunks in an fp32 buffer of the head's full shape: V x hidden x 4
    fsdp = _rows(plan, "distill", strategy="fsdp", checkpointing=True)[0]
    assert fsdp.parts["gathered"] == (2 * 152064 * 3584 + 3584) * 8 + 233_057_792 * 10 == 11_050_564_608
    zero3 = _rows(plan, "distill", strategy="zero3", checkpointing=True)[0]
    for r in (ddp, fsdp, zero3, off):
        assert r.parts["head_grad"] == 152064 * 3584 * 4 == 2_179_989_504, r.strategy
    assert "head_grad" not in single.parts
    assert fsdp.parts["compute_copy"] == 0
    assert fsdp.precision == "bf16 params, fp32 master" and ddp.precision == "bf16 mixed"


def test_activations_and_logits_by_hand():
    """A Qwen2.5-7B layer under bf16 autocast keeps 26h + 4q + 4g + 8I + 4 heads + 8 bytes a token
    (h 3584, q 3584, g 512, I 18944, 28 heads): 93,184 + 14,336 + 2,048 + 151,552 + 112 + 8 = 261,240;
    with bf16 weights (FSDP2's bf16 policy) 16h + 4q + 4g + 8I + 4 heads + 8 = 57,344 + 14,336 + 2,048 +
    151,552 + 112 + 8 = 225,400; in fp32 24h + 8q + 8g + 16I + 4 heads + 8 = 86,016 + 28,672 + 4,096 +
    303,104 + 112 + 8 = 422,008."""
    assert mem.layer_activation_bytes(Q7, mem.AUTOCAST) == 261_240
    assert mem.layer_activation_bytes(Q7, mem.BF16) == 225_400
    assert mem.layer_activation_bytes(Q7, mem.FP32) == 422_008
    top = 4096 * (8 * 3584 + 8 * 128 + 12)
    assert mem.activation_bytes(Q7, 4096, False, mem.AUTOCAST) == 28 * 4096 * 261_240 + top
    # checkpointing: each layer's fp32 input, and one layer recomputed at a time
    assert mem.activation_bytes(Q7, 4096, True, mem.AUTOCAST) == 28 * 4096 * 3584 * 4 + 4096 * 261_240 + top
    # bf16 weights: a bf16 residual stream (2h a checkpointed layer input), the final norm 6h + 4, bf16 cos/sin
    top16 = 4096 * (6 * 3584 + 4 * 128 + 12)
    assert mem.activation_bytes(Q7, 4096, False, mem.BF16) == 28 * 4096 * 225_400 + top16 == 25_940_901_888
    assert mem.activation_bytes(Q7, 4096, True, mem.BF16) == 28 * 4096 * 3584 * 2 + 4096 * 225_400 + top16
    # the chunked loss holds (256, V) buffers of 16 bytes an entry, fewer rows when there are fewer targets
    assert mem.logits_chunk_bytes(Q7, 2048, 256) == 256 * 152064 * 16
    assert mem.logits_chunk_bytes(Q7, 100, 256) == 100 * 152064 * 16


@pytest.mark.parametrize("mixed", [True, False], ids=["bf16 autocast", "fp32"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_activation_bytes_are_what_transformers_keeps_for_the_backward(kind, mixed):
    """Saved-tensor hooks collect every tensor autograd keeps in a training forward (parameters excluded,
    each storage once), with 1 and with 3 layers: a layer's share and the one-layer total are the
    formulas' to the byte; with gradient checkpointing a layer keeps its fp32 input. Under autocast the
    bf16 casts of the projection weights are kept too (the plan's compute copy)."""
    import torch
    import transformers

    tokens, common = 128, dict(vocab_size=256, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                               num_key_value_heads=2, tie_word_embeddings=True)
    config_type = transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig

    def saved(layers: int, checkpointing: bool = False) -> int:
        torch.manual_seed(0)
        config = config_type(**common, num_hidden_layers=layers, attn_implementation="sdpa")
        model = transformers.AutoModelForCausalLM.from_config(config).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        params = {p.data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t):
            if t.data_ptr() not in params:
                kept.setdefault(t.data_ptr(), t.untyped_storage().nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            model.model(input_ids=torch.randint(0, 256, (1, tokens)))
        return sum(kept.values())

    arch = from_config(config_type(**common, num_hidden_layers=1).to_dict(), "tiny")
    compute = mem.AUTOCAST if mixed else mem.FP32
    # one layer's bf16 weight casts (autocast caches the biases' casts too, but the backward keeps none)
    copies = 2 * arch.layer_linear if mixed else 0
    one, three = saved(1), saved(3)
    assert (three - one) // 2 == tokens * mem.layer_activation_bytes(arch, compute) + copies
    assert one == mem.activation_bytes(arch, tokens, False, compute) + copies
    assert (saved(3, True) - saved(1, True)) // 2 == tokens * 4 * arch.hidden_size


# Run by two gloo processes (torchrun): the student wrapped as kdforge's FSDP2 wraps it with bf16 (the
# MixedPrecisionPolicy of kdforge.distill.parallel), a forward under autocast as the trainer runs it, then a
# backward; prints what the plan's FSDP rows count, measured: the saved tensors still holding memory after
# the forward (resharded layers' gathered weights hold none), each gathered layer's weights, the gradients
# that enter each reduce-scatter and the reduce dtype, the dtypes of master weights and their gradients.
FSDP_PROBE = """
import json, sys
import torch, torch.distributed as dist, transformers
from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fsdp_group
from kdforge.distill.parallel import Parallel, TargetHidden

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
TOKENS, COMMON = 128, json.loads(sys.argv[1])
reduces = []
reduce = fsdp_group.foreach_reduce

def spy(params, grads, group, stream, comm, orig_dtype, reduce_dtype, *a, **k):
    reduces.append([sorted({str(g.dtype) for g in grads}), sum(g.numel() * g.element_size() for g in grads),
                    str(reduce_dtype)])
    return reduce(params, grads, group, stream, comm, orig_dtype, reduce_dtype, *a, **k)

fsdp_group.foreach_reduce = spy

def run(kind, layers, ckpt):
    cls = transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**COMMON, num_hidden_layers=layers,
                                                              attn_implementation="sdpa")).train()
    if ckpt:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    par = Parallel("fsdp", rank, world)
    root = par.wrap_student(TargetHidden(model), bf16=True)
    gathered = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: gathered.append(
        [sorted({str(p.dtype) for p in m.parameters()}), sum(p.numel() * p.element_size() for p in m.parameters())]))
    kept = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            kept.append(t.untyped_storage())
        return t
    ids = torch.randint(0, COMMON["vocab_size"], (1, TOKENS))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = root(ids, torch.ones_like(ids), ids, targets=False)
    saved = sum({s.data_ptr(): s.nbytes() for s in kept if s.nbytes()}.values())
    # the buffer the trainer sums the deferred head gradient in, made as the trainer makes it after the forward
    buf = par.zeros_like(model.get_output_embeddings().weight)
    head = [str(buf.dtype), list(buf.shape), buf.numel() * buf.element_size()]
    reduces.clear()
    out.float().square().sum().backward()
    return {"saved": saved, "gathered": gathered[0], "head": head, "reduces": list(reduces),
            "master": sorted({str(p.dtype) for p in root.parameters()}),
            "grads": sorted({str(p.grad.dtype) for p in root.parameters() if p.grad is not None})}

res = {f"{k} {n} {c}": run(k, n, c) for k in ("qwen2", "llama") for n in (1, 3) for c in (False, True)}
if rank == 0:
    print("PROBE " + json.dumps(res))
dist.destroy_process_group()
"""


@pytest.mark.integration
def test_fsdp_bf16_rows_are_what_fsdp2_keeps_over_two_processes(tmp_path):
    """Under FSDP2 with kdforge's bf16 policy (bf16 gathers of fp32 master shards, fp32 reduction), measured
    over two gloo processes on tiny untied Qwen2 and Llama models: each gathered layer is bf16, 2 bytes a
    parameter; its gradient enters the reduce-scatter in bf16 (2 bytes) and is reduced in fp32 (the 4-byte
    reduce-scatter input); master weights and their gradients stay fp32; the buffer the deferred head
    gradient is summed in (Parallel.zeros_like) is fp32 of the head's full shape; and the saved tensors are
    the bf16 formula's to the byte, with no weight cast kept (the autocast rows' compute copy is absent) and a
    bf16 layer input (2h a token) under checkpointing."""
    import os
    import socket
    import subprocess
    import sys

    import transformers

    common = dict(vocab_size=256, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    script = tmp_path / "probe.py"
    script.write_text(FSDP_PROBE)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), str(script), json.dumps(common)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("PROBE "))[6:])
    tokens = 128
    for kind in ("qwen2", "llama"):
        cls = transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig
        arch = from_config(cls(**common, num_hidden_layers=1).to_dict(), "tiny")
        one, three = res[f"{kind} 1 False"], res[f"{kind} 3 False"]
        assert (three["saved"] - one["saved"]) // 2 == tokens * mem.layer_activation_bytes(arch, mem.BF16), kind
        assert one["saved"] == mem.activation_bytes(arch, tokens, False, mem.BF16), kind
        ckpt = (res[f"{kind} 3 True"]["saved"] - res[f"{kind} 1 True"]["saved"]) // 2
        assert ckpt == tokens * 2 * arch.hidden_size, kind
        for name, case in res.items():
            if not name.startswith(kind):
                continue
            assert case["gathered"] == [["torch.bfloat16"], mem.FSDP_GATHER * arch.layer_params], name
            layer_grads = case["reduces"][:-1]  # each layer's, last to first; then the root's
            assert layer_grads == [[["torch.bfloat16"], mem.FSDP_GRAD * arch.layer_params, "torch.float32"]] * (
                len(case["reduces"]) - 1), name
            assert mem.FSDP_REDUCE == torch_size("float32")
            assert case["master"] == case["grads"] == ["torch.float32"], name
            assert case["head"] == ["torch.float32", [common["vocab_size"], common["hidden_size"]],
                                    mem.head_grad_bytes(arch)], name
            assert mem.HEAD_GRAD == torch_size("float32")


def torch_size(dtype: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def test_kv_cache_by_hand():
    """2 (K, V) x 28 layers x 4 KV heads x 128 x 2 bytes x 4096 tokens x 8 sequences."""
    assert mem.kv_cache_bytes(Q7, 4096, 8, 2) == 2 * 28 * 4 * 128 * 2 * 4096 * 8 == 1_879_048_192
    assert mem.kv_cache_bytes(Q72, 4096, 8, 2) == 10_737_418_240
    # mapped over 4 GPUs, each holds the cache of its 20 layers
    plan = make_plan(Q72, Q7, mem.Hardware("gpu", 8, 80 * GB), _workload())
    assert _rows(plan, "generate", precision="bf16", devices=4)[0].parts["kv_cache"] == 10_737_418_240 // 4


def test_label_cache_bytes_match_the_cache_format():
    """k=20 with Qwen2.5's vocabulary (int32 ids): 2 (top-1 fp16) + 20*4 + 19 (codes) + 2 (tail fp16) = 103
    bytes a target token; with SmolLM2's 49,152 tokens (uint16 ids) 63. The format's own function agrees."""
    from kdforge.softlabels.format import bytes_per_target

    assert mem.bytes_per_target(20, 152064) == 103 == bytes_per_target(20, 152064)
    assert mem.bytes_per_target(20, 49152) == 63 == bytes_per_target(20, 49152)
    assert mem.bytes_per_target(64, 151936) == 323 == bytes_per_target(64, 151936)  # docs/soft-label-cache.md
    # 10 conversations x 100 targets, plus the 11 int64 offsets
    assert mem.label_cache_bytes(Q7, 1000, 2000, 10, 20) == 1000 * 103 + 11 * 8
    # hidden states of 2 teacher layers: fp16 at every token, with their own offsets
    assert mem.label_cache_bytes(Q7, 1000, 2000, 10, 20, 2) == 1000 * 103 + 11 * 8 + 2 * 2000 * 3584 * 2 + 11 * 8


def test_the_recommendation_on_8x80gb():
    """FSDP on 8 GPUs without checkpointing, by hand: the sharded state 15,231,233,024, the gathered units
    11,050,564,608, the fp32 head-gradient buffer 152064 x 3584 x 4 = 2,179,989,504, the activations of 4096
    tokens in bf16 25,940,901,888 and the loss chunk 256 x 152064 x 16 = 622,854,144: 55,025,543,168 bytes,
    under 90% of the 76 GB usable (68.4 GB), so no checkpointing is needed."""
    plan = make_plan(Q72, Q7, mem.Hardware("gpu", 8, 80 * GB), _workload(conversations=10_000))
    rec = plan.recommendation
    assert rec.teacher["precision"] == "bf16" and rec.teacher["devices_per_copy"] == 4 and rec.teacher["copies"] == 2
    assert rec.distill["strategy"] == "fsdp" and rec.distill["accumulation"] == 16
    fsdp = _rows(plan, "distill", strategy="fsdp", checkpointing=False)[0]
    assert fsdp.total == 15_231_233_024 + 11_050_564_608 + 2_179_989_504 + 25_940_901_888 + 622_854_144
    assert fsdp.total == 55_025_543_168 < 0.9 * 76 * GB
    assert not rec.distill["checkpointing"] and "55.0 GB per GPU, no activation checkpointing needed" in rec.text
    assert rec.distill["global_batch"] == 128
    assert "across 4 GPUs" in rec.text and "with FSDP on 8 GPUs, micro-batch 1, accumulation 16" in rec.text
    # every row that fits is within the usable memory; the chosen ones are among them
    assert all(r.total <= r.usable for r in plan.rows if r.fits)


def test_the_recommendation_on_2x24gb_and_on_a_cpu():
    plan = make_plan(Q3, Q15, mem.Hardware("gpu", 2, 24 * GB), _workload(max_length=2048, answer_tokens=1024))
    assert plan.recommendation.teacher["devices_per_copy"] == 1  # a 3B teacher on each GPU
    assert plan.recommendation.distill["strategy"] == "fsdp"  # 1.54B x 16 bytes does not fit one 24 GB GPU
    cpu = make_plan(Q05, Q05.with_layers(8), mem.Hardware("cpu", 1, 24 * GB),
                    _workload(conversations=300, max_length=1024, answer_tokens=512, batch_size=4, global_batch=16))
    rec = cpu.recommendation
    assert rec.teacher["precision"] == "fp32" and rec.distill["strategy"] == "single"
    assert rec.distill["accumulation"] == 4 and "on the CPU" in rec.text
    assert {r.strategy for r in cpu.rows if r.stage == "distill"} == {"single"}


def test_nothing_fits_is_said_plainly():
    plan = make_plan(Q72, Q7, mem.Hardware("gpu", 1, 24 * GB), _workload())
    assert plan.recommendation.teacher is None and plan.recommendation.distill is None
    assert "the teacher does not fit" in plan.recommendation.text
    assert "does not fit for full training" in plan.recommendation.text


def test_cli_prints_the_plan_and_the_recommendation(capsys):
    rc = main(["plan", "--teacher", "qwen2.5-72b", "--student", "qwen2.5-7b", "--devices", "8",
               "--device-memory", "80GB"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "recommended: label first" in out and "with FSDP on 8 GPUs" in out
    for section in ("teacher weights", "generate:", "label:", "label cache on disk", "distill from the cache",
                    "distill online"):
        assert section in out


def test_cli_json(capsys):
    rc = main(["plan", "--teacher", "qwen2.5-3b", "--student-layers", "8", "--devices", "cpu",
               "--device-memory", "24GB", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert data["student"]["num_hidden_layers"] == 8 and data["hardware"]["kind"] == "cpu"
    assert data["teacher"]["params"] == 3_085_938_688
    assert data["recommendation"]["distill"]["strategy"] == "single"
    assert {r["stage"] for r in data["rows"]} == {"generate", "label", "distill", "distill-online"}


@pytest.mark.parametrize("args, words", [
    (["--teacher", "BAD", "--student", "qwen2.5-0.5b", "--device-memory", "80GB"], ["intermediate_size"]),
    (["--teacher", "qwen9", "--student", "qwen2.5-0.5b", "--device-memory", "80GB"], ["qwen9", "known name"]),
    (["--teacher", "qwen2.5-3b", "--student", "qwen2.5-0.5b", "--devices", "0", "--device-memory", "80GB"],
     ["--devices 0", "cpu"]),
    (["--teacher", "qwen2.5-3b", "--student", "qwen2.5-0.5b", "--device-memory", "80"], ["--device-memory", "80GB"]),
    (["--teacher", "qwen2.5-3b", "--student", "qwen2.5-0.5b"], ["--device-memory is required"]),
    (["--teacher", "qwen2.5-3b", "--device-memory", "80GB"], ["--student"]),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, words, tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "vocab_size": 100}))
    args = [str(bad) if a == "BAD" else a for a in args]
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdforge: error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_plan_is_no_step_of_a_run_file(tmp_path):
    from kdforge.config import ConfigError
    from kdforge.stages import all_stages, pipeline_stages, plan_file

    assert "plan" in [s.name for s in all_stages()]
    assert "plan" not in [s.name for s in pipeline_stages()]
    f = tmp_path / "run.yaml"
    f.write_text("plan:\n  teacher: qwen2.5-7b\n")
    with pytest.raises(ConfigError, match="unknown section"):
        plan_file(str(f))


def test_every_plan_field_is_documented():
    from kdforge.stages.plan import PlanConfig

    doc = (Path(__file__).parent.parent / "docs" / "configs.md").read_text(encoding="utf-8")
    section = doc.split("## `plan`", 1)[1].split("\n## ", 1)[0]
    for field in PlanConfig.model_fields:
        assert f"`{field}`" in section, f"docs/configs.md does not document plan.{field}"
