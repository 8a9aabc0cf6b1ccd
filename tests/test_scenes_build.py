"""build_world / `modistill data scenes`: promised files, consistency, determinism, refusal."""

import argparse
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from modistill.errors import UserError
from modistill.scenes.build import add_scenes_arguments, build_world, run_scenes_command
from modistill.scenes.oracle import score_caption
from modistill.scenes.world import Scene, WorldConfig


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "world"
    summary = build_world(out, WorldConfig(), n_train=240, n_test=30, seed=5, n_prefs=40, progress=False)
    return out, summary


def test_build_writes_the_promised_files(world_dir):
    out, summary = world_dir
    for rel in (
        "train.json",
        "train_scenes.jsonl",
        "prefs.json",
        "world.json",
        "eval/vqa.jsonl",
        "eval/pope.jsonl",
        "eval/captions.jsonl",
        "eval/scenes.jsonl",
        "tokenizer/tokenizer.json",
    ):
        assert (out / rel).is_file(), rel
    assert not list(out.parent.glob(".world.*"))  # no temporary directory left behind
    train = json.loads((out / "train.json").read_text())
    assert len(train) == summary["train_samples"] == 240
    assert {"id", "image", "conversations"} <= set(train[0])
    images = {s["image"] for s in train} | {r["image"] for r in _jsonl(out / "eval/captions.jsonl")}
    val = _jsonl(out / "val/scenes.jsonl")
    assert len(images) == 270 and len(list((out / "images").glob("*.png"))) == 270 + len(val)
    # Validation scenes: training-bucket graphs that train.json does not hold.
    from modistill.scenes.world import Scene, World, WorldConfig

    world = World(WorldConfig(**json.loads((out / "world.json").read_text())["config"]))
    seen = {Scene.from_json(r["scene"]).canonical() for r in _jsonl(out / "train_scenes.jsonl")}
    assert len(val) > 10 and all((out / r["image"]).is_file() for r in val)
    for row in val:
        scene = Scene.from_json(row["scene"])
        assert world.split_of(scene) == "train" and scene.canonical() not in seen
    assert (out / "val/pope.jsonl").is_file() and (out / "val/vqa.jsonl").is_file()
    img = Image.open(out / train[0]["image"])
    assert img.size == (48, 48) and img.mode == "RGB"

    vqa = _jsonl(out / "eval/vqa.jsonl")
    assert all(set(r) == {"question_id", "image", "text", "answer", "type"} for r in vqa)
    pope = _jsonl(out / "eval/pope.jsonl")
    assert all({"question_id", "image", "text", "label", "split"} <= set(r) for r in pope)
    assert len({r["question_id"] for r in vqa}) == len(vqa) and len({r["question_id"] for r in pope}) == len(pope)
    prefs = json.loads((out / "prefs.json").read_text())
    assert len(prefs) == 40 and all(set(p) == {"id", "image", "question", "chosen", "rejected"} for p in prefs)

    world = json.loads((out / "world.json").read_text())
    assert world["counts"]["tokenizer_vocab"] == len(AutoTokenizer.from_pretrained(str(out / "tokenizer")))
    assert world["config"]["grid"] == 3 and {"red", "circle", "top", "left", "yes"} <= set(world["vocabulary"]["words"])


def test_sidecars_give_the_oracle_the_truth(world_dir):
    out, _ = world_dir
    scenes = {r["image"]: Scene.from_json(r["scene"]) for r in _jsonl(out / "eval/scenes.jsonl")}
    for row in _jsonl(out / "eval/captions.jsonl"):
        assert Scene.from_json(row["scene"]) == scenes[row["image"]]
    train_scenes = {r["image"]: Scene.from_json(r["scene"]) for r in _jsonl(out / "train_scenes.jsonl")}
    assert not {s.canonical() for s in train_scenes.values()} & {s.canonical() for s in scenes.values()}
    for pair in json.loads((out / "prefs.json").read_text()):
        scene = train_scenes[pair["image"]]
        assert score_caption(pair["chosen"], scene).faithful
        assert score_caption(pair["rejected"], scene).hallucinated
    for row in _jsonl(out / "eval/pope.jsonl"):  # POPE labels agree with the scene graph
        colour, shape = row["text"].split()[3:5]
        assert (row["label"] == "yes") == ((colour, shape) in scenes[row["image"]].kinds())


def _digest(out):
    h = hashlib.sha256()
    for rel in (
        "train.json",
        "prefs.json",
        "eval/vqa.jsonl",
        "eval/pope.jsonl",
        "eval/captions.jsonl",
        "tokenizer/tokenizer.json",
    ):
        h.update((out / rel).read_bytes())
    for png in sorted((out / "images").glob("*.png")):
        h.update(png.read_bytes())
    return h.hexdigest()


def test_build_is_deterministic_by_seed(tmp_path):
    a = build_world(tmp_path / "a", WorldConfig(), 60, 10, seed=1, progress=False)
    b = build_world(tmp_path / "b", WorldConfig(), 60, 10, seed=1, progress=False)
    build_world(tmp_path / "c", WorldConfig(), 60, 10, seed=2, progress=False)
    assert a["out_dir"] != b["out_dir"]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_more_test_images_keep_the_training_data_and_the_first_test_and_validation_rows(tmp_path):
    # The demo grows its test split (200 -> 600 -> 2,000) without retraining anything: this is why.
    small = build_world(tmp_path / "s", WorldConfig(), 60, 6, seed=1, n_prefs=8, progress=False)
    large = build_world(tmp_path / "l", WorldConfig(), 60, 15, seed=1, n_prefs=8, progress=False)
    s, big = Path(small["out_dir"]), Path(large["out_dir"])
    for name in ("train.json", "prefs.json", "train_scenes.jsonl"):
        assert (s / name).read_bytes() == (big / name).read_bytes(), name
    for split in ("eval", "val"):
        for f in sorted((s / split).glob("*.jsonl")):
            few, more = f.read_text().splitlines(), (big / split / f.name).read_text().splitlines()
            assert len(more) > len(few) and more[: len(few)] == few, f"{split}/{f.name}"
    for png in sorted((s / "images").glob("*.png")):
        assert png.read_bytes() == (big / "images" / png.name).read_bytes(), png.name
    assert len(list((big / "images").glob("test_*.png"))) == 15


def test_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    build_world(out, WorldConfig(), 20, 5, seed=0, progress=False)  # an empty directory is fine
    before = _digest(out)
    with pytest.raises(UserError, match="not empty"):
        build_world(out, WorldConfig(), 20, 5, seed=1, progress=False)
    assert _digest(out) == before  # untouched
    build_world(out, WorldConfig(), 20, 5, seed=1, overwrite=True, progress=False)
    assert _digest(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
    with pytest.raises(UserError, match="n_train"):
        build_world(tmp_path / "x", WorldConfig(), 0, 5, seed=0)


def test_cli_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_scenes_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path / "w"),
            "--seed",
            "3",
            "--n-train",
            "50",
            "--n-test",
            "8",
            "--caption-noise",
            "0.5",
            "--set",
            "max_objects=2",
            "--no-progress",
        ]
    )
    assert run_scenes_command(args) == 0
    assert "50 training samples" in capsys.readouterr().out
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    assert (
        world["config"]["caption_noise"] == 0.5 and world["config"]["max_objects"] == 2 and world["config"]["seed"] == 3
    )
    bad = parser.parse_args(["--out", str(tmp_path / "v"), "--set", "grid=7"])
    with pytest.raises(UserError, match="grid"):
        run_scenes_command(bad)
