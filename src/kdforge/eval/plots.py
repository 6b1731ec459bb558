"""PNG plots for the eval report (matplotlib, Agg backend: no display needed).

- ``training_<name>.png``: a distill run's ``train_log.jsonl``: every loss term against the step
  (left), validation KL / CE and top-1 agreement against the step (right).
- ``quality_vs_size.png``: top-1 agreement with the teacher and task score against parameters and
  against bytes on disk, one labelled point per model (a trimmed model's label says "[kept ids]", one with
  another tokenizer "[spans]"; with either, bits per byte too, the one figure on the same scale for all).
- ``quality_vs_speed.png``: the same qualities against decode tokens/s at batch 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOSS_TERMS = ("loss", "ce", "soft", "hidden", "attention")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``train_log.jsonl`` (a torn last line from a killed run is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_training(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Loss terms (left) and validation measures (right) against the optimizer step."""
    plt = _plt()
    fig, (ax_l, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    train = [r for r in rows if "loss" in r]
    for term in LOSS_TERMS:
        pts = [(r["step"], r[term]) for r in train if r.get(term) is not None]
        if pts and any(v != 0 for _, v in pts):  # terms switched off stay at 0: leave them out
            ax_l.plot(*zip(*pts), marker=".", label=term)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("per target token")
    ax_l.set_title("training loss terms")
    ax_l.grid(alpha=0.3)
    if ax_l.lines:
        ax_l.legend()
    val = [r for r in rows if "val_kl" in r]
    if val:
        steps = [r["step"] for r in val]
        ax_v.plot(steps, [r["val_kl"] for r in val], marker="o", color="tab:red", label="val KL")
        if all("val_ce" in r for r in val):
            ax_v.plot(steps, [r["val_ce"] for r in val], marker="s", color="tab:orange", label="val CE")
        ax_v.set_ylabel("nats per token")
        handles = list(ax_v.lines)
        if all("val_top1" in r for r in val):
            tw = ax_v.twinx()
            tw.plot(steps, [r["val_top1"] for r in val], marker="^", color="tab:green", label="val top-1 (right)")
            tw.set_ylabel("top-1 agreement")
            handles += list(tw.lines)
        ax_v.legend(handles=handles, loc="best", fontsize=8)
    else:
        ax_v.text(0.5, 0.5, "no validation rows\n(distill eval_every not set)", ha="center", va="center",
                  transform=ax_v.transAxes)
    ax_v.set_xlabel("step")
    ax_v.set_title("validation")
    ax_v.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scatter(ax, xs: list[float], ys: list[float | None], names: list[str], xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    colors = [f"C{i % 10}" for i in range(len(names))]  # model i has the same colour in every panel
    for i, (x, y, n) in enumerate(zip(xs, ys, names)):
        if x is None or y is None:
            continue
        ax.scatter([x], [y], s=45, color=colors[i], zorder=3)
        # Alternate label offsets: models with equal size or speed would otherwise print on top of each other.
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, 6 - 12 * (i % 3)), fontsize=8, color=colors[i])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.grid(alpha=0.3)
    ax.margins(0.25)


def _qualities(models: list[dict[str, Any]]) -> list[tuple[str, list[float | None]]]:
    out = [("top-1 agreement with the teacher", [m["top1"] for m in models])]
    if any(m.get("tokenizer", "same") != "same" for m in models):
        # Top-1 of another tokenizer is per aligned span: bits per byte is the figure on one scale for all.
        out.append(("bits per byte of the teacher's answers", [m.get("bits_per_byte") for m in models]))
    if all(m.get("tasks") for m in models):
        out.append(("task score (share of items correct)", [m["tasks"]["overall"] for m in models]))
    return out


def _names(models: list[dict[str, Any]]) -> list[str]:
    """Point labels: a model whose agreement is not measured token for token says over what."""
    tag = {"trimmed": " [kept ids]", "other": " [spans]"}
    return [m["name"] + tag.get(m.get("tokenizer", "same"), "") for m in models]


def plot_quality_vs_size(models: list[dict[str, Any]], path: Path) -> Path:
    """Rows: qualities; columns: parameters (M) and bytes on disk (MB)."""
    plt = _plt()
    quals = _qualities(models)
    names = _names(models)
    fig, axes = plt.subplots(len(quals), 2, figsize=(10, 3.6 * len(quals)), squeeze=False)
    for row, (label, ys) in enumerate(quals):
        _scatter(axes[row][0], [m["params_m"] for m in models], ys, names, "parameters (M)", label)
        _scatter(axes[row][1], [m["size"]["disk_mb"] for m in models], ys, names, "weights on disk (MB)", label)
    fig.suptitle("quality against size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_quality_vs_speed(models: list[dict[str, Any]], path: Path) -> Path:
    """Qualities against decode tokens/s at batch 1 (threads as stated in the report)."""
    plt = _plt()
    quals = _qualities(models)
    names = _names(models)
    fig, axes = plt.subplots(1, len(quals), figsize=(5.5 * len(quals), 3.8), squeeze=False)
    for col, (label, ys) in enumerate(quals):
        _scatter(axes[0][col], [m["decode_tokens_per_s"] for m in models], ys, names,
                 "decode tokens/s (batch 1)", label)
    fig.suptitle("quality against speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
