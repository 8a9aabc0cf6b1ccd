"""Pure metric functions: VQA exact match, POPE yes/no statistics, oracle-scored caption hallucination.

Every function takes predictions (strings) and gold data and returns plain dicts of floats, so the
numbers can be checked by hand in tests and written to JSON as they are. Unparseable output always
counts as a failure (a collapsed model's "a . . ." must not score as faithful).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from modistill.scenes.oracle import answer_matches, caption_metrics, score_caption
from modistill.scenes.text import QUESTION_TYPES
from modistill.scenes.world import Scene

# ------------------------------------------------------------------------------------------ VQA
_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
# A period between digits is a decimal point ("1.5"); every other punctuation mark separates words.
_PUNCT_RE = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")


def normalise_answer(text: str) -> str:
    """Generic answer normaliser: lowercase, punctuation and articles dropped, number words -> digits.

    "The Two." -> "2", "a red-circle!" -> "red circle", "1.5 m" -> "1.5 m"."""
    text = text.lower().replace("'", "")
    words = _PUNCT_RE.sub(" ", text).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def is_scenes_vqa(types: Iterable[str]) -> bool:
    """True when any question type is one of the scenes world's: the file is a scenes eval set.

    Its rows of a scenes type use the oracle matcher; a row of another (unknown or mistyped) type
    alone is scored generically and counted (`generic_rows`), so one bad row cannot switch the
    scoring of the whole file."""
    return bool(set(types) & set(QUESTION_TYPES))


def unknown_types(types: Sequence[str]) -> list[int]:
    """Indices of the rows of a scenes eval set whose type is not a scenes question type."""
    if not is_scenes_vqa(types):
        return []
    return [i for i, t in enumerate(types) if t not in QUESTION_TYPES]


def _generic_match(prediction: str, answer: str) -> bool:
    return bool(normalise_answer(prediction)) and normalise_answer(prediction) == normalise_answer(answer)


def vqa_correct(
    predictions: Sequence[str], answers: Sequence[str], types: Sequence[str], matcher: str = "auto"
) -> list[bool]:
    """Per-item normalised exact match (see `vqa_metrics` for the matchers)."""
    if not len(predictions) == len(answers) == len(types):
        raise ValueError(f"lengths differ: {len(predictions)} predictions, {len(answers)} answers, {len(types)} types")
    matcher = resolve_matcher(matcher, types)
    if matcher == "scenes":
        generic = set(unknown_types(types))
        return [
            _generic_match(p, g) if i in generic else answer_matches(p, g, t)
            for i, (p, g, t) in enumerate(zip(predictions, answers, types))
        ]
    return [_generic_match(p, g) for p, g in zip(predictions, answers)]


def resolve_matcher(matcher: str, types: Iterable[str]) -> str:
    if matcher == "auto":
        return "scenes" if is_scenes_vqa(types) else "generic"
    if matcher not in ("scenes", "generic"):
        raise ValueError(f"matcher must be auto, scenes or generic; got {matcher!r}")
    return matcher


def vqa_metrics(
    predictions: Sequence[str], answers: Sequence[str], types: Sequence[str], matcher: str = "auto"
) -> dict[str, Any]:
    """Normalised exact-match accuracy, overall and per question type.

    matcher: "scenes" uses the oracle's `answer_matches` (yes/no types compare the first yes/no word,
    counts the first number, others the normalised words); "generic" compares `normalise_answer` of
    both sides; "auto" picks "scenes" when any type is a scenes question type, and then scores rows
    of other types generically (their count: `generic_rows`). An empty prediction is wrong.
    Returns {"n", "accuracy", "matcher", "generic_rows", "per_type": {type: {"n", "accuracy"}}}."""
    correct = vqa_correct(predictions, answers, types, matcher)
    by_type: dict[str, list[bool]] = defaultdict(list)
    for ok, t in zip(correct, types):
        by_type[t].append(ok)
    resolved = resolve_matcher(matcher, types)
    return {
        "n": len(correct),
        "accuracy": _mean(correct),
        "matcher": resolved,
        "generic_rows": len(unknown_types(types)) if resolved == "scenes" else len(correct),
        "per_type": {t: {"n": len(v), "accuracy": _mean(v)} for t, v in sorted(by_type.items())},
    }


# ----------------------------------------------------------------------------------------- POPE
_NO_WORDS = {"no", "No", "not"}  # POPE's evaluate.py checks exactly these spellings
_YES_RE = re.compile(r"\byes\b", re.IGNORECASE)


def parse_yes_no(text: str, rule: str = "strict") -> str | None:
    """ "yes", "no" or None (unparseable), following POPE's official evaluation rule.

    Official rule (RUCAIBox/POPE evaluate.py, also LLaVA's eval_pope.py): keep the text before the
    first ".", drop commas, split on spaces; if a word is "No", "no" or "not" the answer is no,
    otherwise yes. rule="official" applies it exactly (nothing is unparseable: even "" or "a . ."
    is yes). rule="strict" (the default) is the same rule except that a first sentence with neither
    a no-word nor "yes" is unparseable (None) instead of a silent yes — so a collapsed model cannot
    score on the positive half of the set."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    if any(w in _NO_WORDS for w in words):
        return "no"
    if rule == "official" or _YES_RE.search(first):
        return "yes"
    if rule != "strict":
        raise ValueError(f"rule must be strict or official; got {rule!r}")
    return None


def binary_metrics(predicted: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class.

    An unparseable prediction (None) is wrong whatever the label: with label yes it is a false
    negative, with label no a false positive (it is counted in neither yes_ratio's numerator nor as
    a correct no). yes_ratio = share of predictions that are "yes" (POPE's bias indicator, 0.5 on a
    balanced set for an unbiased model); unparseable = share of None. Empty input gives NaNs."""
    if len(predicted) != len(labels):
        raise ValueError(f"lengths differ: {len(predicted)} predictions, {len(labels)} labels")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(predicted, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(predicted, labels))
    fn = sum(g == "yes" and p != "yes" for p, g in zip(predicted, labels))
    fp = sum(g == "no" and p != "no" for p, g in zip(predicted, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else (0.0 if tp + fp + fn else float("nan"))
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in predicted) / n if n else float("nan"),
        "unparseable": sum(p is None for p in predicted) / n if n else float("nan"),
    }


def pope_metrics(
    predictions: Sequence[str], labels: Sequence[str], splits: Sequence[str] | None = None, rule: str = "strict"
) -> dict[str, Any]:
    """POPE metrics overall and per split (random / popular / adversarial, or "all").

    Answers are parsed with `parse_yes_no(text, rule)`; labels must be "yes" / "no". Returns
    {"rule", "overall": binary_metrics, "splits": {split: binary_metrics}, "official": overall
    binary_metrics under the official rule (for comparison with published POPE numbers)}."""
    labels = [str(g).strip().lower() for g in labels]
    bad = sorted({g for g in labels if g not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be yes or no; got {bad[:3]}")
    splits = list(splits) if splits is not None else ["all"] * len(labels)
    parsed = [parse_yes_no(p, rule) for p in predictions]
    by_split: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(splits):
        by_split[s].append(i)
    return {
        "rule": rule,
        "overall": binary_metrics(parsed, labels),
        "splits": {
            s: binary_metrics([parsed[i] for i in idx], [labels[i] for i in idx]) for s, idx in sorted(by_split.items())
        },
        "official": binary_metrics([parse_yes_no(p, "official") for p in predictions], labels),
    }


# ------------------------------------------------------------------------------------- captions
def caption_hallucination(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Oracle-scored caption metrics (one caption per scene; repeat a scene for several samples).

    response_hallucination = Object HalBench "response" rate / CHAIR_s, with unparseable responses
    counted as hallucinated; mention_hallucination = "mention" rate / CHAIR_i (hallucinated object
    mentions / all mentions); coverage (unparseable = 0); unparseable share. See
    `modistill.scenes.oracle.caption_metrics` for the exact definitions."""
    if len(captions) != len(scenes):
        raise ValueError(f"lengths differ: {len(captions)} captions, {len(scenes)} scenes")
    return caption_metrics(score_caption(c, s) for c, s in zip(captions, scenes))


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")
