"""The demo's report pieces: table rows from eval results, findings, plots, ablation statistics."""

from __future__ import annotations

import json
import math

import pytest

from modistill.demo.ablate import _variants, summarise
from modistill.demo.plan import FULL
from modistill.demo.report import beyond_noise, findings, summary_row, write_report
from modistill.stages.mimic_dense import MimicDenseConfig


def _results(vqa, f1, greedy, sampled, coverage=0.8, n=None):
    return {
        "metrics": {
            "vqa": {"accuracy": vqa, "n": n, "per_type": {"exists": {"accuracy": vqa}}},
            "pope": {
                "overall": {"accuracy": f1, "f1": f1, "yes_ratio": 0.5},
                "splits": {"adversarial": {"f1": f1 - 0.1}},
            },
            "captions": {
                "greedy": {
                    "response_hallucination": greedy,
                    "mention_hallucination": greedy / 2,
                    "coverage": coverage,
                    "unparseable": 0.0,
                    "n": n,
                },
                "sampled": {
                    "response_hallucination": sampled,
                    "mention_hallucination": sampled / 2,
                    "n": n and 3 * n,
                    "samples_per_image": 3,
                },
            },
        }
    }


def _stage(total, active, seconds=10.0):
    return {"parameters": {"total": total, "activated": active}, "train_runtime_s": seconds, "steps": 5}


def test_rows_and_findings_say_what_helped_and_what_did_not():
    rows = [
        summary_row("teacher", _results(0.9, 0.85, 0.10, 0.30), _stage(5e6, 5e6)),
        summary_row("student/stage1a", _results(0.80, 0.80, 0.12, 0.32), _stage(1.5e6, 1.5e6)),
        summary_row("student/stage1b", _results(0.80, 0.80, 0.12, 0.32), _stage(2.5e6, 1.9e6)),
        summary_row("student/stage2", _results(0.81, 0.80, 0.05, 0.15), _stage(2.5e6, 1.9e6)),
    ]
    assert rows[0]["pope_f1_adversarial"] == pytest.approx(0.75)
    assert rows[2]["params_activated_m"] == pytest.approx(1.9)
    text = findings(rows)
    assert any("sampled (T=1): 0.150, below the teacher's 0.300" in f for f in text)
    assert any("student/stage1a → student/stage1b" in f and "no change beyond noise" in f for f in text)
    assert any("student/stage1b → student/stage2" in f and "halluc. T=1 -0.170" in f and "(helped: " in f for f in text)
    worse = findings([rows[0], summary_row("student/x", _results(0.5, 0.5, 0.4, 0.6), _stage(1, 1))])
    assert any("NOT below the teacher's 0.300" in f for f in worse)


def test_noise_verdicts_use_two_standard_errors():
    # 200 images, 3 samples each: the sampled rate counts 200 images, not 600 samples.
    before = summary_row("student/stage1b", _results(0.50, 0.8, 0.50, 0.50, n=200))
    assert before["caption_sampled_n"] == 200
    se = math.sqrt(2 * 0.5 * 0.5 / 200)  # 0.05: two s.e. of a difference at p = 0.5 is 0.1
    small = summary_row("student/stage2", _results(0.50, 0.8, 0.50, 0.50 - 1.9 * se, n=200))
    large = summary_row("student/stage2", _results(0.50, 0.8, 0.50, 0.50 - 2.2 * se, n=200))
    assert beyond_noise(before, small, "caption_hallucination_sampled") is False
    assert beyond_noise(before, large, "caption_hallucination_sampled") is True
    assert beyond_noise(before, large, "pope_f1") is None  # not a proportion: no noise estimate
    teacher = summary_row("teacher", _results(0.9, 0.9, 0.5, 0.5, n=200))
    pope_drop = dict(large, pope_f1=large["pope_f1"] - 0.2)  # F1 has no noise estimate: marked †
    assert "POPE F1 -0.200†" in findings([teacher, before, pope_drop])[-2]
    assert "POPE F1" not in findings([teacher, before, dict(large, pope_f1=large["pope_f1"] - 0.03)])[-2].split("(")[1]
    text = findings([teacher, before, small])
    assert any("below the teacher's 0.500 (within noise" in f for f in text)
    assert any("student/stage1b → student/stage2" in f and "no change beyond noise" in f for f in text)
    assert "hurt: VQA" in findings([teacher, before, summary_row("student/x", _results(0.3, 0.8, 0.5, 0.5, n=200))])[-2]


def test_write_report_makes_every_file(tmp_path):
    stage = tmp_path / "stage1b"
    stage.mkdir()
    logs = [
        {
            "step": s,
            "loss": 2.0 / s,
            "kd": 1.0 / s,
            "ce": 1.0,
            "balance": 2.01,
            **{f"load/L0/E{e}": [0.4, 0.3, 0.2, 0.1][e] for e in range(4)},
        }
        for s in (1, 2, 3)
    ]
    (stage / "log_history.json").write_text(json.dumps(logs))
    rows = [
        summary_row("teacher", _results(0.9, 0.85, 0.1, 0.3)),
        summary_row("student/stage1b", _results(0.8, 0.8, 0.1, 0.2)),
    ]
    paths = write_report(
        tmp_path, {"title": "t", "rows": rows, "stages": {"stage1b": stage}, "timings": {"total": 1.0}}
    )
    for name in ("losses.png", "expert_load.png", "metrics.png", "hallucination_vs_accuracy.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
    md = paths["markdown"].read_text()
    assert "| student/stage1b |" in md and "figures/expert_load.png" in md
    assert "<table>" in paths["html"].read_text()
    assert json.loads(paths["results"].read_text())["findings"]


def test_ablation_summary_means_stds_and_verdicts():
    def row(vqa, halluc):
        return {"vqa_accuracy": vqa, "caption_hallucination_sampled": halluc}

    per_seed = {
        s: {
            "kd": row(0.8 + d, 0.3),
            "sft": row(0.7 + d, (0.32, 0.28, 0.31)[s]),
            "kto": row(0.8, 0.1 + d),
            "kd-moe": row(0.8, 0.3),
            "dpo": row(0.8, 0.2),
        }
        for s, d in enumerate((0.0, 0.02, 0.04))
    }
    rows = {(r["a"], r["b"], r["key"]): r for r in summarise(per_seed)}
    kd = rows[("kd", "sft", "vqa_accuracy")]
    assert kd["a_mean"] == pytest.approx(0.82) and kd["diff_mean"] == pytest.approx(0.1) and kd["diff_std"] == 0
    assert kd["holds"] and kd["seeds"] == 3
    pref = rows[("kto", "kd-moe", "caption_hallucination_sampled")]
    assert pref["diff_mean"] == pytest.approx(-0.18) and pref["holds"]  # lower is better
    assert pref["diff_std"] == pytest.approx(0.02)
    # Δ = -0.003 ± 0.02: better on average, but not by more than its spread over seeds.
    assert not rows[("kd", "sft", "caption_hallucination_sampled")]["holds"]
    assert not any(r["b"] == "moe-only" for r in rows.values())  # arms missing in every seed: no row


class _RecordingDemo:
    """Stands in for `Demo`: records which stage plan each ablation arm is trained with."""

    plan = FULL
    seed = 0

    def __init__(self):
        self.calls = {}

    def align_student(self, out, teacher, seed):
        return out

    def mimic(self, out, base, teacher, stage, **kw):
        self.calls[out.name] = (base.name, stage, kw)
        return out

    def onpolicy_pairs(self, out, base):
        return out

    def preference(self, out, base, teacher, prefs, kind):
        return out


def test_ablation_arms_train_with_the_plans_they_claim(tmp_path):
    demo = _RecordingDemo()
    _variants(demo, tmp_path / "teacher", tmp_path)  # type: ignore[arg-type]
    p = FULL
    assert demo.calls["kd"][1] == p.stage1a and demo.calls["sft"][1] == p.stage1a
    assert demo.calls["kd-moe"][:2] == ("kd", p.stage1b)
    # dense→sparse alone starts from stage 0 like `kd`, so it trains what stage 1a trains, at its rate,
    # for N + M steps (stage 1b's defaults would freeze the stage-0 LLM's attention)
    base, stage, kw = demo.calls["moe-only"]
    assert base == "stage0" and kw["upcycle_top_k"] == p.top_k
    assert stage.learning_rate == p.stage1a.learning_rate != p.stage1b.learning_rate
    assert stage.steps == p.stage1a.steps + p.stage1b.steps
    stage1a_default = MimicDenseConfig.__dataclass_fields__["trainable"].default_factory()
    assert kw["trainable"] == stage1a_default == ["projector", "llm"]
    assert "trainable" not in demo.calls["kd-moe"][2]  # stage 1b proper keeps its own defaults


def test_router_metrics_plot_spans_stage_1b_and_2(tmp_path):
    stages = {}
    for name, start in (("stage1b", 0.0), ("stage2", 0.3)):
        d = tmp_path / name
        d.mkdir()
        logs = [
            {
                "step": s,
                "loss": 1.0,
                **{
                    f"router/L{layer}/{m}": start + 0.01 * s
                    for layer in (0, 2)
                    for m in ("entropy", "dead_experts", "topk_changed")
                },
            }
            for s in (1, 2, 3)
        ]
        (d / "log_history.json").write_text(json.dumps(logs))
        stages[name] = d
    rows = [summary_row("teacher", _results(0.9, 0.85, 0.1, 0.3))]
    paths = write_report(tmp_path / "r", {"title": "t", "rows": rows, "stages": stages, "timings": {}})
    assert (tmp_path / "r" / "figures" / "router_metrics.png").stat().st_size > 1000
    assert "figures/router_metrics.png" in paths["markdown"].read_text()


def test_onpolicy_ablation_summary_pairs_each_lambda_with_lambda_zero():
    from modistill.demo.ablate_onpolicy import summarise as summarise_onpolicy

    per_seed = {
        s: {
            "kd-moe": {"vqa_accuracy": 0.5 + d},
            "kd-moe-onpol0.5": {"vqa_accuracy": 0.55 + d},
            "kd-moe-onpol1": {"vqa_accuracy": 0.5 + d + (0.01, -0.01, 0.0)[s]},
        }
        for s, d in enumerate((0.0, 0.1, 0.2))
    }
    rows = {r["lambda"]: r for r in summarise_onpolicy(per_seed)}
    assert rows[0.5]["mean"] == pytest.approx(0.65) and rows[0.5]["std"] == pytest.approx(0.1)
    assert rows[0.5]["diff_mean"] == pytest.approx(0.05) and rows[0.5]["better"]
    assert rows[1.0]["diff_mean"] == pytest.approx(0.0) and not rows[1.0]["better"]
    assert rows[0.0]["diff_mean"] == 0 and not rows[0.0]["better"]


def test_report_checks_the_targets_on_its_seed(tmp_path):
    rows = [
        summary_row("teacher", _results(0.9, 0.92, 0.10, 0.30, n=200), {"parameters": {"activated": 2e6}}),
        summary_row("student/stage1b", _results(0.88, 0.9, 0.12, 0.35, n=200), {"parameters": {"activated": 1e6}}),
        summary_row("student/stage2", _results(0.88, 0.9, 0.12, 0.15, n=200), {"parameters": {"activated": 1e6}}),
    ]
    paths = write_report(tmp_path, {"title": "t", "rows": rows, "stages": {}, "timings": {}})
    targets = {t["target"]: t["holds"] for t in json.loads(paths["results"].read_text())["targets"]}
    # T=1: 0.15 vs 0.30 over 200 images is beyond 2 s.e.; greedy 0.12 vs 0.10 is not below at all.
    assert targets["student hallucination (T=1) below the teacher's by > 2 s.e."]
    assert not targets["student hallucination (greedy) below the teacher's by > 2 s.e."]
    md = paths["markdown"].read_text()
    assert "student hallucination (greedy) below the teacher's by > 2 s.e. | Δ +0.020" in md and "**no**" in md
