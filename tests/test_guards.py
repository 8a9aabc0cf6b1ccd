"""No NaN reaches the weights, a checkpoint or the final model; resume from the last finite one (issue 15, item 1)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modistill.cli import main
from modistill.errors import UserError
from modistill.models.load import load_model
from modistill.runtime.guards import NonFiniteError
from modistill.stages import run_stage
from modistill.stages.align import CETrainer
from test_train_stages import stage_config


def _all_finite(path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_nan_gradient_stops_before_the_update_and_the_run_resumes_with_a_lower_lr(
    tmp_path, scenes_world, student_dir, monkeypatch, capsys
):
    out = tmp_path / "s0"

    def cfg(lr):
        return stage_config(
            "align",
            out,
            {"path": str(student_dir)},
            scenes_world,
            train={"max_steps": 3, "save_steps": 1, "learning_rate": lr},
        )

    original = CETrainer.training_step
    poisoned_ids = []

    def poisoned(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        if self.state.global_step == 1:  # the second step: its loss is finite, its gradient is not
            poisoned_ids.extend(inputs["sample_ids"])
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(CETrainer, "training_step", poisoned)
    with pytest.raises(NonFiniteError) as err:
        run_stage(cfg(1e-2))
    message = str(err.value)
    assert message.startswith("step 2: the gradient norm is nan (samples ")
    assert all(str(i) in message for i in poisoned_ids) and poisoned_ids
    assert "--resume-with-changes to continue from checkpoint-1" in message and "\n" not in message
    # Nothing of step 2 was saved: no final model, no metrics, only the finite checkpoint-1.
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert _all_finite(out / "checkpoints" / "checkpoint-1" / "model.safetensors")

    monkeypatch.setattr(CETrainer, "training_step", original)
    with pytest.raises(UserError, match=r"train.learning_rate: 0.01 -> 0.001.*--resume-with-changes"):
        run_stage(cfg(1e-3))  # a changed config is still refused without the flag
    capsys.readouterr()
    metrics = run_stage(cfg(1e-3), resume_with_changes=True)
    printed = capsys.readouterr().out
    assert "resuming from checkpoint-1 with changes (--resume-with-changes): train.learning_rate" in printed
    assert "resuming from checkpoint-1 (step 1 of 3)" in printed
    assert metrics["steps"] == 3 and _all_finite(out / "model.safetensors")
    logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    # The new rate is the one trained with after the resume (constant schedule), not the checkpoint's.
    assert [(h["step"], h["learning_rate"]) for h in logs] == [
        (1, 1e-2),
        (2, pytest.approx(1e-3)),
        (3, pytest.approx(1e-3)),
    ]


def test_a_huge_learning_rate_stops_at_the_nan_gradient_and_resumes_lower(tmp_path, scenes_world, student_dir, capsys):
    config = tmp_path / "s0.yaml"
    config.write_text(
        f"stage: sft\noutput_dir: {tmp_path / 'out'}\nstudent: {{path: {student_dir}}}\n"
        f"data: {{train: [{scenes_world / 'train.json'}], max_length: 96, cache_dir: {tmp_path / 'cache'}}}\n"
        "train: {max_steps: 4, per_device_train_batch_size: 4, disable_tqdm: true, "
        "save_steps: 1, warmup_steps: 0, lr_scheduler_type: constant, logging_steps: 1}\n"
    )
    # The issue's case: lr 1e6 on the whole LLM makes step 2's gradient NaN while its loss is finite.
    assert main(["train", str(config), "train.learning_rate=1e6"]) == 2
    out = tmp_path / "out"
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: step 2: the gradient norm is nan (samples ")
    assert "--resume-with-changes to continue from checkpoint-1" in err[0]
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    for checkpoint in (out / "checkpoints").glob("checkpoint-*"):
        assert _all_finite(checkpoint / "model.safetensors"), checkpoint.name
    # checkpoint-1 holds finite but huge weights (one step at lr 1e6): starting over is the way out here;
    # resuming with changes is covered by the test above.
    assert main(["train", str(config), "train.learning_rate=1e-4", "--fresh"]) == 0
    assert _all_finite(out / "model.safetensors")
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_a_non_finite_weight_is_never_checkpointed_or_saved(tmp_path, scenes_world, student_dir):
    broken = tmp_path / "broken"
    loaded = load_model(student_dir)
    with torch.no_grad():  # unused by the forward (features come before it): loss and gradients stay finite
        loaded.model.model.vision_tower.head.probe.fill_(float("inf"))
    loaded.model.save_pretrained(broken)
    loaded.processor.save_pretrained(broken)
    cfg = stage_config(
        "align", tmp_path / "s0", {"path": str(broken)}, scenes_world, train={"max_steps": 2, "save_steps": 1}
    )
    with pytest.raises(NonFiniteError, match=r"refusing to save checkpoint-1: 1 tensors hold NaN/inf \(first: "):
        run_stage(cfg)
    assert not list((tmp_path / "s0" / "checkpoints").glob("checkpoint-*/*.safetensors"))
    assert not (tmp_path / "s0" / "model.safetensors").exists()


def test_a_nan_loss_names_the_step_it_happened_in(tmp_path, scenes_world, student_dir):
    broken = tmp_path / "broken"
    loaded = load_model(student_dir)
    with torch.no_grad():
        loaded.model.model.multi_modal_projector.linear_1.weight.fill_(float("nan"))
    loaded.model.save_pretrained(broken)
    loaded.processor.save_pretrained(broken)
    cfg = stage_config("align", tmp_path / "s0", {"path": str(broken)}, scenes_world)
    with pytest.raises(NonFiniteError, match=r"^step 1: the loss is nan .*then rerun \(no checkpoint"):
        run_stage(cfg)  # the first step is step 1, as the Trainer logs it (was: step 0)
