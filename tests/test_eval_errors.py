"""Bad input to evaluation gives one-line UserErrors naming the file and line; good variants are accepted."""

import argparse
import json

import pytest
from PIL import Image
from transformers import Qwen3Config

from modistill.errors import UserError
from modistill.eval.cli import add_chat_arguments, run_chat_command
from modistill.eval.generate import generate_answers
from modistill.eval.run import evaluate, load_eval_file
from modistill.models.load import load_model


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def images(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / "imgs" / "a.png")
    return tmp_path


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


VQA = {"question_id": 1, "image": "imgs/a.png", "text": "What colour?", "answer": "green", "type": "colour"}


def test_missing_file_and_bad_json_line(images):
    assert "no such eval file" in _error(load_eval_file, images / "nope.jsonl")
    f = _write(images / "bad.jsonl", [VQA, "{not json"])
    assert f"{f}:2: not valid JSON" in _error(load_eval_file, f)
    f = _write(images / "list.jsonl", [VQA, "[1, 2]"])
    assert f"{f}:2: expected a JSON object" in _error(load_eval_file, f)
    assert "no rows" in _error(load_eval_file, _write(images / "empty.jsonl", []))


def test_unknown_kind_mixed_rows_and_bad_labels(images):
    f = _write(images / "q.jsonl", [{"image": "imgs/a.png", "text": "hi"}])
    assert f"{f}:1: cannot tell the eval kind" in _error(load_eval_file, f)
    f = _write(images / "mixed.jsonl", [VQA, {"image": "imgs/a.png", "text": "Is there a cat?", "label": "no"}])
    assert f"{f}:2: a vqa row needs" in _error(load_eval_file, f)
    f = _write(images / "pope.jsonl", [{"image": "imgs/a.png", "text": "Is there a cat?", "label": "maybe"}])
    assert f"{f}:1: POPE label must be yes or no" in _error(load_eval_file, f)
    f = _write(images / "cap.jsonl", [{"image": "imgs/a.png", "text": "Describe.", "scene": {"grid": 3}}])
    assert f"{f}:1: not a scene graph" in _error(load_eval_file, f)


def test_missing_image_names_the_line_and_the_fix(images):
    f = _write(images / "v.jsonl", [VQA, {**VQA, "image": "imgs/missing.png"}])
    msg = _error(load_eval_file, f)
    assert f"{f}:2: image" in msg and "missing.png" in msg and "--image-root" in msg
    f = _write(images / "w.jsonl", [{**VQA, "image": "elsewhere.png"}])
    assert f"{f}:1: image elsewhere.png found neither" in _error(load_eval_file, f)
    assert "--image-root" in _error(load_eval_file, f, image_root=images / "no-such-dir")


def test_image_root_defaults_and_public_pope_format(images):
    # POPE's own question files: no split, image names relative to a separate folder.
    sub = images / "eval"
    sub.mkdir()
    pope = _write(
        sub / "coco_pope_random.json",
        [{"question_id": 7, "image": "a.png", "text": "Is there a cat in the image?", "label": "no"}],
    )
    es = load_eval_file(pope, image_root=images / "imgs")
    assert es.kind == "pope" and es.image_root == images / "imgs" and "split" not in es.rows[0]
    # default root: the file's folder, then its parent (a scenes world's eval/ beside images/)
    nested = _write(sub / "vqa.jsonl", [VQA])
    assert load_eval_file(nested).image_root == images
    assert load_eval_file(_write(images / "vqa.jsonl", [VQA])).image_root == images
    # a JSON array file is read too, its errors name the item
    arr = images / "arr.json"
    arr.write_text(json.dumps([VQA, {**VQA, "image": "imgs/zz.png"}]))
    assert f"{arr}: item 1: image" in _error(load_eval_file, arr)


def test_pope_without_split_evaluates_as_all(images, tiny_vlm_dir):
    pope = _write(
        images / "pope.jsonl",
        [
            {"question_id": i, "image": "a.png", "text": "Is there a cat?", "label": lab}
            for i, lab in enumerate(["yes", "no", "no"])
        ],
    )
    res = evaluate(tiny_vlm_dir, {"mypope": pope}, image_root=images / "imgs", max_new_tokens=3, progress=False)
    assert list(res["metrics"]) == ["mypope"] and list(res["metrics"]["mypope"]["splits"]) == ["all"]
    assert res["metrics"]["mypope"]["overall"]["n"] == 3


def test_model_errors(images, tmp_path, tiny_vlm_dir):
    f = _write(images / "v.jsonl", [VQA])
    assert "no such directory" in _error(evaluate, tmp_path / "no-model", [f])
    lm = tmp_path / "lm"
    Qwen3Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=64,
    ).save_pretrained(lm)
    assert "not a vision-language model" in _error(evaluate, lm, [f])
    loaded = load_model(tiny_vlm_dir)
    assert "needs a vision-language model" in _error(
        generate_answers, loaded.model.model.language_model, loaded.tokenizer, []
    )
    assert "--limit" in _error(evaluate, tiny_vlm_dir, [f], limit=0)
    assert "limit names pope, which no eval file is called" in _error(
        evaluate, tiny_vlm_dir, {"vqa": f}, limit={"pope": 5}
    )
    assert "limit names vqa" in _error(evaluate, tiny_vlm_dir, [f], limit={"vqa": 5})  # unnamed files
    assert "limit for vqa must be >= 1" in _error(evaluate, tiny_vlm_dir, {"vqa": f}, limit={"vqa": 0})
    assert "--batch-size" in _error(evaluate, tiny_vlm_dir, [f], batch_size=0)
    assert "cannot create its folder" in _error(evaluate, tiny_vlm_dir, [f], out=f / "results.json")  # f is a file
    assert "num_samples > 1 needs sampling" in _error(
        generate_answers, loaded.model, loaded.processor, [], num_samples=2
    )
    # bad input files are refused before the model loads (the model path here does not even exist)
    assert "no such eval file" in _error(evaluate, tmp_path / "no-model", [tmp_path / "nope.jsonl"])


def test_chat_with_a_missing_image(tiny_vlm_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_chat_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_vlm_dir), "--image", str(tmp_path / "x.png"), "Describe."])
    assert "x.png not found" in _error(run_chat_command, args)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    args = parser.parse_args(["--model", str(tiny_vlm_dir), "--image", str(tmp_path / "broken.png"), "Describe."])
    assert "cannot read image" in _error(run_chat_command, args)
