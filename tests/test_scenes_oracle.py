"""Oracle: parsing model captions, scoring hallucination and coverage, answer matching, pair labelling."""

import math
import random

import pytest

from modistill.scenes.oracle import (
    answer_matches,
    caption_metrics,
    label_preference_pairs,
    parse_caption,
    score_caption,
)
from modistill.scenes.text import CAPTION_PROMPTS, caption, corrupt_caption, repeat_caption
from modistill.scenes.world import CAPTION_TASKS, SceneObject, World, WorldConfig, make_scene

# A small red circle at the top left, a large blue square in the centre (3x3 grid).
SCENE = make_scene(
    [SceneObject("red", "circle", "small", 0, 0), SceneObject("blue", "square", "large", 1, 1)], 3, (120, 120, 120)
)


@pytest.mark.parametrize(
    "text, n_mentions, n_bad, coverage",
    [
        ("a red circle and a blue square", 2, 0, 1.0),
        ("A Red Circle, and a BLUE square.", 2, 0, 1.0),
        ("a small red circle at the top left and a large blue square at the middle center", 2, 0, 1.0),
        ("a red circle", 1, 0, 0.5),  # faithful but partial
        ("a square", 1, 0, 0.5),  # unstated attributes never count against a mention
        ("a red circle and a green triangle", 2, 1, 0.5),  # an absent object
        ("a large red circle", 1, 1, 0.0),  # wrong size
        ("a small red circle at the bottom right", 1, 1, 0.0),  # wrong position
        ("a blue circle and a red square", 2, 2, 0.0),  # attributes swapped between objects
        ("a red circle and a red circle", 2, 1, 0.5),  # one object cannot back two mentions
        ("two red circles and a blue square", 3, 1, 1.0),  # plural with a number
        ("a red circle, no green triangle", 1, 0, 0.5),  # negated nouns claim nothing
        ("a red circle and a blue", 1, 0, 0.5),  # dangling words from a cut-off answer are skipped
        ("no objects", 0, 0, 0.0),  # parseable: claims nothing
    ],
)
def test_score_hand_written_captions(text, n_mentions, n_bad, coverage):
    score = score_caption(text, SCENE)
    assert score.parseable
    assert len(score.mentions) == n_mentions
    assert len(score.hallucinated_mentions) == n_bad
    assert score.hallucinated == (n_bad > 0)
    assert score.coverage == pytest.approx(coverage)


@pytest.mark.parametrize("text", ["", "   ", "a . . .", "zzz qqq", "yes", "the the the", "<|pad|><|pad|>"])
def test_garbage_is_unparseable_and_never_a_success(text):
    assert parse_caption(text) is None
    score = score_caption(text, SCENE)
    assert not score.parseable and not score.faithful and score.coverage == 0.0


def test_parse_positions_depend_on_the_grid():
    (m,) = parse_caption("a red circle at the middle center", grid=3)
    assert (m.colour, m.shape, m.size, m.row, m.col) == ("red", "circle", None, 1, 1)
    (m,) = parse_caption("a large cross at the upper midright", grid=4)
    assert (m.size, m.shape, m.row, m.col) == ("large", "cross", 1, 2)


def test_caption_metrics_count_garbage_as_failure():
    texts = ["a red circle and a blue square", "a red circle and a green triangle", "", "a red circle"]
    metrics = caption_metrics([score_caption(t, SCENE) for t in texts])
    assert metrics["n"] == 4
    assert metrics["unparseable"] == pytest.approx(1 / 4)
    assert metrics["response_hallucination"] == pytest.approx(2 / 4)  # one hallucinated + one garbage
    assert metrics["response_hallucination_parseable"] == pytest.approx(1 / 3)
    assert metrics["mention_hallucination"] == pytest.approx(1 / 5)
    assert metrics["coverage"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert caption_metrics([score_caption("", SCENE)])["response_hallucination"] == 1.0
    assert math.isnan(caption_metrics([score_caption("", SCENE)])["mention_hallucination"])


def test_ground_truth_captions_of_every_style_and_grid_are_faithful_and_complete():
    for cfg in (
        WorldConfig(),
        WorldConfig(image_size=40, grid=2, max_objects=4),
        WorldConfig(image_size=60, grid=5, max_objects=9),
    ):
        world = World(cfg)
        rng = random.Random(0)
        for _ in range(100):
            scene = world.sample_scene(rng)
            for style in CAPTION_TASKS:
                score = score_caption(caption(scene, style), scene)
                assert score.faithful and score.coverage == 1.0 and len(score.mentions) == len(scene.objects)


def test_corrupted_captions_hallucinate_exactly_one_mention():
    world = World(WorldConfig())
    rng = random.Random(0)
    for _ in range(300):
        scene = world.sample_scene(rng)
        for style in CAPTION_TASKS:
            score = score_caption(corrupt_caption(scene, style, world, rng), scene)
            assert score.parseable and len(score.hallucinated_mentions) == 1


def test_repeat_captions_say_a_kind_once_more_than_the_scene_holds_it():
    world = World(WorldConfig())
    rng = random.Random(0)
    seen_shared = 0
    for _ in range(300):
        scene = world.sample_scene(rng)
        for style in CAPTION_TASKS:
            text = repeat_caption(scene, style, rng)
            if not scene.objects:
                assert text is None
                continue
            assert text is not None
            score = score_caption(text, scene)
            # One mention too many of a present kind: wrong by exactly one mention, every object still named
            # except the one it replaced (or all of them, when the last object is said twice).
            assert score.parseable and len(score.hallucinated_mentions) == 1
            bad = score.hallucinated_mentions[0]
            assert (bad.colour, bad.shape) in scene.kinds()
            assert score.n_covered in (len(scene.objects) - 1, len(scene.objects))
            said = [(m.colour, m.shape) for m in score.mentions]
            seen_shared += any(a != b and a[0] == b[0] for a, b in zip([o.kind for o in scene.objects], said))
    assert seen_shared > 0


def test_repeat_caption_prefers_the_next_object_of_the_same_colour():
    scene = make_scene(
        [SceneObject("blue", "circle", "small", 0, 0), SceneObject("blue", "triangle", "large", 1, 1)], 3, (9, 9, 9)
    )
    texts = {repeat_caption(scene, "caption_brief", random.Random(seed)) for seed in range(40)}
    # The triangle said as a circle (the common error), or the last object said twice.
    assert texts == {"a blue circle and a blue circle", "a blue circle, a blue triangle and a blue triangle"}


@pytest.mark.parametrize(
    "pred, gold, qtype, ok",
    [
        ("Yes.", "yes", "exists", True),
        ("yes, there is", "yes", "exists", True),
        ("no", "yes", "exists", False),
        ("", "no", "compare", False),
        ("2", "two", "count", True),
        ("Two objects.", "two", "count", True),
        ("three", "two", "count", False),
        ("at the top left", "top left", "position", True),
        ("top right", "top left", "position", False),
        ("Red", "red", "colour", True),
        ("red object", "red", "colour", True),
        ("red circle", "red", "colour", False),
        ("", "red", "colour", False),
        ("the triangle", "triangle", "shape", True),
    ],
)
def test_answer_matches(pred, gold, qtype, ok):
    assert answer_matches(pred, gold, qtype) is ok


def test_label_preference_pairs_uses_the_oracle():
    world = World(WorldConfig())
    rng = random.Random(0)
    q = CAPTION_PROMPTS["caption"]
    good = "a small red circle and a large blue square"
    bad = "a small red circle, a large blue square and a small green triangle"
    pairs = label_preference_pairs(SCENE, q, [bad, good, "a . .", good], rng, world=world, image="images/x.png")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(good, bad), (good, "a . .")]
    assert set(pairs[0]) == {"id", "image", "question", "chosen", "rejected"} and pairs[0]["image"] == "images/x.png"

    # No faithful response: the ground truth is chosen.
    pairs = label_preference_pairs(SCENE, q, [bad], rng, world=world)
    assert pairs == [{"question": q, "chosen": caption(SCENE, "caption"), "rejected": bad}]

    # "no objects" is faithful but says nothing: not a chosen candidate.
    pairs = label_preference_pairs(SCENE, q, ["no objects", bad], rng, world=world)
    assert pairs[0]["chosen"] == caption(SCENE, "caption")

    # No contrast among faithful responses: a corrupted answer is the rejected one.
    partial = "a small red circle"
    pairs = label_preference_pairs(SCENE, CAPTION_PROMPTS["caption_detailed"], [good, partial], rng, world=world)
    assert len(pairs) == 1 and pairs[0]["chosen"] == good
    rejected = score_caption(pairs[0]["rejected"], SCENE)
    assert rejected.parseable and rejected.hallucinated
    assert "at the" in pairs[0]["rejected"]  # the fallback follows the question's caption style
