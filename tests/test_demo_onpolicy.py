"""On-policy preference pairs: sampled from a model, labelled by the oracle, readable as RLAIF-V data."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from modistill.data.preferences import load_preferences
from modistill.demo import onpolicy
from modistill.demo.onpolicy import build_onpolicy_pairs, read_train_scenes
from modistill.models.load import load_model
from modistill.scenes.oracle import score_caption
from modistill.scenes.text import caption, caption_style_of, corrupt_caption
from modistill.scenes.world import World, WorldConfig


def _load_pairs(out, scenes_world, loaded, tmp_path):
    """The pairs as stage 2 reads them: every pair must survive loading."""
    return load_preferences(
        [out],
        image_root=scenes_world,
        processor=loaded.processor,
        max_length=160,
        cache_dir=tmp_path / "dc",
        verbose=False,
    )


@pytest.mark.slow
def test_pairs_are_oracle_labelled_and_load_as_preference_data(tmp_path, scenes_world, teacher_dir):
    loaded = load_model(teacher_dir)  # a random model: its samples are garbage, so fallbacks are exercised
    out = tmp_path / "prefs.json"
    stats = build_onpolicy_pairs(
        loaded, scenes_world, out, n_images=6, samples=2, seed=1, batch_size=4, max_new_tokens=12, progress=False
    )
    pairs = json.loads(out.read_text())
    assert stats["images"] == 6 and stats["pairs"] == len(pairs) >= 6
    assert stats["sampled_hallucination_rate"] > 0.5  # random model: mostly unparseable/hallucinated
    scenes = dict(read_train_scenes(scenes_world))
    for pair in pairs:
        assert set(pair) == {"id", "image", "question", "chosen", "rejected"}
        scene = scenes[pair["image"]]
        chosen, rejected = score_caption(pair["chosen"], scene), score_caption(pair["rejected"], scene)
        assert chosen.faithful and chosen.parseable  # the oracle's verdicts, checked independently here
        assert rejected.hallucinated or not rejected.parseable
    data = _load_pairs(out, scenes_world, loaded, tmp_path)
    assert len(data) == len(pairs)
    # Same seed, same pairs.
    build_onpolicy_pairs(
        loaded,
        scenes_world,
        tmp_path / "again.json",
        n_images=6,
        samples=2,
        seed=1,
        batch_size=4,
        max_new_tokens=12,
        progress=False,
    )
    assert json.loads((tmp_path / "again.json").read_text()) == pairs


@pytest.mark.slow
def test_short_answer_pairs_choose_the_true_existence_answer(tmp_path, scenes_world, teacher_dir):
    import re

    loaded = load_model(teacher_dir)
    out = tmp_path / "prefs.json"
    stats = build_onpolicy_pairs(
        loaded,
        scenes_world,
        out,
        n_images=2,
        samples=1,
        short_answers=8,
        greedy_images=4,
        repeat_images=5,
        seed=3,
        batch_size=4,
        max_new_tokens=8,
        progress=False,
    )
    every = json.loads(out.read_text())
    pairs = [p for p in every if p["id"].startswith("short-")]
    assert stats["short_answer_pairs"] == len(pairs) == 8
    greedy = [p for p in every if p["id"].startswith("greedy-")]
    assert stats["greedy_images"] == 4 and stats["greedy_error_pairs"] == len(greedy) <= 4
    repeats = [p for p in every if p["id"].startswith("repeat-")]
    assert stats["repeat_pairs"] == len(repeats) == 5  # the fixture's scenes all hold objects
    for pool in (greedy, repeats):  # the error pool and the repeat pairs each have their own images
        others = {p["image"] for p in every if p not in pool}
        assert not others & {p["image"] for p in pool}
    assert 0.0 <= stats["short_answer_error_rate"] <= 1.0
    scenes = dict(read_train_scenes(scenes_world))
    answers = []
    for pair in pairs:
        scene = scenes[pair["image"]]
        words = re.match(r"Is there an? (.+?)(?: object)? in the image\?", pair["question"]).group(1).split()
        # Independent truth: a "colour shape", a colour, or a shape present in the scene graph.
        present = any(all(w in (o.colour, o.shape) for w in words) for o in scene.objects)
        assert pair["chosen"] == ("yes" if present else "no")
        assert {pair["chosen"], pair["rejected"]} == {"yes", "no"}
        answers.append(pair["chosen"])
    assert answers.count("yes") == answers.count("no")  # targets alternate
    data = _load_pairs(out, scenes_world, loaded, tmp_path)
    assert len(data) == len(json.loads(out.read_text()))


def test_greedy_error_pool_pairs_only_the_wrong_greedy_captions(scenes_world, monkeypatch):
    rows = read_train_scenes(scenes_world)[:8]
    scenes = dict(rows)
    world = World(WorldConfig(**json.loads((scenes_world / "world.json").read_text())["config"]))

    def fake_greedy(model, processor, items, **kwargs):
        # Even images: the ground-truth caption (faithful, no pair); odd ones: a caption naming a
        # phantom object (hallucinated) or nothing the oracle can parse.
        answers = []
        for k, (item, (image, scene)) in enumerate(zip(items, rows)):
            assert item["image"] == str(scenes_world / image)
            style = caption_style_of(item["text"])
            wrong = "the the the" if k % 4 == 1 else corrupt_caption(scene, style, world, random.Random(k))
            answers.append(caption(scene, style) if k % 2 == 0 else wrong)
        return answers

    monkeypatch.setattr(onpolicy, "generate_answers", fake_greedy)
    loaded = SimpleNamespace(model=None, processor=None)
    pairs = onpolicy.greedy_error_pairs(loaded, scenes_world, world, rows, random.Random(0), 4, 48, False)
    assert [pair["image"] for pair in pairs] == [image for image, _ in rows[1::2]]
    for pair in pairs:
        scene = scenes[pair["image"]]
        assert pair["chosen"] == caption(scene, caption_style_of(pair["question"]))
        verdict = score_caption(pair["rejected"], scene)
        assert verdict.hallucinated or not verdict.parseable


def test_repeat_pairs_differ_from_the_true_caption_by_one_repeated_mention(scenes_world):
    rows = read_train_scenes(scenes_world)[:40]
    scenes = dict(rows)
    pairs = onpolicy.repeat_pairs(rows, random.Random(0))
    assert [pair["image"] for pair in pairs] == [image for image, scene in rows if scene.objects]
    assert len({pair["id"] for pair in pairs}) == len(pairs)
    assert len({pair["question"] for pair in pairs}) > 1  # caption styles are drawn, not fixed
    for pair in pairs:
        scene = scenes[pair["image"]]
        assert pair["chosen"] == caption(scene, caption_style_of(pair["question"]))
        verdict = score_caption(pair["rejected"], scene)
        assert verdict.parseable and len(verdict.hallucinated_mentions) == 1
        assert (verdict.hallucinated_mentions[0].colour, verdict.hallucinated_mentions[0].shape) in scene.kinds()
