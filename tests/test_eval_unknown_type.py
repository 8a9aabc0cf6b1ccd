"""One row of an unknown question type cannot switch the scoring of a whole scenes eval file (issue 15, item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modistill.eval.metrics import vqa_correct, vqa_metrics
from modistill.eval.run import EvalSet, _score_vqa

# "yes, there is" is right for the scenes matcher (first yes/no word) and wrong for exact match.
PREDS = ["yes, there is", "no, none", "Two", "blue"]
GOLD = ["yes", "no", "two", "blue"]
TYPES = ["exists", "exists", "count", "colour"]


def test_scenes_rows_keep_the_scenes_matcher_when_one_row_is_mistyped():
    clean = vqa_metrics(PREDS, GOLD, TYPES)
    assert clean["accuracy"] == 1.0 and clean["generic_rows"] == 0
    mistyped = TYPES[:2] + ["Count"] + TYPES[3:]  # a capital letter; "Two" == "two" generically too
    m = vqa_metrics(PREDS, GOLD, mistyped)
    assert m["matcher"] == "scenes" and m["accuracy"] == 1.0 and m["generic_rows"] == 1
    mystery = TYPES[:1] + ["mystery"] + TYPES[2:]  # that row alone is exact-matched: "no, none" != "no"
    assert vqa_correct(PREDS, GOLD, mystery) == [True, False, True, True]


def test_a_file_without_scenes_types_is_scored_generically():
    m = vqa_metrics(PREDS, GOLD, ["other"] * 4)
    assert m["matcher"] == "generic" and m["generic_rows"] == 4 and m["accuracy"] == 0.5


def test_eval_warns_naming_the_row_and_counts_it(capsys):
    rows = [
        {"image": "x.png", "text": "q", "answer": a, "type": t}
        for a, t in zip(GOLD, ["exists", "mystery", "count", "colour"])
    ]
    where = [f"vqa.jsonl:{i + 1}" for i in range(4)]
    metrics, per_item = _score_vqa(EvalSet("vqa", "vqa", Path("vqa.jsonl"), rows, where, Path(".")), PREDS)
    out = capsys.readouterr().out
    assert "warning: vqa.jsonl:2: question type 'mystery' is not a scenes type" in out
    assert "1 of 4 rows scored by generic exact match" in out
    assert metrics["generic_rows"] == 1 and metrics["accuracy"] == pytest.approx(0.75)
    assert [i["correct"] for i in per_item] == [True, False, True, True]
