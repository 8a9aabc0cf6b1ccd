"""Eval metrics on hand-made predictions whose scores are worked out by hand in each test."""

import math

import pytest

from modistill.eval.metrics import (
    binary_metrics,
    caption_hallucination,
    normalise_answer,
    parse_yes_no,
    pope_metrics,
    vqa_correct,
    vqa_metrics,
)
from modistill.scenes.world import SceneObject, make_scene


# ------------------------------------------------------------------------------------------ POPE
@pytest.mark.parametrize(
    "text, strict, official",
    [
        ("Yes", "yes", "yes"),
        ("yes.", "yes", "yes"),
        ("No", "no", "no"),
        ("no, there is none.", "no", "no"),
        ("There is not a red circle.", "no", "no"),
        ("Yes, there is a red circle. No other objects.", "yes", "yes"),  # only the first sentence counts
        ("Yes, no doubt", "no", "no"),  # official rule: any no-word in the first sentence wins
        ("There is a red circle.", None, "yes"),  # official: everything else is yes
        ("a . . .", None, "yes"),  # a collapsed model: unparseable, never a free "yes"
        ("", None, "yes"),
        ("NO", None, "yes"),  # POPE compares exact spellings No / no / not
        ("nothing", None, "yes"),  # "no" must be a whole word
    ],
)
def test_parse_yes_no_follows_the_official_pope_rule(text, strict, official):
    assert parse_yes_no(text) == strict
    assert parse_yes_no(text, "official") == official


def test_binary_metrics_by_hand():
    # 6 positives, 4 negatives. Predictions: positives -> yes, yes, yes, yes, no, None;
    # negatives -> no, no, yes, None.
    labels = ["yes"] * 6 + ["no"] * 4
    pred = ["yes", "yes", "yes", "yes", "no", None, "no", "no", "yes", None]
    # TP=4, FN=2 (a no and an unparseable), TN=2, FP=2 (a yes and an unparseable: wrong either way)
    m = binary_metrics(pred, labels)
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * (4 / 6) * (4 / 6) / (8 / 6))
    assert m["yes_ratio"] == pytest.approx(5 / 10)
    assert m["unparseable"] == pytest.approx(2 / 10)


def test_binary_metrics_edge_cases():
    m = binary_metrics(["no", "no"], ["yes", "no"])  # never says yes: precision undefined, F1 0
    assert math.isnan(m["precision"]) and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5
    m = binary_metrics([], [])
    assert m["n"] == 0 and math.isnan(m["accuracy"])


def test_pope_metrics_per_split_and_overall():
    rows = [  # (prediction, label, split)
        ("Yes.", "yes", "random"),
        ("No.", "no", "random"),
        ("yes", "no", "random"),
        ("no", "yes", "random"),
        ("Yes", "yes", "popular"),
        ("Yes", "no", "popular"),
        ("Yes", "yes", "popular"),
        ("a . .", "no", "popular"),
        ("No", "no", "adversarial"),
        ("No", "no", "adversarial"),
        ("Yes", "yes", "adversarial"),
        ("Yes", "yes", "adversarial"),
    ]
    preds, labels, splits = zip(*rows)
    m = pope_metrics(list(preds), list(labels), list(splits))
    r, p, a = m["splits"]["random"], m["splits"]["popular"], m["splits"]["adversarial"]
    # random: TP1 TN1 FP1 FN1
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == pytest.approx(
        (0.5, 0.5, 0.5, 0.5, 0.5)
    )
    # popular: TP2, FP2 (one yes on a negative + one unparseable negative), TN0, FN0
    assert (p["accuracy"], p["precision"], p["recall"], p["yes_ratio"], p["unparseable"]) == pytest.approx(
        (0.5, 0.5, 1.0, 0.75, 0.25)
    )
    assert p["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    # adversarial: all right
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]) == pytest.approx((1, 1, 1, 1, 0.5))
    # overall: TP 5, TN 3, FP 3, FN 1 over 12
    o = m["overall"]
    assert o["accuracy"] == pytest.approx(8 / 12)
    assert o["precision"] == pytest.approx(5 / 8) and o["recall"] == pytest.approx(5 / 6)
    assert o["yes_ratio"] == pytest.approx(7 / 12)
    # under the official rule "a . ." is a yes: FP stays 3, yes-ratio rises to 8/12
    assert m["official"]["yes_ratio"] == pytest.approx(8 / 12) and m["official"]["unparseable"] == 0.0
    assert m["rule"] == "strict"


def test_pope_without_split_is_all_and_bad_labels_are_refused():
    m = pope_metrics(["yes", "no"], ["Yes", "no"])
    assert list(m["splits"]) == ["all"] and m["overall"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="yes or no"):
        pope_metrics(["yes"], ["maybe"])


# -------------------------------------------------------------------------------------- captions
# Scene A: small red circle top-left, large blue square centre. Scene B: one small green triangle bottom-right.
SCENE_A = make_scene(
    [SceneObject("red", "circle", "small", 0, 0), SceneObject("blue", "square", "large", 1, 1)], 3, (120, 120, 120)
)
SCENE_B = make_scene([SceneObject("green", "triangle", "small", 2, 2)], 3, (90, 90, 90))


def test_caption_hallucination_by_hand():
    captions = [
        "a red circle and a blue square",  # A: 2 mentions, 0 bad, coverage 1
        "a red circle and a yellow triangle",  # A: 2 mentions, 1 bad, coverage 1/2
        "a green triangle at the bottom right",  # B: 1 mention, 0 bad, coverage 1
        "a blue circle",  # B: 1 mention, 1 bad, coverage 0
        "a . . .",  # B: unparseable -> counts as a hallucinated response, coverage 0
    ]
    scenes = [SCENE_A, SCENE_A, SCENE_B, SCENE_B, SCENE_B]
    m = caption_hallucination(captions, scenes)
    assert m["n"] == 5
    assert m["response_hallucination"] == pytest.approx(3 / 5)  # 2 hallucinating + 1 unparseable
    assert m["response_hallucination_parseable"] == pytest.approx(2 / 4)
    assert m["mention_hallucination"] == pytest.approx(2 / 6)  # CHAIR_i over the 6 mentions
    assert m["coverage"] == pytest.approx((1 + 0.5 + 1 + 0 + 0) / 5)
    assert m["unparseable"] == pytest.approx(1 / 5)


def test_all_garbage_captions_score_as_total_failure():
    m = caption_hallucination(["", "zzz"], [SCENE_A, SCENE_B])
    assert m["response_hallucination"] == 1.0 and m["unparseable"] == 1.0 and m["coverage"] == 0.0
    assert math.isnan(m["mention_hallucination"])  # no mention at all: undefined, not 0


# ------------------------------------------------------------------------------------------- VQA
def test_vqa_per_type_accuracy_with_the_scenes_matcher():
    preds = ["Blue.", "red", "Two", "3 objects", "yes, there is", "No", "top left", "the middle center", ""]
    gold = ["blue", "blue", "two", "two", "yes", "yes", "top left", "middle center", "yes"]
    types = ["colour", "colour", "count", "count", "exists", "exists", "position", "position", "compare"]
    m = vqa_metrics(preds, gold, types)
    assert m["matcher"] == "scenes"
    assert m["n"] == 9 and m["accuracy"] == pytest.approx(5 / 9)
    assert {t: v["accuracy"] for t, v in m["per_type"].items()} == pytest.approx(
        {"colour": 0.5, "count": 0.5, "exists": 0.5, "position": 1.0, "compare": 0.0}
    )
    assert {t: v["n"] for t, v in m["per_type"].items()} == {
        "colour": 2,
        "count": 2,
        "exists": 2,
        "position": 2,
        "compare": 1,
    }


@pytest.mark.parametrize(
    "text, norm",
    [("The Two.", "2"), ("a red-circle!", "red circle"), ("1.5 m", "1.5 m"), ("It's  YES", "its yes"), ("", "")],
)
def test_generic_normaliser(text, norm):
    assert normalise_answer(text) == norm


def test_vqa_generic_matcher_for_other_files():
    preds = ["Two", "a dog.", "cats", ""]
    gold = ["2", "dog", "cat", ""]
    types = ["number", "other", "other", "other"]  # not scenes types -> generic matcher
    assert vqa_correct(preds, gold, types) == [True, True, False, False]  # empty never matches
    m = vqa_metrics(preds, gold, types)
    assert m["matcher"] == "generic" and m["accuracy"] == 0.5
    assert m["per_type"]["number"]["accuracy"] == 1.0 and m["per_type"]["other"]["accuracy"] == pytest.approx(1 / 3)
