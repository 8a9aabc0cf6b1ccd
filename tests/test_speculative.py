"""The student as speculative drafter: greedy output token-identical to the teacher alone, acceptance stats."""

from __future__ import annotations

import json

import pytest

from conftest import vlm_spec
from modistill.cli import main
from modistill.eval.speculative import speculate
from modistill.models.build import build_vlm
from modistill.models.load import load_model
from modistill.upcycle import upcycle


def _items(world, n=3):
    rows = [json.loads(line) for line in (world / "eval" / "captions.jsonl").read_text().splitlines()[:n]]
    return [{"image": str(world / r["image"]), "text": r["text"]} for r in rows]


@pytest.fixture(scope="module")
def pair(teacher_dir, student_dir):
    teacher, student = load_model(teacher_dir), load_model(student_dir)
    return teacher, student


@pytest.mark.parametrize("num_draft", [1, 3])
def test_output_is_the_teachers_greedy_output_with_an_unrelated_draft(pair, scenes_world, num_draft):
    teacher, student = pair
    r = speculate(
        teacher.model,
        teacher.processor,
        student.model,
        student.processor,
        _items(scenes_world),
        max_new_tokens=16,
        num_draft=num_draft,
    )
    assert r["all_identical"] and r["identical"] == 3
    assert 0.0 <= r["acceptance_rate"] <= 1.0
    # Every teacher forward yields at least one token, at most K + 1.
    assert 1.0 <= r["tokens_per_teacher_forward"] <= num_draft + 1
    assert sum(p["generated"] for p in r["per_prompt"]) == r["generated_tokens"]


def test_a_draft_identical_to_the_teacher_is_always_accepted(pair, scenes_world):
    teacher, _ = pair
    r = speculate(
        teacher.model,
        teacher.processor,
        teacher.model,
        teacher.processor,
        _items(scenes_world),
        max_new_tokens=16,
        num_draft=4,
    )
    assert r["all_identical"]
    assert r["acceptance_rate"] >= 0.95
    # 16 tokens: prefill + ceil(15 / 5) verifications when K=4 tokens are always accepted (+1 bonus each).
    assert all(p["teacher_forwards"] <= 1 + 3 for p in r["per_prompt"] if p["generated"] == 16)


def test_an_moe_draft_with_its_own_image_rendering(pair, scenes_world, tmp_path):
    # A draft whose processor expands the image into 4x the tokens: it reads its own prompt.
    teacher, _ = pair
    model, processor = build_vlm(vlm_spec(scenes_world, text_hidden=32, patch=8, seed=4))
    moe = upcycle(model, 4, 2, "every-other", seed=1)
    r = speculate(
        teacher.model, teacher.processor, moe, processor, _items(scenes_world), max_new_tokens=12, num_draft=2
    )
    assert r["all_identical"] and 0.0 <= r["acceptance_rate"] <= 1.0


def test_speculate_command(teacher_dir, student_dir, scenes_world, tmp_path, capsys):
    out = tmp_path / "spec.json"
    code = main(
        [
            "speculate",
            "--model",
            str(teacher_dir),
            "--draft-model",
            str(student_dir),
            "--data",
            str(scenes_world / "eval" / "vqa.jsonl"),
            "--limit",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "identical to the teacher alone on 2/2" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["prompts"] == 2 and 0 <= result["acceptance_rate"] <= 1
