"""On-policy preference pairs: sampled from a model, labelled by the oracle, readable as RLAIF-V data."""

from __future__ import annotations

import json

import pytest

from modistill.data.preferences import load_preferences
from modistill.demo.onpolicy import build_onpolicy_pairs, read_train_scenes
from modistill.models.load import load_model
from modistill.scenes.oracle import score_caption


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
        seed=3,
        batch_size=4,
        max_new_tokens=8,
        progress=False,
    )
    pairs = [p for p in json.loads(out.read_text()) if p["id"].startswith("short-")]
    assert stats["short_answer_pairs"] == len(pairs) == 8
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
