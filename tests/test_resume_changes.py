"""A resume sees the config and data the run started with; a finished stage is not silently re-used (item 5)."""

from __future__ import annotations

import json
import shutil

import pytest

from modistill.errors import UserError
from modistill.runtime.resume import RUNTIME_FILE
from modistill.runtime.rundir import RunDir
from modistill.stages import run_stage
from modistill.stages.align import CETrainer
from test_train_stages import stage_config


@pytest.fixture()
def world_copy(tmp_path, scenes_world):
    """The world's train.json beside its images, in a directory the test may edit."""
    world = tmp_path / "world"
    world.mkdir()
    shutil.copy(scenes_world / "train.json", world / "train.json")
    (world / "images").symlink_to(scenes_world / "images")
    return world


def _cfg(out, world, student_dir, lr=1e-2):
    return stage_config(
        "align", out, {"path": str(student_dir)}, world, train={"max_steps": 3, "save_steps": 1, "learning_rate": lr}
    )


def _crash_in_step(monkeypatch, n: int):
    original = CETrainer.training_step

    def crashing(self, *args, **kwargs):
        if self.state.global_step == n - 1:
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CETrainer, "training_step", crashing)
    return original


def test_resume_on_edited_data_is_refused_unless_asked(tmp_path, world_copy, student_dir, monkeypatch, capsys):
    out = tmp_path / "run"
    original = _crash_in_step(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(_cfg(out, world_copy, student_dir))
    monkeypatch.setattr(CETrainer, "training_step", original)
    assert json.loads((out / "data.json").read_text())["samples"] == 48
    data = json.loads((world_copy / "train.json").read_text())
    (world_copy / "train.json").write_text(json.dumps(data[:-1]))  # one sample fewer
    with pytest.raises(UserError, match=r"data: train.json changed \(size \d+ -> \d+ bytes\).*--resume-with-changes"):
        run_stage(_cfg(out, world_copy, student_dir))
    capsys.readouterr()
    metrics = run_stage(_cfg(out, world_copy, student_dir), resume_with_changes=True)
    printed = capsys.readouterr().out
    assert "resuming from checkpoint-1 with changes (--resume-with-changes): data: train.json changed" in printed
    assert "resuming from checkpoint-1 (step 1 of 3)" in printed
    assert metrics["steps"] == 3 and metrics["samples"] == 47
    assert json.loads((out / "data.json").read_text())["samples"] == 47


def test_metrics_cover_the_whole_resumed_run(tmp_path, world_copy, student_dir, monkeypatch):
    out = tmp_path / "run"
    original = _crash_in_step(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(_cfg(out, world_copy, student_dir))
    monkeypatch.setattr(CETrainer, "training_step", original)
    before = json.loads((out / "checkpoints" / "checkpoint-2" / RUNTIME_FILE).read_text())["train_seconds"]
    assert before > 0
    metrics = run_stage(_cfg(out, world_copy, student_dir))
    # Two steps of the first segment, one of the second: the runtime counts both segments.
    assert metrics["train_runtime_s"] > before
    logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    assert metrics["train_loss"] == pytest.approx(sum(h["loss"] for h in logs) / 3) and metrics["train_loss"] > 1


def test_a_finished_stage_rerun_with_another_config_is_an_error(tmp_path, world_copy, student_dir, capsys):
    out = tmp_path / "run"
    first = run_stage(_cfg(out, world_copy, student_dir))
    assert run_stage(_cfg(out, world_copy, student_dir)) == first  # same config: the stored result
    assert "stage already finished" in capsys.readouterr().out
    with pytest.raises(
        UserError,
        match=r"already finished with another config or data "
        r"\(train.learning_rate: 0.01 -> 0.001\); pass --fresh",
    ):
        run_stage(_cfg(out, world_copy, student_dir, lr=1e-3))
    assert run_stage(_cfg(out, world_copy, student_dir, lr=1e-3), fresh=True)["steps"] == 3


def test_an_orphan_final_copy_is_removed_on_the_next_run(tmp_path, world_copy, student_dir):
    out = tmp_path / "run"
    RunDir(_cfg(out, world_copy, student_dir))
    orphan = out / ".final-1234abcd"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half a model")
    RunDir(_cfg(out, world_copy, student_dir))
    assert not orphan.exists() and (out / "stage.yaml").is_file()


def test_a_different_sample_count_on_resume_is_refused(tmp_path, world_copy, student_dir):
    # The data files can stay the same while the kept samples change (skip mode, images fixed or gone).
    out = tmp_path / "run"
    RunDir(_cfg(out, world_copy, student_dir)).check_samples(48)
    checkpoint = out / "checkpoints" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1, "max_steps": 3}))
    (checkpoint / "model.safetensors").write_bytes(b"")
    run = RunDir(_cfg(out, world_copy, student_dir))
    assert run.resume_from == str(checkpoint)
    with pytest.raises(UserError, match=r"started on 48 samples, the data now gives 45; .*--resume-with-changes"):
        run.check_samples(45)
    RunDir(_cfg(out, world_copy, student_dir), resume_with_changes=True).check_samples(45)
    assert json.loads((out / "data.json").read_text())["samples"] == 45
