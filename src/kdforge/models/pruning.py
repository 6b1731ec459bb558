"""Better students: importance measured on calibration data, then depth and width cut to match.

Depth (ShortGPT-style block influence): BI(layer) = 1 − mean over tokens of cos(input, output);
a layer that barely changes its input matters little. Keep the ``num_layers`` highest.

Width (Minitron-style activation importance), per layer:
- FFN neuron j: mean |a_j| of the down-projection's input a = act(gate(x)) * up(x);
- attention head h: mean L2 norm of its output before o_proj; a KV group scores the sum of its
  query heads, groups are kept whole (the GQA layout stays valid) and, if fewer query heads per
  group are asked for, the best heads inside each kept group;
- hidden channel c: mean |x_c| over the outputs of every RMSNorm (the inputs of every block).
The kept indices are sorted, so keeping everything reproduces the teacher exactly. Works for
Llama and Qwen2 layouts (Qwen2's q/k/v biases are sliced with their rows).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass
class Importance:
    block_influence: list[float]                 # per teacher layer
    ffn: list[Tensor]                            # per layer: (intermediate,)
    heads: list[Tensor]                          # per layer: (num_attention_heads,)
    hidden: Tensor                               # (hidden,)
    tokens: int = 0

    def summary(self) -> dict:
        return {"block_influence": [round(x, 6) for x in self.block_influence],
                "head_importance": [[round(float(v), 6) for v in h] for h in self.heads],
                "calibration_tokens": self.tokens}


@torch.inference_mode()
def measure_importance(model, batches: list[Tensor]) -> Importance:
    """Run ``model`` over calibration sequences (each (1, T), no padding) and score its parts."""
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = model.get_decoder().layers
    bi = torch.zeros(n_layers, dtype=torch.float64)
    ffn = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    heads = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    handles = []
    inputs: dict[int, Tensor] = {}

    def layer_pre(i):
        def hook(_m, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def layer_post(i):
        def hook(_m, _args, _kwargs, out):
            y = out[0] if isinstance(out, tuple) else out
            bi[i] += (1 - torch.nn.functional.cosine_similarity(inputs[i].float(), y.float(), dim=-1)).sum().double()
        return hook

    def down_pre(i):
        def hook(_m, args):
            ffn[i] += args[0].float().abs().sum(dim=(0, 1)).double()
        return hook

    def o_pre(i):
        def hook(_m, args):
            x = args[0].float()  # (B, T, heads * head_dim)
            heads[i] += x.reshape(*x.shape[:2], n_heads, head_dim).norm(dim=-1).sum(dim=(0, 1)).double()
        return hook

    def norm_out(_m, _args, out):
        hidden.add_(out.float().abs().sum(dim=(0, 1)).double())

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(layer_post(i), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_pre(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_pre(i)))
        handles.append(layer.input_layernorm.register_forward_hook(norm_out))
        handles.append(layer.post_attention_layernorm.register_forward_hook(norm_out))
    handles.append(model.get_decoder().norm.register_forward_hook(norm_out))
    tokens = 0
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model.get_decoder()(input_ids=ids.to(device))
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    n = max(tokens, 1)
    return Importance([float(x / n) for x in bi], [f / n for f in ffn], [h / n for h in heads],
                      hidden / (n * (2 * n_layers + 1)), tokens)


@dataclass
class WidthPlan:
    """Which teacher indices survive: layers, hidden channels, and per kept layer FFN neurons and heads."""

    layers: list[int]
    hidden: list[int]
    ffn: list[list[int]]
    q_heads: list[list[int]]
    kv_heads: list[list[int]]
    extra: dict = field(default_factory=dict)


def top_sorted(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, in ascending index order (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def plan_width(cfg, imp: Importance | None, layers: list[int], hidden_size: int, intermediate_size: int,
               num_heads: int, num_kv_heads: int) -> WidthPlan:
    """Choose kept indices by importance, or the first ones when ``imp`` is None (plain slicing)."""
    t_heads, t_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    rep_t = t_heads // t_kv
    if num_kv_heads > t_kv or num_heads > t_heads or num_heads % num_kv_heads:
        raise ValueError(f"cannot take {num_heads} heads / {num_kv_heads} KV heads from a teacher with "
                         f"{t_heads} / {t_kv}; heads must be a multiple of KV heads and no more than the teacher's")
    rep_s = num_heads // num_kv_heads
    if rep_s > rep_t:
        raise ValueError(f"{rep_s} query heads per KV head asked, the teacher has only {rep_t}")
    if hidden_size > cfg.hidden_size or intermediate_size > cfg.intermediate_size:
        raise ValueError("a pruned student cannot be wider than its teacher")
    first = imp is None
    hidden = list(range(hidden_size)) if first else top_sorted(imp.hidden, hidden_size)
    ffn, q_heads, kv_heads = [], [], []
    for t in layers:
        ffn.append(list(range(intermediate_size)) if first else top_sorted(imp.ffn[t], intermediate_size))
        h = torch.arange(t_heads, dtype=torch.float64) if first else imp.heads[t]
        if first:
            h = -h  # "importance" that prefers the first heads
        group = h.reshape(t_kv, rep_t).sum(-1)
        kept_groups = top_sorted(group, num_kv_heads)
        kv_heads.append(kept_groups)
        q = []
        for g in kept_groups:
            inside = top_sorted(h[g * rep_t:(g + 1) * rep_t], rep_s)
            q.extend(g * rep_t + j for j in inside)
        q_heads.append(q)
    return WidthPlan(layers, hidden, ffn, q_heads, kv_heads)


def _rows(w: Tensor, idx: list[int]) -> Tensor:
    return w[idx].clone()


def _head_rows(idx: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in idx for d in range(head_dim)]


def build_width_student(teacher, plan: WidthPlan):
    """A new model of the teacher's architecture holding the planned slice of its weights."""
    from transformers import AutoModelForCausalLM

    tc = teacher.config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    cfg = copy.deepcopy(tc)
    cfg.num_hidden_layers = len(plan.layers)
    cfg.hidden_size = len(plan.hidden)
    cfg.intermediate_size = len(plan.ffn[0])
    cfg.num_attention_heads = len(plan.q_heads[0])
    cfg.num_key_value_heads = len(plan.kv_heads[0])
    cfg.head_dim = head_dim  # keep the teacher's head size even when hidden/heads no longer gives it
    values = getattr(cfg, "layer_types", None)
    if isinstance(values, list) and len(values) == tc.num_hidden_layers:
        cfg.layer_types = [values[i] for i in plan.layers]
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)
    hid = plan.hidden
    sd = teacher.state_dict()
    new: dict[str, Tensor] = {}
    new["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:, hid].clone()
    new["model.norm.weight"] = sd["model.norm.weight"][hid].clone()
    if not cfg.tie_word_embeddings:
        new["lm_head.weight"] = sd["lm_head.weight"][:, hid].clone()
    for j, t in enumerate(plan.layers):
        src, dst = f"model.layers.{t}.", f"model.layers.{j}."
        q_rows = _head_rows(plan.q_heads[j], head_dim)
        kv_rows = _head_rows(plan.kv_heads[j], head_dim)
        new[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"][hid].clone()
        new[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"][hid].clone()
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            new[dst + f"self_attn.{name}.weight"] = sd[src + f"self_attn.{name}.weight"][rows][:, hid].clone()
            if src + f"self_attn.{name}.bias" in sd:
                new[dst + f"self_attn.{name}.bias"] = _rows(sd[src + f"self_attn.{name}.bias"], rows)
        new[dst + "self_attn.o_proj.weight"] = sd[src + "self_attn.o_proj.weight"][hid][:, q_rows].clone()
        if src + "self_attn.o_proj.bias" in sd:
            new[dst + "self_attn.o_proj.bias"] = _rows(sd[src + "self_attn.o_proj.bias"], hid)
        for name in ("gate_proj", "up_proj"):
            new[dst + f"mlp.{name}.weight"] = sd[src + f"mlp.{name}.weight"][plan.ffn[j]][:, hid].clone()
        new[dst + "mlp.down_proj.weight"] = sd[src + "mlp.down_proj.weight"][hid][:, plan.ffn[j]].clone()
    missing, unexpected = student.load_state_dict(new, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"unsupported layout for width pruning: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if cfg.tie_word_embeddings:
        student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()
