"""`--overwrite` / `--fresh` replace only what modistill wrote, never an input (issue 15, item 2)."""

from __future__ import annotations

import json
import shutil

import pytest

from modistill.cli import main
from modistill.errors import UserError
from modistill.io import MARKER, atomic_output_dir, is_ours
from modistill.scenes.build import build_world
from modistill.scenes.world import WorldConfig


def test_overwrite_refuses_a_directory_modistill_did_not_write(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="not a directory modistill wrote"):
        with atomic_output_dir(out, overwrite=True, kind="teacher-cache"):
            pass
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no temporary left behind


def test_overwrite_replaces_its_own_output_atomically(tmp_path):
    out = tmp_path / "cache"
    with atomic_output_dir(out, kind="teacher-cache") as tmp:
        (tmp / "a.txt").write_text("first")
    assert json.loads((out / MARKER).read_text())["kind"] == "teacher-cache" and is_ours(out)
    with pytest.raises(RuntimeError):  # a failure part-way leaves the previous version
        with atomic_output_dir(out, overwrite=True, kind="teacher-cache") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(UserError, match="not a directory modistill wrote as upcycled-model"):
        with atomic_output_dir(out, overwrite=True, kind="upcycled-model"):  # another kind of output
            pass
    with atomic_output_dir(out, overwrite=True, kind="teacher-cache") as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def _project(tmp_path, tiny_vlm_dir):
    proj = tmp_path / "proj"
    shutil.copytree(tiny_vlm_dir, proj / "dense")
    (proj / "NOTES.md").write_text("my notes")
    return proj


@pytest.mark.parametrize("out", ["proj", "proj/dense", "proj/dense/moe"])
def test_upcycle_never_writes_over_or_into_its_source(tmp_path, tiny_vlm_dir, capsys, out):
    proj = _project(tmp_path, tiny_vlm_dir)
    before = sorted(p.name for p in (proj / "dense").iterdir())
    rc = main(["upcycle", "--model", str(proj / "dense"), "--out", str(tmp_path / out), "--overwrite"])
    assert rc == 2
    assert "would contain or be inside the input" in capsys.readouterr().err
    assert sorted(p.name for p in (proj / "dense").iterdir()) == before
    assert (proj / "NOTES.md").read_text() == "my notes"


def test_upcycle_overwrite_replaces_an_earlier_upcycle_only(tmp_path, tiny_vlm_dir, capsys):
    proj = _project(tmp_path, tiny_vlm_dir)
    args = ["upcycle", "--model", str(proj / "dense"), "--num-experts", "2", "--top-k", "1"]
    assert main([*args, "--out", str(tmp_path / "moe")]) == 0
    assert main([*args, "--out", str(tmp_path / "moe"), "--overwrite", "--seed", "1"]) == 0
    assert json.loads((tmp_path / "moe" / "upcycle.json").read_text())["seed"] == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "NOTES.md").write_text("keep")
    capsys.readouterr()
    assert main([*args, "--out", str(mine), "--overwrite"]) == 2
    assert "refusing to replace it" in capsys.readouterr().err and (mine / "NOTES.md").read_text() == "keep"


def test_scenes_overwrite_keeps_a_foreign_directory(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "thesis.tex").write_text("chapter 1")
    with pytest.raises(UserError, match="not a directory modistill wrote"):
        build_world(out, WorldConfig(), 4, 2, seed=0, overwrite=True, progress=False)
    assert (out / "thesis.tex").read_text() == "chapter 1"
    world = tmp_path / "world"
    build_world(world, WorldConfig(), 4, 2, seed=0, progress=False)
    build_world(world, WorldConfig(), 4, 2, seed=1, overwrite=True, progress=False)  # its own: replaced
    assert (world / MARKER).is_file() and (world / "world.json").is_file()


def test_a_directory_from_before_the_marker_is_recognised_by_its_files(tmp_path):
    old = tmp_path / "old-upcycle"
    old.mkdir()
    (old / "upcycle.json").write_text("{}")
    assert is_ours(old, legacy=("upcycle.json",)) and not is_ours(old)
    assert is_ours(tmp_path / "absent") and not is_ours(tmp_path / "old-upcycle" / "upcycle.json")


def test_training_neither_takes_over_nor_deletes_another_kind_of_modistill_output(tmp_path, scenes_world):
    from modistill.runtime.rundir import RunDir
    from test_train_stages import stage_config

    model = tmp_path / "moe"
    with atomic_output_dir(model, kind="upcycled-model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
    cfg = stage_config("align", model, {"path": "student"}, scenes_world)
    with pytest.raises(UserError, match="refusing to delete it"):
        RunDir(cfg, fresh=True)
    with pytest.raises(UserError, match="holds other files"):
        RunDir(cfg)
    assert (model / "model.safetensors").read_bytes() == b"weights"
