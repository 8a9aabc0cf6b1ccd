"""kill -9 at every point where a run writes something, then re-run: the result is the uninterrupted run's.

The process SIGKILLs itself at a named point (`MODISTILL_KILL_AT`, modistill.faults): during the
dataset cache build, mid-run, inside a checkpoint save (weights written, trainer state not), and
inside the final save. One run is killed at each point in turn, each re-run resuming the last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from modistill.config import dump_yaml
from modistill.models.load import load_model
from modistill.stages import run_stage
from test_train_stages import stage_config


def _cfg(out, world, student_dir):
    return stage_config(
        "align",
        out,
        {"path": str(student_dir)},
        world,
        train={
            "max_steps": 4,
            "save_steps": 2,
            "learning_rate": 3e-3,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 1,
        },
    )


def _train(config, kill_at: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MODISTILL_KILL_AT"}
    if kill_at:
        env["MODISTILL_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "modistill.cli", "train", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _weights(path) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in load_model(path).model.named_parameters()}


@pytest.mark.slow
def test_kill_9_anywhere_then_rerun_gives_the_uninterrupted_result(tmp_path, scenes_world, student_dir):
    run_stage(_cfg(tmp_path / "reference", scenes_world, student_dir))
    reference = _weights(tmp_path / "reference")

    out = tmp_path / "killed"
    config = tmp_path / "stage.yaml"
    config.write_text(dump_yaml(_cfg(out, scenes_world, student_dir)))
    checkpoints = out / "checkpoints"

    def killed(point: str) -> None:
        result = _train(config, point)
        assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stderr[-2000:])

    killed("dataset-build")  # arrow rows written, split not published
    assert not checkpoints.exists() and not (out / "model.safetensors").exists()
    killed("step-3")  # mid-run, after checkpoint-2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]
    killed("checkpoint-save-4")  # checkpoint-4 has its weights but no trainer state
    assert (checkpoints / "checkpoint-4" / "model.safetensors").is_file()
    assert not (checkpoints / "checkpoint-4" / "trainer_state.json").exists()
    killed("final-save")  # the final model half-way into its temporary copy
    assert list(out.glob(".final-*")) and not (out / "metrics.json").exists()

    result = _train(config, None)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from checkpoint-4 (step 4 of 4)" in result.stdout
    assert not list(out.glob(".final-*")) and (out / "metrics.json").is_file()
    resumed = _weights(out)
    for name, value in reference.items():
        assert torch.allclose(value, resumed[name], atol=1e-6, rtol=0), name
