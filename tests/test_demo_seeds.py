"""The multi-seed demo summary: mean ± std, standard errors of differences, and the target checks."""

from __future__ import annotations

import math
import statistics

from modistill.demo.seeds import check_targets, difference, summary_markdown


def _row(vqa, f1, yes, greedy, sampled, coverage, activated, n=200):
    return {
        "vqa_accuracy": vqa,
        "pope_f1": f1,
        "pope_yes_ratio": yes,
        "caption_hallucination_greedy": greedy,
        "caption_hallucination_sampled": sampled,
        "caption_coverage": coverage,
        "params_activated_m": activated,
        "vqa_n": 1000,
        "caption_greedy_n": n,
        "caption_sampled_n": n,
    }


def _seeds(student_greedy=(0.01, 0.02, 0.0)):
    return [
        {
            "teacher": _row(0.9, 0.95, 0.5, 0.10 + d, 0.30, 0.95, 2.0),
            "student/stage1b": _row(0.88, 0.93, 0.5, 0.08, 0.28, 0.95, 0.9),
            "student/stage2": _row(0.88, 0.93, 0.52, g, 0.10, 0.93, 0.9),
        }
        for d, g in zip((0.0, 0.02, -0.02), student_greedy)
    ]


def test_difference_uses_the_larger_of_seed_and_binomial_standard_errors():
    per_seed = _seeds()
    d = difference(per_seed, "student/stage2", "teacher", "caption_hallucination_greedy")
    diffs = [0.01 - 0.10, 0.02 - 0.12, 0.0 - 0.08]
    assert math.isclose(d["diff"], statistics.fmean(diffs))
    seed_se = statistics.stdev(diffs) / math.sqrt(3)
    # The seeds share the 200 test images: each model's binomial term is that of its mean rate over
    # 200 images, not over 600.
    binom = math.sqrt(0.01 * 0.99 / 200 + 0.10 * 0.90 / 200)
    assert binom > seed_se  # so this case checks the binomial term
    assert math.isclose(d["se"], binom)


def test_the_seed_spread_wins_when_it_is_the_larger():
    per_seed = _seeds(student_greedy=(0.0, 0.15, 0.0))
    d = difference(per_seed, "student/stage2", "teacher", "caption_hallucination_greedy")
    diffs = [0.0 - 0.10, 0.15 - 0.12, 0.0 - 0.08]
    seed_se = statistics.stdev(diffs) / math.sqrt(3)
    binom = math.sqrt(0.05 * 0.95 / 200 + 0.10 * 0.90 / 200)
    assert seed_se > binom
    assert math.isclose(d["se"], seed_se)


def test_a_larger_test_set_shrinks_the_binomial_term_but_more_seeds_do_not():
    def se(n, seeds):
        row = {"caption_hallucination_greedy": 0.05, "caption_greedy_n": n}
        per_seed = [{"teacher": row, "student/stage2": row}] * seeds
        return difference(per_seed, "student/stage2", "teacher", "caption_hallucination_greedy")["se"]

    assert math.isclose(se(200, 3), math.sqrt(2 * 0.05 * 0.95 / 200))
    assert math.isclose(se(200, 10), se(200, 3))
    assert math.isclose(se(600, 3), se(200, 3) / math.sqrt(3))


def test_targets_hold_and_fail_where_they_should():
    checks = {c["target"]: c["holds"] for c in check_targets(_seeds())}
    assert checks["teacher POPE F1 ≥ 0.90"] and checks["teacher VQA ≥ 0.85"]
    assert checks["student activated parameters ≤ 65 % of the teacher's"]  # 0.9 / 2.0
    assert checks["student hallucination (greedy) below the teacher's by > 2 s.e."]
    assert checks["student POPE yes-ratio within 0.40–0.60"]
    # A student no better than its teacher on greedy captions fails that target, and only that one changes.
    worse = {c["target"]: c["holds"] for c in check_targets(_seeds(student_greedy=(0.10, 0.12, 0.08)))}
    assert not worse["student hallucination (greedy) below the teacher's by > 2 s.e."]
    assert not worse["stage 2 lowers hallucination (greedy)"]
    assert worse["student hallucination (T=1) below the teacher's by > 2 s.e."]


def test_summary_names_every_missed_target():
    per_seed = _seeds(student_greedy=(0.10, 0.12, 0.08))
    checks = check_targets(per_seed)
    text = summary_markdown(
        per_seed, checks, {"command": "x", "world_seed": 0, "machine": "m", "seconds_per_seed": "1 s"}
    )
    for c in checks:
        if not c["holds"]:
            assert c["target"] in text.split("Missed:")[1]
    assert "| teacher | 0.900 ± 0.000" in text
