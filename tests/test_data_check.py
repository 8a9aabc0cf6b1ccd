"""`modistill data check`: counts, statistics, every problem, exit code."""

from __future__ import annotations

import argparse
import json

import pytest

from helpers import red_image
from modistill.data.check import add_check_arguments, run_check_command
from modistill.data.validate import BAD_IMAGE, IMAGE_TRUNCATED, MALFORMED_JSON, NO_ASSISTANT
from modistill.errors import UserError


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_check_arguments(parser)
    return run_check_command(parser.parse_args(list(argv)))


@pytest.fixture()
def files(tmp_path):
    red_image().save(tmp_path / "red.png")
    good = {
        "id": "g",
        "image": "red.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red."}],
    }
    text = {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes."}]}
    bad_img = dict(good, id="b", image="gone.png")
    no_answer = {"id": "n", "conversations": [{"from": "human", "value": "hi"}]}
    late_image = {
        "id": "late",
        "image": "red.png",
        "conversations": [
            {"from": "human", "value": "describe the image. " * 20},
            {"from": "gpt", "value": "ok."},
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": "red."},
        ],
    }
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(good) + "\n" + json.dumps(text) + "\n")
    dirty = tmp_path / "dirty.jsonl"
    dirty.write_text(
        "\n".join([json.dumps(good), json.dumps(bad_img), "{oops", json.dumps(no_answer), json.dumps(late_image)])
        + "\n"
    )
    return clean, dirty


def test_clean_data_exits_zero_with_statistics(files, tiny_vlm_dir, capsys):
    clean, _ = files
    assert run(str(clean), "--model", str(tiny_vlm_dir)) == 0
    out = capsys.readouterr().out
    assert "samples: 2 kept of 2 read (1 with images, 1 text-only; 1 images)" in out
    assert "image tokens: 4 per image, 4 in all" in out and "problems: none" in out
    assert "tokens per sequence: min " in out


def test_every_problem_is_listed_and_exit_code_is_nonzero(files, tiny_vlm_dir, capsys):
    clean, dirty = files
    assert run(str(clean), str(dirty), "--model", str(tiny_vlm_dir), "--max-length", "64") == 1
    out = capsys.readouterr().out
    for line, sid, reason in [
        (2, "b", BAD_IMAGE),
        (3, "dirty.jsonl#2", MALFORMED_JSON),
        (4, "n", NO_ASSISTANT),
        (5, "late", IMAGE_TRUNCATED),
    ]:
        assert f"{dirty}:{line}: sample {sid}: {reason}" in out
    assert "samples: 3 kept of 7 read" in out and "problems: 4 (" in out


def test_preferences_kind_is_detected(tmp_path, tiny_vlm_dir, capsys):
    red_image().save(tmp_path / "red.png")
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps([{"id": "p", "image": "red.png", "question": "what?", "chosen": "red.", "rejected": "blue."}])
    )
    assert run(str(path), "--model", str(tiny_vlm_dir)) == 0
    assert "2 sequences" in capsys.readouterr().out  # chosen and rejected


def test_bad_model_dir_is_a_user_error(files, tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        run(str(files[0]), "--model", str(tmp_path))
