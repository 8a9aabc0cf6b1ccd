"""The demo's results.json, report.md and report.html, from the eval results of each model.

Findings are computed from the measured numbers and say plainly when a stage did not help:
the evaluation is never tuned to make a stage look better.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from modistill.demo import plots
from modistill.demo.seeds import SAMPLE_SIZE, STUDENT, check_targets
from modistill.io import write_json_atomic, write_text_atomic

COLUMNS = [
    ("model", "model", "{}"),
    ("params_total_m", "params (M) total", "{:.2f}"),
    ("params_activated_m", "activated", "{:.2f}"),
    ("vqa_accuracy", "VQA acc ↑", "{:.3f}"),
    ("pope_f1", "POPE F1 ↑", "{:.3f}"),
    ("pope_f1_adversarial", "POPE F1 adv ↑", "{:.3f}"),
    ("caption_hallucination_greedy", "halluc. greedy ↓", "{:.3f}"),
    ("caption_hallucination_sampled", "halluc. T=1 ↓", "{:.3f}"),
    ("caption_mention_hallucination_sampled", "mention halluc. T=1 ↓", "{:.3f}"),
    ("caption_coverage", "coverage ↑", "{:.3f}"),
    ("train_seconds", "train s", "{:.0f}"),
]


def summary_row(name: str, results: dict[str, Any], stage_metrics: dict | None = None) -> dict[str, Any]:
    """The numbers one table row shows, from `evaluate()` output (+ the stage's metrics.json)."""
    m = results["metrics"]
    captions = m.get("captions", {})
    greedy, sampled = captions.get("greedy", {}), captions.get("sampled", {})
    pope = m.get("pope", {})
    row = {
        "model": name,
        "vqa_accuracy": m.get("vqa", {}).get("accuracy"),
        "vqa_per_type": {k: v["accuracy"] for k, v in m.get("vqa", {}).get("per_type", {}).items()},
        "pope_accuracy": pope.get("overall", {}).get("accuracy"),
        "pope_f1": pope.get("overall", {}).get("f1"),
        "pope_f1_adversarial": pope.get("splits", {}).get("adversarial", {}).get("f1"),
        "pope_yes_ratio": pope.get("overall", {}).get("yes_ratio"),
        "caption_hallucination_greedy": greedy.get("response_hallucination"),
        "caption_mention_hallucination_greedy": greedy.get("mention_hallucination"),
        "caption_hallucination_sampled": sampled.get("response_hallucination"),
        "caption_mention_hallucination_sampled": sampled.get("mention_hallucination"),
        "caption_coverage": greedy.get("coverage"),
        "caption_unparseable": greedy.get("unparseable"),
        # Sample sizes, for the noise level of each rate. Sampled captions of one image are not
        # independent, so their rate counts images, not samples (the conservative choice).
        "vqa_n": m.get("vqa", {}).get("n"),
        "caption_greedy_n": greedy.get("n"),
        "caption_sampled_n": _images(sampled),
    }
    if stage_metrics:
        params = stage_metrics.get("parameters", {})
        row["params_total_m"] = params.get("total", 0) / 1e6
        row["params_activated_m"] = params.get("activated", 0) / 1e6
        row["train_seconds"] = stage_metrics.get("train_runtime_s")
        row["steps"] = stage_metrics.get("steps")
    if "efficiency" in results:
        row["decode_tokens_per_s"] = results["efficiency"].get("decode_tokens_per_s")
    return row


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def _images(sampled: dict) -> int | None:
    if sampled.get("n") is None:
        return None
    return max(1, round(sampled["n"] / sampled.get("samples_per_image", 1)))


def _delta(before: dict, after: dict, key: str) -> float | None:
    if before.get(key) is None or after.get(key) is None:
        return None
    return after[key] - before[key]


# A change in a metric with no noise estimate (F1, coverage) counts only above this.
NO_ESTIMATE_THRESHOLD = 0.05


def beyond_noise(before: dict, after: dict, key: str) -> bool | None:
    """Whether the change in a rate exceeds two standard errors of a difference of proportions.

    None when the sample sizes are unknown (the change is then reported without a verdict on noise).
    """
    n_key = SAMPLE_SIZE.get(key)
    d = _delta(before, after, key)
    if d is None or n_key is None or not before.get(n_key) or not after.get(n_key):
        return None
    p1, p2 = before[key], after[key]
    se = math.sqrt(p1 * (1 - p1) / before[n_key] + p2 * (1 - p2) / after[n_key])
    return abs(d) > 2 * se


def findings(rows: list[dict], teacher: str = "teacher") -> list[str]:
    """Plain-language statements, each computed from the table: what helped, what did not."""
    by_name = {r["model"]: r for r in rows}
    out = []
    t = by_name.get(teacher)
    students = [r for r in rows if r["model"].startswith("student")]
    if t and students:
        final = students[-1]
        for key, what in (
            ("caption_hallucination_sampled", "sampled (T=1)"),
            ("caption_hallucination_greedy", "greedy"),
        ):
            if final.get(key) is not None and t.get(key) is not None:
                verdict = "below" if final[key] < t[key] else "NOT below"
                noise = {True: "", False: " (within noise: less than 2 s.e.)", None: ""}[beyond_noise(t, final, key)]
                out.append(
                    f"Final student ({final['model']}) caption hallucination, {what}: {final[key]:.3f}, "
                    f"{verdict} the teacher's {t[key]:.3f}{noise}."
                )
        if final.get("vqa_accuracy") is not None and t.get("vqa_accuracy") is not None:
            out.append(
                f"Final student VQA accuracy {final['vqa_accuracy']:.3f} vs teacher {t['vqa_accuracy']:.3f} "
                f"with {final.get('params_activated_m', 0):.2f}M vs {t.get('params_activated_m', 0):.2f}M "
                f"activated parameters."
            )
    for prev, cur in zip(students, students[1:]):
        parts: list[str] = []
        better: list[str] = []
        worse: list[str] = []
        for key, label, sign in (
            ("vqa_accuracy", "VQA", 1),
            ("pope_f1", "POPE F1", 1),
            ("caption_hallucination_sampled", "halluc. T=1", -1),
            ("caption_hallucination_greedy", "halluc. greedy", -1),
            ("caption_coverage", "coverage", 1),
        ):
            d = _delta(prev, cur, key)
            if d is None:
                continue
            real, mark = beyond_noise(prev, cur, key), "*"
            if real is None:  # no noise estimate (POPE F1, coverage): only a large change counts
                real, mark = abs(d) > NO_ESTIMATE_THRESHOLD, "†"
            parts.append(f"{label} {d:+.3f}{mark if real else ''}")
            if real:
                (better if sign * d > 0 else worse).append(label)
        if better:
            verdict = "helped: " + ", ".join(better) + (f"; worse: {', '.join(worse)}" if worse else "")
        elif worse:
            verdict = "hurt: " + ", ".join(worse)
        else:
            verdict = "no change beyond noise at this scale"
        out.append(f"{prev['model']} → {cur['model']}: {', '.join(parts)} ({verdict}).")
    if len(students) > 1:
        out.append(
            "* = beyond 2 standard errors (difference of proportions; sampled captions counted per image); "
            f"† = no noise estimate for this metric, |Δ| > {NO_ESTIMATE_THRESHOLD}."
        )
    return out


def write_report(out_dir: Path, results: dict[str, Any]) -> dict[str, Path]:
    """results: {"title", "rows": [summary rows], "stages": {name: dir}, "timings": {...}, "notes": [...]}."""
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    rows = results["rows"]
    made = {
        "losses": plots.loss_curves(results["stages"], figures / "losses.png"),
        "expert_load": plots.expert_load(results["stages"], figures / "expert_load.png"),
        "router": plots.router_metrics(results["stages"], figures / "router_metrics.png"),
        "bars": plots.metric_bars(rows, figures / "metrics.png"),
        "scatter": plots.hallucination_vs_accuracy(rows, figures / "hallucination_vs_accuracy.png"),
    }
    by_model = {r["model"]: r for r in rows}
    targets = check_targets([by_model]) if {"teacher", STUDENT, "student/stage1b"} <= set(by_model) else []
    results = {
        **results,
        "findings": findings(rows),
        "targets": targets,
        "stages": {k: str(v) for k, v in results["stages"].items()},
    }
    write_json_atomic(out_dir / "results.json", results)
    write_text_atomic(out_dir / "report.md", _markdown(results, made))
    write_text_atomic(out_dir / "report.html", _html(results, made))
    return {"results": out_dir / "results.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}


def table_markdown(rows: list[dict]) -> str:
    header = "| " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), spec) for k, _, spec in COLUMNS) + " |" for r in rows]
    return "\n".join([header, sep, *body])


def _markdown(results: dict, figures: dict[str, Path | None]) -> str:
    lines = [f"# {results['title']}", ""]
    lines += [f"- {note}" for note in results.get("notes", [])]
    lines += ["", "## Results on held-out scenes", "", table_markdown(results["rows"]), ""]
    lines += [
        "Hallucination = share of captions mentioning an object that is not in the image (oracle-scored, "
        "unparseable counted as hallucinated; Object-HalBench's *response* rate); *mention* = share of "
        "mentioned objects that are not there. ↑ higher is better, ↓ lower is better.",
        "",
    ]
    lines += ["## Findings", ""] + [f"- {f}" for f in results["findings"]] + [""]
    if results.get("targets"):
        lines += [
            "## The demo's targets, on this one seed",
            "",
            "One seed decides nothing: `modistill demo --seeds 3` checks these over seeds.",
            "",
            "| target | measured | holds |",
            "|---|---|---|",
        ]
        lines += [
            f"| {c['target']} | {c['measured']} | {'yes' if c['holds'] else '**no**'} |" for c in results["targets"]
        ]
        lines.append("")
    lines += ["## Figures", ""]
    for key, title in (
        ("bars", "Accuracy and hallucination per model"),
        ("scatter", "Hallucination vs accuracy"),
        ("losses", "Training losses"),
        ("expert_load", "Expert load per MoE layer"),
        ("router", "Router entropy, dead experts and routing drift since upcycling (stages 1b, 2)"),
    ):
        figure = figures.get(key)
        if figure is not None:
            lines += [f"### {title}", "", f"![{title}](figures/{figure.name})", ""]
    lines += ["## Timings (seconds)", ""] + [f"- {k}: {v:.1f}" for k, v in results.get("timings", {}).items()]
    return "\n".join(lines) + "\n"


def _html(results: dict, figures: dict[str, Path | None]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(label)}</th>" for _, label, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(_fmt(r.get(k), spec))}</td>" for k, _, spec in COLUMNS) + "</tr>"
        for r in results["rows"]
    )
    imgs = "".join(
        f'<figure><img src="figures/{esc(p.name)}" alt="{esc(k)}"></figure>'
        for k, p in figures.items()
        if p is not None
    )
    notes = "".join(f"<li>{esc(n)}</li>" for n in results.get("notes", []))
    finds = "".join(f"<li>{esc(f)}</li>" for f in results["findings"])
    timings = "".join(f"<li>{esc(k)}: {v:.1f} s</li>" for k, v in results.get("timings", {}).items())
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(results['title'])}</title>"
        f"<style>{style}</style></head><body><h1>{esc(results['title'])}</h1><ul>{notes}</ul>"
        f"<h2>Results on held-out scenes</h2><table><tr>{head}</tr>{body}</table>"
        f"<h2>Findings</h2><ul>{finds}</ul><h2>Figures</h2>{imgs}<h2>Timings</h2><ul>{timings}</ul>"
        "</body></html>\n"
    )
