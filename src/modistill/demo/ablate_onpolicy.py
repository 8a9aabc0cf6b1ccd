"""`modistill ablate --only onpolicy`: on-policy mimic distillation and the student as drafter, at demo scale.

Beyond the paper. Per seed, from one stage-0 student, at equal optimizer steps and samples:

    stage0 ─ kd[-onpolλ] (1a, λ) ─ kd-moe[-onpolλ] (1b, λ)      λ ∈ {0, 0.5, 1}; λ = 0 is the paper's chain
           └ kd-tvd (1a with divergence: tvd)                    drafter: TVD vs forward KL (seed 0 only)

Every 1b arm is evaluated (VQA, POPE, caption hallucination); then, for seed 0, the teacher decodes
greedily with each student as speculative drafter (acceptance, tokens per teacher forward, speed-up).
The λ = 0 arms have the paper ablation's directory names and configs, so an existing run is reused.
Results are written after every seed (a cut-short run keeps what finished).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from modistill.demo.pipeline import Demo
from modistill.demo.report import summary_row
from modistill.eval.speculative import speculate_files
from modistill.io import write_json_atomic

LAMBDAS = (0.0, 0.5, 1.0)
MAX_NEW = 48  # the evaluation's caption length: samples as long as the answers the student is judged on
METRICS = [
    ("vqa_accuracy", "VQA acc", 1),
    ("pope_f1", "POPE F1", 1),
    ("caption_hallucination_greedy", "halluc. greedy", -1),
    ("caption_hallucination_sampled", "halluc. T=1", -1),
    ("caption_coverage", "coverage", 1),
]


def _suffix(lam: float) -> str:
    return "" if lam == 0 else f"-onpol{lam:g}"


def variants(demo: Demo, teacher: Path, root: Path, drafter: bool) -> dict[str, Path]:
    p = demo.plan
    stage0 = demo.align_student(root / "stage0", teacher, demo.seed + 1)
    v: dict[str, Path] = {}
    for lam in LAMBDAS:
        loss = {} if lam == 0 else {"onpolicy_fraction": lam, "onpolicy_max_new_tokens": MAX_NEW}
        v[f"kd{_suffix(lam)}"] = demo.mimic(
            root / f"kd{_suffix(lam)}", stage0, teacher, p.stage1a, kd=1.0, ce=0.0, loss=loss
        )
        v[f"kd-moe{_suffix(lam)}"] = demo.mimic(
            root / f"kd-moe{_suffix(lam)}",
            v[f"kd{_suffix(lam)}"],
            teacher,
            p.stage1b,
            kd=1.0,
            ce=1.0,
            upcycle_top_k=p.top_k,
            loss=loss,
        )
    if drafter:
        v["kd-tvd"] = demo.mimic(
            root / "kd-tvd", stage0, teacher, p.stage1a, kd=1.0, ce=0.0, loss={"divergence": "tvd"}
        )
    return v


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(per_seed: dict[int, dict[str, dict]]) -> list[dict[str, Any]]:
    """Per λ and metric: mean ± std over seeds, and the paired difference with λ = 0."""
    rows = []
    for lam in LAMBDAS:
        arm = f"kd-moe{_suffix(lam)}"
        for key, label, sign in METRICS:
            pairs = [
                (r[arm][key], r["kd-moe"][key])
                for r in per_seed.values()
                if arm in r and "kd-moe" in r and r[arm].get(key) is not None
            ]
            if not pairs:
                continue
            m, s = _mean_std([a for a, _ in pairs])
            dm, ds = _mean_std([a - b for a, b in pairs])
            rows.append(
                {
                    "lambda": lam,
                    "arm": arm,
                    "metric": label,
                    "key": key,
                    "mean": m,
                    "std": s,
                    "diff_mean": dm,
                    "diff_std": ds,
                    "seeds": len(pairs),
                    "better": lam > 0 and sign * dm > 0 and abs(dm) > ds,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]], spec: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Command: `{meta['command']}` — seeds {meta['seeds_done']}, {meta['minutes']:.1f} min on "
        f"{meta['machine']}. Mean ± std over seeds; Δ = arm − (λ = 0) paired by seed.",
        "",
        "| λ | metric | mean ± std | Δ vs λ=0 | better beyond noise |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lambda']:g} | {r['metric']} | {r['mean']:.3f} ± {r['std']:.3f} | "
            f"{r['diff_mean']:+.3f} ± {r['diff_std']:.3f} | {'yes' if r['better'] else 'no'} |"
        )
    if spec:
        lines += [
            "",
            "| drafter (seed 0) | acceptance | tokens / teacher forward | speed-up | identical |",
            "|---|---|---|---|---|",
        ]
        for s in spec:
            lines.append(
                f"| {s['draft']} | {s['acceptance_rate']:.3f} | {s['tokens_per_teacher_forward']:.2f} | "
                f"{s['speedup']:.2f}x | {s['identical']}/{s['prompts']} |"
            )
    return "\n".join(lines) + "\n"


def speculation(demo: Demo, teacher: Path, drafts: dict[str, Path], limit: int) -> list[dict[str, Any]]:
    captions = demo.world / "eval" / "captions.jsonl"
    out = []
    for name, path in drafts.items():
        r = speculate_files(str(teacher), str(path), [str(captions)], limit=limit, max_new_tokens=MAX_NEW, num_draft=4)
        r.pop("per_prompt")
        out.append({"draft": name, **r})
        print(f"drafter {name}: acceptance {r['acceptance_rate']:.3f}, speed-up {r['speedup']:.2f}x")
    return out


def run_onpolicy_ablation(
    out: str | Path, plan: Any, seeds: int, docs: str | Path | None, progress: bool, command: str, spec_limit: int = 40
) -> list[dict[str, Any]]:
    import os
    import platform

    start = time.perf_counter()
    out = Path(out)
    base = Demo(out, plan, seed=0, progress=progress)
    base.make_world()
    teacher = base.teacher()
    per_seed: dict[int, dict[str, dict]] = {}
    spec: list[dict[str, Any]] = []
    for seed in range(seeds):
        demo = Demo(out, plan, seed=seed, progress=progress)
        v = variants(demo, teacher, out / f"seed{seed}", drafter=seed == 0)
        per_seed[seed] = {}
        for name, path in v.items():
            if not name.startswith("kd-moe"):
                continue
            results = demo.evaluate(f"seed{seed}/{name}", path)
            row = summary_row(name, results, json.loads((path / "metrics.json").read_text()))
            per_seed[seed][name] = {
                **row,
                "train_runtime_s": json.loads((path / "metrics.json").read_text()).get("train_runtime_s"),
            }
        if seed == 0:
            names = ("kd", "kd-tvd", "kd-moe", "kd-onpol1", "kd-moe-onpol1")
            drafts: dict[str, Path] = {k: v[k] for k in names if k in v}
            spec = speculation(demo, teacher, drafts, spec_limit)
        rows = summarise(per_seed)
        meta = {
            "command": command,
            "seeds_done": len(per_seed),
            "minutes": (time.perf_counter() - start) / 60,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        }
        for target in [out] + ([Path(docs)] if docs else []):
            target.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                target / "ablations_onpolicy.json",
                {"meta": meta, "rows": rows, "per_seed": per_seed, "speculative": spec},
            )
            (target / "ablations_onpolicy.md").write_text(markdown(rows, spec, meta))
        print(markdown(rows, spec, meta))
    return summarise(per_seed)
