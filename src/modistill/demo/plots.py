"""The demo report's figures (PNG, matplotlib's Agg backend: no screen needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

LOSS_KEYS = ("loss", "kd", "ce", "balance", "pref_loss", "chosen_ce")
_LOAD = re.compile(r"^load/L(\d+)/E(\d+)$")


def read_logs(stage_dir: Path) -> list[dict]:
    path = Path(stage_dir) / "log_history.json"
    return [h for h in json.loads(path.read_text()) if "loss" in h] if path.is_file() else []


def loss_curves(stages: dict[str, Path], out: Path) -> Path:
    """One panel per stage: each logged loss term against the optimizer step."""
    names = [n for n, d in stages.items() if read_logs(d)]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.4 * max(len(names), 1), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        logs = read_logs(stages[name])
        steps = [h["step"] for h in logs]
        for key in LOSS_KEYS:
            values = [h.get(key) for h in logs]
            if any(v not in (None, 0) for v in values):
                ax.plot(steps, [np.nan if v is None else v for v in values], label=key, lw=1.4)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("training losses per stage", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def expert_load(stages: dict[str, Path], out: Path) -> Path | None:
    """Per MoE layer, the share of tokens whose top-1 expert is each expert, over training steps."""
    series: dict[int, list[tuple[str, int, list[float]]]] = {}
    for name, stage_dir in stages.items():
        for h in read_logs(stage_dir):
            shares: dict[int, dict[int, float]] = {}
            for key, value in h.items():
                match = _LOAD.match(key)
                if match:
                    shares.setdefault(int(match.group(1)), {})[int(match.group(2))] = value
            for layer, row in shares.items():
                series.setdefault(layer, []).append((name, h["step"], [row[e] for e in sorted(row)]))
    if not series:
        return None
    layers = sorted(series)
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 2.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        rows = series[layer]
        grid = np.array([r[2] for r in rows]).T  # experts x logged points
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.5, float(grid.max())))
        ax.set_yticks(range(grid.shape[0]), [f"E{e}" for e in range(grid.shape[0])])
        boundaries = [i for i in range(1, len(rows)) if rows[i][0] != rows[i - 1][0]]
        for b in boundaries:
            ax.axvline(b - 0.5, color="white", lw=1)
        ticks = sorted({0, len(rows) - 1, *boundaries})
        ax.set_xticks(ticks, [f"{rows[i][0]}\nstep {rows[i][1]}" for i in ticks], fontsize=7)
        ax.set_title(f"MoE layer {layer}: top-1 share per expert", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def metric_bars(rows: list[dict], out: Path) -> Path:
    """Accuracy (higher is better) and hallucination (lower is better) per model."""
    metrics = [
        ("vqa_accuracy", "VQA accuracy"),
        ("pope_f1", "POPE F1"),
        ("caption_hallucination_greedy", "caption halluc. (greedy)"),
        ("caption_hallucination_sampled", "caption halluc. (T=1)"),
        ("caption_coverage", "caption coverage"),
    ]
    names = [r["model"] for r in rows]
    x = np.arange(len(metrics))
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(metrics) + 0.4 * len(rows)), 3.6))
    for i, row in enumerate(rows):
        values = [float(row[m]) if row.get(m) is not None else np.nan for m, _ in metrics]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=names[i])
    ax.set_xticks(x, [label for _, label in metrics], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    # Below the axes: inside, it would cover the tallest bars.
    ax.legend(fontsize=7, ncol=min(len(rows), 5), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title("held-out scenes: accuracy (higher is better) and hallucination (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def hallucination_vs_accuracy(rows: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    markers = "osD^vP*X"
    for i, row in enumerate(rows):
        x, y = row.get("vqa_accuracy"), row.get("caption_hallucination_sampled")
        if x is None or y is None:
            continue
        # A legend rather than text labels: nearby models would print over each other.
        ax.scatter(x, y, s=45, marker=markers[i % len(markers)], label=row["model"])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_xlabel("VQA accuracy (higher is better)")
    ax.set_ylabel("caption hallucination, sampled T=1 (lower is better)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title("hallucination vs accuracy", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


_ROUTER = re.compile(r"^router/L(\d+)/(entropy|dead_experts|topk_changed)$")
ROUTER_PANELS = (
    ("entropy", "router entropy (nats)"),
    ("dead_experts", "dead experts (top-1 share < 1 %)"),
    ("topk_changed", "tokens whose top-k changed since upcycling"),
)


def router_metrics(stages: dict[str, Path], out: Path) -> Path | None:
    """One panel per router metric, a line per MoE layer, over the MoE stages' steps laid end to end."""
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    boundaries: list[tuple[int, str]] = []
    offset = 0
    for name, stage_dir in stages.items():
        logs = [h for h in read_logs(stage_dir) if any(_ROUTER.match(k) for k in h)]
        if not logs:
            continue
        boundaries.append((offset, name))
        for h in logs:
            for key, value in h.items():
                match = _ROUTER.match(key)
                if match:
                    series.setdefault((match.group(2), int(match.group(1))), []).append((offset + h["step"], value))
        offset += max(h["step"] for h in logs)
    if not series:
        return None
    fig, axes = plt.subplots(1, len(ROUTER_PANELS), figsize=(4.2 * len(ROUTER_PANELS), 3.0), squeeze=False)
    for ax, (metric, title) in zip(axes[0], ROUTER_PANELS):
        for (m, layer), points in sorted(series.items()):
            if m == metric:
                ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.4, label=f"layer {layer}")
        for x, name in boundaries:
            ax.axvline(x, color="grey", lw=0.8, ls="--")
            ax.text(x, 1.0, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step (stages end to end)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
