"""`modistill ablate`: the paper's claims at demo scale, as mean ± std over seeds.

One world and one teacher (the demo's) serve every seed; a seed changes the student's
initialisation, data order, router init and sampled preference pairs. Per seed:

    stage0 ─┬─ sft (CE, N steps)                                  claim 1: KD vs SFT
            ├─ kd (dense KD, N steps) ─┬─ kd-moe (upcycle top-2, M steps) ─┬─ kto   claims 4, 5
            │                          │                                    └─ dpo
            │                          ├─ kd-dense (dense KD+CE, M steps)   claim 3 (equal steps)
            │                          └─ kd-moe-top1 (M steps)             claim 3 (equal activated params)
            └─ moe-only (upcycle top-2, N+M steps, trained as stage 1a)    claim 2
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from modistill.demo.pipeline import Demo  # noqa: E402
from modistill.demo.plan import FULL, QUICK  # noqa: E402
from modistill.demo.report import summary_row  # noqa: E402
from modistill.io import write_json_atomic, write_text_atomic  # noqa: E402
from modistill.stages.mimic_dense import TRAINABLE as STAGE1A  # noqa: E402

CLAIMS = [
    ("KD beats SFT (dense student, equal steps)", "kd", "sft"),
    ("dense→dense then dense→sparse beats dense→sparse alone (equal total steps)", "kd-moe", "moe-only"),
    ("sparse (top-2) beats dense (equal steps)", "kd-moe", "kd-dense"),
    ("sparse (top-1) beats dense (equal activated parameters)", "kd-moe-top1", "kd-dense"),
    ("preference distillation (paired KTO) lowers hallucination", "kto", "kd-moe"),
    ("paired KTO beats DPO", "kto", "dpo"),
]
METRICS = [
    ("vqa_accuracy", "VQA acc", 1),
    ("pope_f1", "POPE F1", 1),
    ("caption_hallucination_sampled", "halluc. T=1", -1),
    ("caption_hallucination_greedy", "halluc. greedy", -1),
    ("caption_coverage", "coverage", 1),
]


def _variants(demo: Demo, teacher: Path, root: Path) -> dict[str, Path]:
    p = demo.plan
    v = {"stage0": demo.align_student(root / "stage0", teacher, demo.seed + 1)}
    v["sft"] = demo.mimic(root / "sft", v["stage0"], None, p.stage1a, kd=0.0, ce=1.0)
    v["kd"] = demo.mimic(root / "kd", v["stage0"], teacher, p.stage1a, kd=1.0, ce=0.0)
    v["kd-moe"] = demo.mimic(root / "kd-moe", v["kd"], teacher, p.stage1b, kd=1.0, ce=1.0, upcycle_top_k=p.top_k)
    # Trained from stage 0 like `kd`, so with what stage 1a trains (the whole LLM and the projector) at
    # its learning rate. Stage 1b's defaults freeze attention and embeddings, which costs nothing on the
    # paper's pretrained LLM but leaves the demo's stage-0 LLM with random attention; and stage 1b's
    # rate (1e-4) is for fine-tuning a converged student. Either would handicap this arm rather than
    # test the schedule.
    both = replace(p.stage1a, steps=p.stage1a.steps + p.stage1b.steps)
    v["moe-only"] = demo.mimic(
        root / "moe-only", v["stage0"], teacher, both, kd=1.0, ce=1.0, upcycle_top_k=p.top_k, trainable=list(STAGE1A)
    )
    v["kd-dense"] = demo.mimic(root / "kd-dense", v["kd"], teacher, p.stage1b, kd=1.0, ce=1.0)
    v["kd-moe-top1"] = demo.mimic(root / "kd-moe-top1", v["kd"], teacher, p.stage1b, kd=1.0, ce=1.0, upcycle_top_k=1)
    prefs = demo.onpolicy_pairs(root / "prefs.json", v["kd-moe"])
    v["kto"] = demo.preference(root / "kto", v["kd-moe"], teacher, prefs, "kto_pair")
    v["dpo"] = demo.preference(root / "dpo", v["kd-moe"], teacher, prefs, "sigmoid")
    return v


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(per_seed: dict[int, dict[str, dict]]) -> list[dict]:
    """Per claim and metric: each arm's mean ± std, the paired difference, and whether it holds."""
    rows = []
    for claim, a, b in CLAIMS:
        for key, label, sign in METRICS:
            pairs = [
                (runs[a].get(key), runs[b].get(key))
                for runs in per_seed.values()
                if a in runs and b in runs and runs[a].get(key) is not None and runs[b].get(key) is not None
            ]
            if not pairs:
                continue
            diffs = [x - y for x, y in pairs]
            ma, sa = _mean_std([x for x, _ in pairs])
            mb, sb = _mean_std([y for _, y in pairs])
            md, sd = _mean_std(diffs)
            rows.append(
                {
                    "claim": claim,
                    "a": a,
                    "b": b,
                    "metric": label,
                    "key": key,
                    "better": "higher" if sign > 0 else "lower",
                    "a_mean": ma,
                    "a_std": sa,
                    "b_mean": mb,
                    "b_std": sb,
                    "diff_mean": md,
                    "diff_std": sd,
                    "seeds": len(pairs),
                    "holds": sign * md > 0 and abs(md) > sd,
                }
            )
    return rows


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Ablations: the paper's claims at demo scale",
        "",
        f"Command: `{meta['command']}` — {meta['seeds']} seeds, {meta['minutes']:.1f} minutes on {meta['machine']}.",
        "One world and one teacher for all seeds; a seed changes the student's init, data order, router init and "
        "sampled preference pairs. Mean ± std over seeds; Δ = A − B paired by seed. A claim *holds* on a metric "
        "when Δ points the better way by more than its std.",
        "",
        # The page is rewritten whole on every run: commentary belongs elsewhere (the README, docs/onpolicy.md).
        "*Written by the command above; a rerun replaces this whole page.*",
        "",
    ]
    for claim, a, b in CLAIMS:
        sub = [r for r in rows if r["claim"] == claim]
        if not sub:
            continue
        lines += [
            f"## {claim}",
            "",
            f"A = `{a}`, B = `{b}`",
            "",
            "| metric | A | B | Δ (A−B) | holds |",
            "|---|---|---|---|---|",
        ]
        for r in sub:
            lines.append(
                f"| {r['metric']} ({r['better']} is better) | {r['a_mean']:.3f} ± {r['a_std']:.3f} | "
                f"{r['b_mean']:.3f} ± {r['b_std']:.3f} | {r['diff_mean']:+.3f} ± {r['diff_std']:.3f} | "
                f"{'yes' if r['holds'] else 'no'} |"
            )
        lines.append("")
    lines += ["![ablation deltas](ablations.png)", ""]
    return "\n".join(lines)


def _plot(rows: list[dict], out: Path) -> None:
    claims = [c for c, _, _ in CLAIMS if any(r["claim"] == c for r in rows)]
    keys = [m for m in METRICS if any(r["key"] == m[0] for r in rows)]
    fig, axes = plt.subplots(
        1, len(keys), figsize=(3.3 * len(keys), 0.5 * len(claims) + 1.8), squeeze=False, sharey=True
    )
    for ax, (key, label, sign) in zip(axes[0], keys):
        vals = [next((r for r in rows if r["claim"] == c and r["key"] == key), None) for c in claims]
        ys = range(len(claims))
        ax.barh(
            list(ys),
            [v["diff_mean"] * sign if v else 0 for v in vals],
            xerr=[v["diff_std"] if v else 0 for v in vals],
            color="tab:blue",
            alpha=0.7,
        )
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{label}: improvement of A over B", fontsize=8)
        ax.set_yticks(
            list(ys),
            [
                f"{CLAIMS[[c for c, _, _ in CLAIMS].index(c)][1]} vs {CLAIMS[[c for c, _, _ in CLAIMS].index(c)][2]}"
                for c in claims
            ],
            fontsize=7,
        )
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_ablation(
    out: str | Path = "runs/ablate",
    seeds: int = 3,
    quick: bool = False,
    docs: str | Path | None = "docs",
    progress: bool = True,
    only: str = "paper",
) -> list[dict]:
    """`only`: "paper" (the paper's claims, below) or "onpolicy" (beyond the paper: demo/ablate_onpolicy.py)."""
    start = time.perf_counter()
    out = Path(out)
    plan = QUICK if quick else FULL
    if only == "onpolicy":
        from modistill.demo.ablate_onpolicy import run_onpolicy_ablation

        command = f"modistill ablate --only onpolicy --seeds {seeds}" + (" --quick" if quick else "")
        return run_onpolicy_ablation(out, plan, seeds, docs, progress, command)
    base = Demo(out, plan, seed=0, progress=progress)
    base.make_world()
    teacher = base.teacher()
    per_seed: dict[int, dict[str, dict]] = {}
    for seed in range(seeds):
        demo = Demo(out, plan, seed=seed, progress=progress)
        variants = _variants(demo, teacher, out / f"seed{seed}")
        per_seed[seed] = {}
        for name, path in variants.items():
            if name == "stage0":
                continue
            results = demo.evaluate(f"seed{seed}/{name}", path)
            per_seed[seed][name] = summary_row(name, results, json.loads((path / "metrics.json").read_text()))
    rows = summarise(per_seed)
    import platform

    meta = {
        "command": f"modistill ablate --seeds {seeds}" + (" --quick" if quick else ""),
        "seeds": seeds,
        "minutes": (time.perf_counter() - start) / 60,
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    for target in [out] + ([Path(docs)] if docs else []):
        target.mkdir(parents=True, exist_ok=True)
        write_json_atomic(target / "ablations.json", {"meta": meta, "claims": rows, "per_seed": per_seed})
        write_text_atomic(target / "ablations.md", _markdown(rows, meta))
        _plot(rows, target / "ablations.png")
    print(_markdown(rows, meta))
    return rows
