"""Image paths stay inside the image root, only regular files are opened, decoding is bounded (issue 15, item 3)."""

from __future__ import annotations

import json
import os
import threading

import pytest
from PIL import Image
from transformers import AutoProcessor

from helpers import red_image
from modistill.data.check import check_data
from modistill.data.conversations import load_conversations
from modistill.data.image_safety import UnsafeImage, open_image
from modistill.data.validate import BAD_IMAGE, IMAGE_OUTSIDE_ROOT, image_problem
from modistill.errors import UserError
from modistill.eval.generate import load_image
from modistill.eval.run import load_eval_file


@pytest.fixture(scope="module")
def proc(tiny_vlm_dir):
    return AutoProcessor.from_pretrained(tiny_vlm_dir)


def conv(sid: str, image: str) -> dict:
    return {
        "id": sid,
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red."}],
    }


@pytest.fixture()
def layout(tmp_path):
    """data/ (the image root, with ok.png) and outside/secret.png beside it."""
    (tmp_path / "data").mkdir()
    (tmp_path / "outside").mkdir()
    red_image().save(tmp_path / "data" / "ok.png")
    red_image().save(tmp_path / "outside" / "secret.png")
    return tmp_path


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("escape", ["../outside/secret.png", "ABSOLUTE"])
def test_paths_outside_the_image_root_are_refused_unless_allowed(layout, proc, escape):
    image = str(layout / "outside" / "secret.png") if escape == "ABSOLUTE" else escape
    data = write(layout / "data" / "train.jsonl", [conv("good", "ok.png"), conv("sneaky", image)])
    stats, problems = check_data([data], proc, max_length=256)
    assert [(p.sample_id, p.reason) for p in problems] == [("sneaky", IMAGE_OUTSIDE_ROOT)]
    assert "outside the image root" in problems[0].message() and "allow_outside_root" in problems[0].message()
    with pytest.raises(UserError, match=rf"{data}:2: sample sneaky: {IMAGE_OUTSIDE_ROOT}"):
        load_conversations(data, processor=proc, max_length=256, cache_dir=layout / "cache")
    # The explicit opt-in (data.allow_outside_root: true) trains on both.
    allowed = load_conversations(
        data, processor=proc, max_length=256, cache_dir=layout / "cache", allow_outside_root=True
    )
    assert allowed.dataset["id"] == ["good", "sneaky"]


def test_a_symlinked_folder_inside_the_root_is_followed(layout, proc):
    # Only `..` and absolute paths (what a data file can write) are confined; a link someone put on disk is theirs.
    os.symlink(layout / "outside", layout / "data" / "linked")
    data = write(
        layout / "data" / "train.jsonl",
        [conv("linked", "linked/secret.png"), conv("escape", "linked/../../outside/secret.png")],
    )
    _, problems = check_data([data], proc, max_length=256)
    assert [(p.sample_id, p.reason) for p in problems] == [("escape", IMAGE_OUTSIDE_ROOT)]


def _finishes(fn, seconds: float = 20.0):
    """Run fn in a daemon thread; (finished, result). A blocking open() must not hang the test run."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), box.get("result")


def test_a_fifo_named_png_is_reported_not_opened(layout, proc):
    fifo = layout / "data" / "pipe.png"
    os.mkfifo(fifo)
    finished, why = _finishes(lambda: image_problem(str(fifo)))
    assert finished and "not a regular file" in why
    data = write(layout / "data" / "train.jsonl", [conv("good", "ok.png"), conv("pipe", "pipe.png")])
    finished, result = _finishes(lambda: check_data([data], proc, max_length=256))
    assert finished
    assert [(p.sample_id, p.reason) for p in result[1]] == [("pipe", BAD_IMAGE)]


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 9_000)).save(bomb)  # 90 Mpixels declared, a few KB on disk
    why = image_problem(str(bomb))
    assert why is not None and "over the bound" in why and "10000x9000" in why
    red_image(20).save(tmp_path / "small.png")
    with pytest.raises(UnsafeImage, match="20x20 pixels, over the bound of 100"):
        open_image(tmp_path / "small.png", max_pixels=100)
    with open_image(tmp_path / "small.png") as im:
        assert im.size == (20, 20)


def test_eval_files_cannot_read_outside_their_image_root(layout):
    rows = [
        {"image": "ok.png", "text": "q?", "answer": "red", "type": "colour"},
        {"image": "../outside/secret.png", "text": "q?", "answer": "red", "type": "colour"},
    ]
    path = write(layout / "data" / "vqa.jsonl", rows)
    with pytest.raises(UserError, match=r"vqa.jsonl:2: image .*outside the image root"):
        load_eval_file(path, image_root=layout / "data")
    with pytest.raises(UserError, match="outside the image root"):
        load_image("../outside/secret.png", layout / "data")


def test_chat_missing_image_hint_does_not_name_an_option_chat_lacks(tmp_path):
    with pytest.raises(UserError) as err:
        load_image(str(tmp_path / "nope.png"))  # chat: a path given directly, no image root
    assert "not found" in str(err.value) and "--image-root" not in str(err.value)
