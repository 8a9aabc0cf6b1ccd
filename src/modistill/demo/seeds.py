"""`modistill demo --seeds N`: the demo over N training seeds, as mean ± std, checked against its targets.

Each seed is a whole demo (teacher included) in DIR/seed{k}/, on the same world. The summary
(DIR/summary.md, summary.json) puts the teacher's and the students' figures side by side with their
noise and says, target by target, whether it held. A comparison "beyond 2 standard errors" uses
the larger of two standard errors of the difference of means: the one from the seeds' spread and
the one from the evaluation's sample size (binomial, over the test images that every seed shares),
so neither a lucky seed trio nor a small test set can pass it alone.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from modistill.io import write_json_atomic, write_text_atomic

STUDENT = "student/stage2"
SHOWN = [
    ("vqa_accuracy", "VQA"),
    ("pope_f1", "POPE F1"),
    ("pope_yes_ratio", "POPE yes-ratio"),
    ("caption_hallucination_greedy", "halluc. greedy"),
    ("caption_hallucination_sampled", "halluc. T=1"),
    ("caption_coverage", "coverage"),
    ("params_activated_m", "activated params (M)"),
]
# Which sample size goes with which rate (absent: not a proportion, no binomial noise estimate).
SAMPLE_SIZE = {
    "vqa_accuracy": "vqa_n",
    "caption_hallucination_greedy": "caption_greedy_n",
    "caption_hallucination_sampled": "caption_sampled_n",
}


def _values(per_seed: list[dict[str, dict]], model: str, key: str) -> list[float]:
    return [rows[model][key] for rows in per_seed if rows.get(model, {}).get(key) is not None]


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _binomial_se(per_seed: list[dict[str, dict]], model: str, key: str) -> float:
    """Standard error of the seed-mean of a rate from the evaluation's sample size (binomial).

    Every seed is scored on the same test images, so the noise of drawing those images is shared by
    the seeds and does not shrink with their number: the seed-mean rate p over n images has the
    standard error sqrt(p (1 - p) / n), not that divided by sqrt(seeds). (A model that is the same
    in every seed, like the shipped teacher's greedy captions, makes this plain.)
    """
    n_key = SAMPLE_SIZE.get(key)
    if n_key is None:
        return 0.0
    rows = [r[model] for r in per_seed if r.get(model, {}).get(key) is not None and r[model].get(n_key)]
    if not rows:
        return 0.0
    p = statistics.fmean(r[key] for r in rows)
    n = statistics.fmean(r[n_key] for r in rows)
    return math.sqrt(p * (1 - p) / n)


def difference(per_seed: list[dict[str, dict]], a: str, b: str, key: str) -> dict[str, float]:
    """Mean of (a − b) over seeds and its standard error (the larger of seed spread and binomial)."""
    diffs = [rows[a][key] - rows[b][key] for rows in per_seed if rows.get(a, {}).get(key) is not None]
    mean, std = mean_std(diffs)
    seed_se = std / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    binomial = math.hypot(_binomial_se(per_seed, a, key), _binomial_se(per_seed, b, key))
    return {"diff": mean, "se": max(seed_se, binomial), "seeds": len(diffs)}


def check_targets(per_seed: list[dict[str, dict]], student: str = STUDENT) -> list[dict[str, Any]]:
    """Each of the demo's targets, with the measured figure and whether it held."""

    def m(model: str, key: str) -> float:
        return mean_std(_values(per_seed, model, key))[0]

    checks: list[dict[str, Any]] = []

    def add(target: str, measured: str, holds: bool) -> None:
        checks.append({"target": target, "measured": measured, "holds": bool(holds)})

    t = "teacher"
    add("teacher POPE F1 ≥ 0.90", f"{m(t, 'pope_f1'):.3f}", m(t, "pope_f1") >= 0.90)
    add("teacher VQA ≥ 0.85", f"{m(t, 'vqa_accuracy'):.3f}", m(t, "vqa_accuracy") >= 0.85)
    greedy_t = m(t, "caption_hallucination_greedy")
    add("teacher greedy hallucination ≤ 0.20", f"{greedy_t:.3f}", greedy_t <= 0.20)
    ratio = m(student, "params_activated_m") / m(t, "params_activated_m")
    add("student activated parameters ≤ 65 % of the teacher's", f"{100 * ratio:.0f} %", ratio <= 0.65)
    for key, label in (("caption_hallucination_greedy", "greedy"), ("caption_hallucination_sampled", "T=1")):
        d = difference(per_seed, student, t, key)
        add(
            f"student hallucination ({label}) below the teacher's by > 2 s.e.",
            f"Δ {d['diff']:+.3f} (s.e. {d['se']:.3f})",
            d["diff"] < -2 * d["se"],
        )
    for key, label in (("pope_f1", "POPE F1"), ("vqa_accuracy", "VQA"), ("caption_coverage", "coverage")):
        d = difference(per_seed, student, t, key)
        add(f"student {label} ≥ teacher − 0.05", f"Δ {d['diff']:+.3f}", d["diff"] >= -0.05)
    yes = m(student, "pope_yes_ratio")
    add("student POPE yes-ratio within 0.40–0.60", f"{yes:.3f}", 0.40 <= yes <= 0.60)
    before = "student/stage1b"
    for key, label in (("caption_hallucination_greedy", "greedy"), ("caption_hallucination_sampled", "T=1")):
        d = difference(per_seed, student, before, key)
        add(f"stage 2 lowers hallucination ({label})", f"Δ {d['diff']:+.3f} (s.e. {d['se']:.3f})", d["diff"] < 0)
    for key, label in (("pope_f1", "POPE F1"), ("caption_coverage", "coverage")):
        d = difference(per_seed, student, before, key)
        add(f"stage 2 keeps {label} (≥ stage 1b − 0.05)", f"Δ {d['diff']:+.3f}", d["diff"] >= -0.05)
    return checks


def summary_markdown(per_seed: list[dict[str, dict]], checks: list[dict], meta: dict[str, Any]) -> str:
    models = list(per_seed[0])
    lines = [
        "# modistill demo over seeds",
        "",
        f"Command: `{meta['command']}`; {len(per_seed)} seeds on world {meta['world_seed']}, "
        f"held-out test scenes; mean ± std over seeds. {meta['machine']}; "
        f"wall time per seed {meta['seconds_per_seed']}.",
        "",
        "| model | " + " | ".join(label for _, label in SHOWN) + " |",
        "|---" * (len(SHOWN) + 1) + "|",
    ]
    for model in models:
        cells = []
        for key, _ in SHOWN:
            mean, std = mean_std(_values(per_seed, model, key))
            cells.append("–" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", "", "| target | measured | holds |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['measured']} | {'yes' if c['holds'] else '**no**'} |" for c in checks]
    missed = [c["target"] for c in checks if not c["holds"]]
    lines += ["", "Missed: " + "; ".join(missed) + "." if missed else "Every target held.", ""]
    return "\n".join(lines)


def write_summary(out: Path, per_seed: list[dict[str, dict]], meta: dict[str, Any]) -> dict[str, Any]:
    checks = check_targets(per_seed)
    write_json_atomic(out / "summary.json", {"meta": meta, "per_seed": per_seed, "targets": checks})
    text = summary_markdown(per_seed, checks, meta)
    write_text_atomic(out / "summary.md", text)
    print("\n" + text)
    return {"targets": checks, "markdown": out / "summary.md"}


def run_seeds(
    out: str | Path,
    seeds: int,
    world_seed: int = 0,
    quick: bool = False,
    fresh: bool = False,
    progress: bool = True,
    train_teacher: bool = False,
) -> dict[str, Any]:
    """Run the demo for seeds 0..seeds-1 in out/seed{k} (each resumable), then write the summary."""
    import os
    import platform

    from modistill.demo.pipeline import run_demo
    from modistill.errors import UserError
    from modistill.io import is_ours, mark

    out = Path(out)
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1 (got {seeds})")
    if not is_ours(out, kind="demo-seeds"):
        raise UserError(f"{out}: exists and is not a multi-seed demo directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    mark(out, "demo-seeds")
    per_seed, seconds = [], []
    for k in range(seeds):
        result = run_demo(
            out / f"seed{k}",
            seed=k,
            world_seed=world_seed,
            quick=quick,
            fresh=fresh,
            progress=progress,
            train_teacher=train_teacher,
        )
        per_seed.append({row["model"]: row for row in result["rows"]})
        seconds.append(result["timings"]["total"])
    command = f"modistill demo --seeds {seeds}" + (f" --world-seed {world_seed}" if world_seed else "")
    meta = {
        "command": command + (" --quick" if quick else "") + (" --train-teacher" if train_teacher else ""),
        "world_seed": world_seed,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "seconds_per_seed": " / ".join(f"{s:.0f} s" for s in seconds),
    }
    return write_summary(out, per_seed, meta)
