"""The oracle: parse model text back into object mentions and score it against the true scene.

Hallucination can only be measured where the truth is known; here it is. A *mention* is a shape
noun with whatever colour / size / position words the text attaches to it. A mention is hallucinated
when no object of the scene matches it on the attributes it states (objects are matched one-to-one,
so "a red circle and a red circle" with one red circle in the image has one hallucinated mention).

Unparseable output (empty, garbage, dangling words without any shape) is reported as such; callers
must count it as a failure, never as "no hallucination" (in an early calibration run a collapsed preference model
emitted "a . . ." and would otherwise have scored a perfect hallucination rate).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from modistill.scenes.text import (
    NUMBER_WORDS,
    PLURALS,
    caption,
    caption_style_of,
    corrupt_caption,
)
from modistill.scenes.world import COL_WORDS, PALETTE, ROW_WORDS, SHAPES, SIZES, Scene, SceneObject, World, WorldConfig

_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}
_SYNONYMS = {"centre": "center", "big": "large", "little": "small", "grey": "gray"}
_NEGATIONS = {"no", "not", "without", "zero"}
_EMPTY_PHRASES = ("no objects", "no object", "nothing", "empty")
_WORD_RE = re.compile(r"[a-z]+|[0-9]+|,")


@dataclass
class Mention:
    """An object the text claims; None = attribute not stated."""

    shape: str
    colour: str | None = None
    size: str | None = None
    row: int | None = None
    col: int | None = None

    def matches(self, obj: SceneObject) -> bool:
        return (
            obj.shape == self.shape
            and self.colour in (None, obj.colour)
            and self.size in (None, obj.size)
            and self.row in (None, obj.row)
            and self.col in (None, obj.col)
        )


def _words(text: str) -> list[str]:
    words = _WORD_RE.findall(text.lower())
    return [_SYNONYMS.get(w, w) for w in words]


def parse_caption(text: str, grid: int = 3) -> list[Mention] | None:
    """Object mentions in `text` in order of appearance; None when the text is unparseable.

    `[]` means parseable but claiming nothing ("no objects"). Tolerant to broken output: unknown
    words are skipped, plural nouns and number words ("two red circles") give several mentions,
    negated nouns ("no blue square") give none, position words after a noun attach to it."""
    words = _words(text)
    rows = {w: i for i, w in enumerate(ROW_WORDS[grid])}
    cols = {w: i for i, w in enumerate(COL_WORDS[grid])}
    mentions: list[Mention] = []
    pending: dict[str, Any] = {}
    current: list[Mention] = []  # the mention(s) of the last noun: where position words attach
    recognised = False
    for w in words:
        shape = w if w in SHAPES else _SINGULAR.get(w)
        if shape is not None:
            recognised = True
            if pending.pop("negated", False):
                current = []
            else:
                count = pending.pop("count", 1)
                current = [
                    Mention(shape, pending.get("colour"), pending.get("size"), pending.get("row"), pending.get("col"))
                    for _ in range(count)
                ]
                mentions.extend(current)
            pending = {}
        elif w in PALETTE:
            pending["colour"] = w
        elif w in SIZES:
            pending["size"] = w
        elif w in rows or w in cols:
            slot, value = ("row", rows[w]) if w in rows else ("col", cols[w])
            if current and getattr(current[0], slot) is None and not pending:
                for m in current:
                    setattr(m, slot, value)
            else:  # a position stated before its noun
                pending.setdefault(slot, value)
        elif w in _NEGATIONS:
            pending["negated"] = True
        elif w in NUMBER_WORDS[1:10] or (w.isdigit() and 0 < int(w) < 10):
            pending["count"] = int(w) if w.isdigit() else NUMBER_WORDS.index(w)
    normalised = " ".join(words)
    says_empty = any(re.search(rf"\b{p}\b", normalised) for p in _EMPTY_PHRASES)
    if not mentions and not recognised and not says_empty:
        return None
    return mentions


def _match(mentions: list[Mention], objects: tuple[SceneObject, ...]) -> list[int | None]:
    """Maximum one-to-one matching mention -> object index (Kuhn's augmenting paths; sizes are tiny)."""
    owner: dict[int, int] = {}  # object index -> mention index

    def augment(m: int, seen: set[int]) -> bool:
        for o, obj in enumerate(objects):
            if o in seen or not mentions[m].matches(obj):
                continue
            seen.add(o)
            if o not in owner or augment(owner[o], seen):
                owner[o] = m
                return True
        return False

    for m in range(len(mentions)):
        augment(m, set())
    assignment: list[int | None] = [None] * len(mentions)
    for o, m in owner.items():
        assignment[m] = o
    return assignment


@dataclass
class CaptionScore:
    parseable: bool
    mentions: list[Mention] = field(default_factory=list)
    hallucinated_mentions: list[Mention] = field(default_factory=list)
    n_objects: int = 0
    n_covered: int = 0

    @property
    def hallucinated(self) -> bool:
        """Response level: at least one hallucinated mention (False for unparseable text — see `faithful`)."""
        return bool(self.hallucinated_mentions)

    @property
    def faithful(self) -> bool:
        """Parseable and without hallucination: the only outcome that counts as a success."""
        return self.parseable and not self.hallucinated

    @property
    def coverage(self) -> float:
        return self.n_covered / self.n_objects if self.n_objects else 1.0


def score_caption(text: str, scene: Scene) -> CaptionScore:
    mentions = parse_caption(text, scene.grid)
    if mentions is None:
        return CaptionScore(parseable=False, n_objects=len(scene.objects))
    assignment = _match(mentions, scene.objects)
    return CaptionScore(
        parseable=True,
        mentions=mentions,
        hallucinated_mentions=[m for m, o in zip(mentions, assignment) if o is None],
        n_objects=len(scene.objects),
        n_covered=sum(o is not None for o in assignment),
    )


def caption_metrics(scores: Iterable[CaptionScore]) -> dict[str, float]:
    """Aggregate caption scores.

    - response_hallucination (CHAIR_s / Object HalBench "response"): share of responses that
      hallucinate OR are unparseable — garbage is a failure, never a success;
    - response_hallucination_parseable: the same among parseable responses only (diagnostic);
    - mention_hallucination (CHAIR_i / "mention"): hallucinated mentions / all mentions;
    - coverage: mean share of true objects mentioned (unparseable = 0);
    - unparseable: share of unparseable responses."""
    scores = list(scores)
    n = len(scores)
    if n == 0:
        return {"n": 0}
    parseable = [s for s in scores if s.parseable]
    n_mentions = sum(len(s.mentions) for s in scores)
    n_bad = sum(len(s.hallucinated_mentions) for s in scores)
    return {
        "n": n,
        "response_hallucination": sum(not s.faithful for s in scores) / n,
        "response_hallucination_parseable": (sum(s.hallucinated for s in parseable) / len(parseable))
        if parseable
        else float("nan"),
        "mention_hallucination": n_bad / n_mentions if n_mentions else float("nan"),
        "coverage": sum(s.coverage if s.parseable else 0.0 for s in scores) / n,
        "unparseable": (n - len(parseable)) / n,
        "mentions_per_response": n_mentions / n,
    }


# ------------------------------------------------------------------------------------------ answers
_YES_NO_TYPES = {"exists", "compare", "pope"}


def _normalise_answer(text: str) -> list[str]:
    words = [w for w in _words(text) if w != ","]
    words = [str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else w for w in words]
    while words and words[0] in ("a", "an", "the", "at", "in", "on", "it", "is"):
        words = words[1:]
    if words and words[-1] in ("object", "objects"):  # "red object" -> "red"
        words = words[:-1] or words
    return words


def answer_matches(pred: str, gold: str, qtype: str) -> bool:
    """Normalised exact match: case, punctuation, articles and number words do not matter; yes/no
    types compare the first yes/no word, counts the first number."""
    p, g = _normalise_answer(pred), _normalise_answer(gold)
    if qtype in _YES_NO_TYPES:
        first = next((w for w in p if w in ("yes", "no")), None)
        return first is not None and g[:1] == [first]
    if qtype == "count":
        first = next((w for w in p if w.isdigit()), None)
        return first is not None and g[:1] == [first]
    return bool(p) and p == g


# ------------------------------------------------------------------------------- preference pairs
def label_preference_pairs(
    scene: Scene,
    question: str,
    responses: list[str],
    rng: random.Random,
    *,
    world: World | None = None,
    image: str | None = None,
    id_prefix: str = "pair",
    min_coverage: float = 0.5,
    max_pairs: int | None = None,
) -> list[dict[str, str]]:
    """Preference pairs for one caption question, labelled by the oracle.

    Chosen candidates: parseable, faithful responses mentioning at least `min_coverage` of the
    objects (so "no objects" is not rewarded for saying nothing), best coverage first. Rejected
    candidates: hallucinated responses, then unparseable ones. Without a chosen candidate the
    ground-truth caption is used; without a rejected one, a corrupted ground truth (one phantom
    object or one swapped attribute). Each rejected response gets one pair (chosen cycled).
    Pairs are RLAIF-V dicts: question, chosen, rejected (+ id and image when `image` is given)."""
    world = world or World(WorldConfig())
    style = caption_style_of(question) or "caption"
    scored = [(r, score_caption(r, scene)) for r in dict.fromkeys(responses)]
    chosen = [r for r, s in sorted(scored, key=lambda rs: -rs[1].coverage) if s.faithful and s.coverage >= min_coverage]
    rejected = [r for r, s in scored if s.parseable and s.hallucinated] + [r for r, s in scored if not s.parseable]
    if not chosen:
        chosen = [caption(scene, style)]
    if not rejected:
        rejected = [corrupt_caption(scene, style, world, rng)]
    pairs = []
    for i, bad in enumerate(rejected[:max_pairs] if max_pairs else rejected):
        pair = {"question": question, "chosen": chosen[i % len(chosen)], "rejected": bad}
        if image is not None:
            pair = {"id": f"{id_prefix}-{i}", "image": image, **pair}
        pairs.append(pair)
    return pairs
