"""Training stages end to end on a tiny scenes world: what trains, what stays frozen, resume, accumulation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modistill.errors import UserError
from modistill.models.load import load_model
from modistill.moe import sparse_blocks
from modistill.runtime.groups import group_of
from modistill.stages import run_stage, stage_from_dict
from modistill.stages.mimic_dense import MimicTrainer
from modistill.upcycle import upcycle


def stage_config(stage: str, out, student: dict, world, teacher=None, **sections):
    data_file = "prefs.json" if stage == "preference" else "train.json"
    cfg = {
        "stage": stage,
        "output_dir": str(out),
        "student": student,
        "data": {"train": [str(world / data_file)], "max_length": 96, "cache_dir": str(out) + "-data"},
        "train": {
            "learning_rate": 1e-2,
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "save_steps": 100,
            "disable_tqdm": True,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
        },
    }
    if teacher is not None:
        cfg["teacher"] = {"path": str(teacher)}
    for key, value in sections.items():
        cfg.setdefault(key, {})
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return stage_from_dict(cfg)


def _weights(path) -> dict[str, torch.Tensor]:
    model = load_model(path).model
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_only_groups_changed(before: dict, after: dict, trainable: set[str], sparse: set[int]) -> None:
    assert before.keys() == after.keys()
    changed_groups = set()
    for name, old in before.items():
        group = group_of(name, sparse)
        same = torch.equal(old, after[name])
        if group in trainable and old.numel() > 0:
            assert not same, f"{name} ({group}) should have been trained"
            changed_groups.add(group)
        elif group not in trainable:
            assert same, f"{name} ({group}) should be frozen"
    assert changed_groups == {g for g in trainable if any(group_of(n, sparse) == g for n in before)}


LLM = {"embeddings", "attention", "norms", "dense_mlp", "lm_head"}


@pytest.mark.parametrize(
    "stage,loss,expected",
    [
        ("align", {}, {"projector"}),
        ("sft", {}, {"projector"} | LLM),
        ("mimic_dense", {"kd_weight": 1.0}, {"projector"} | LLM),
    ],
)
def test_dense_stages_train_only_their_groups(stage, loss, expected, tmp_path, scenes_world, teacher_dir, student_dir):
    cfg = stage_config(
        stage,
        tmp_path / stage,
        {"path": str(student_dir)},
        scenes_world,
        teacher=teacher_dir if stage == "mimic_dense" else None,
        loss=loss,
    )
    metrics = run_stage(cfg)
    assert metrics["steps"] == 2
    _assert_only_groups_changed(_weights(student_dir), _weights(tmp_path / stage), expected, set())
    # The output describes itself: resolved config, metrics, logs; checkpoints are cleaned up.
    assert (tmp_path / stage / "stage.yaml").is_file() and not (tmp_path / stage / "checkpoints").exists()
    logs = json.loads((tmp_path / stage / "log_history.json").read_text())
    assert [h["step"] for h in logs if "loss" in h] == [1, 2]
    assert all(h.get("kd", 0) > 0 for h in logs if "loss" in h) == (stage == "mimic_dense")


def test_sparse_stage_trains_experts_routers_and_dense_ffns(tmp_path, scenes_world, teacher_dir, student_dir):
    cfg = stage_config(
        "mimic_sparse",
        tmp_path / "s1b",
        {"path": str(student_dir)},
        scenes_world,
        teacher=teacher_dir,
        upcycle={"num_experts": 4, "top_k": 2, "seed": 3},
        loss={"kd_weight": 1.0, "ce_weight": 1.0, "balance_coef": 0.01},
    )
    run_stage(cfg)
    initial = upcycle(load_model(student_dir).model, 4, 2, "every-other", seed=3)
    before = {n: p.detach().clone() for n, p in initial.named_parameters()}
    after = _weights(tmp_path / "s1b")
    _assert_only_groups_changed(before, after, {"projector", "dense_mlp", "experts", "routers"}, {0})
    logs = [h for h in json.loads((tmp_path / "s1b" / "log_history.json").read_text()) if "loss" in h]
    # Balance loss counted (once) and per-layer expert load logged, each layer's shares summing to 1.
    assert all(h["balance"] > 0 for h in logs)
    assert sum(logs[-1][f"load/L0/E{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-6)
    reloaded = load_model(tmp_path / "s1b").model
    assert sorted(sparse_blocks(reloaded)) == [0] and reloaded.config.text_config.model_type == "qwen3_moe"


def test_preference_stage_trains_only_its_groups(tmp_path, scenes_world, teacher_dir, student_dir):
    moe_dir = tmp_path / "moe"
    loaded = load_model(student_dir)
    upcycle(loaded.model, seed=0).save_pretrained(moe_dir)
    loaded.processor.save_pretrained(moe_dir)
    cfg = stage_config(
        "preference", tmp_path / "s2", {"path": str(moe_dir)}, scenes_world, teacher=teacher_dir, loss={"beta": 0.1}
    )
    run_stage(cfg)
    _assert_only_groups_changed(
        _weights(moe_dir), _weights(tmp_path / "s2"), {"projector", "dense_mlp", "experts", "routers"}, {0}
    )
    logs = [h for h in json.loads((tmp_path / "s2" / "log_history.json").read_text()) if "loss" in h]
    assert {"rewards/margin", "rewards/accuracy", "balance"} <= set(logs[0])


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [False, True])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(
    tmp_path, scenes_world, teacher_dir, student_dir, monkeypatch, sparse
):
    # MoE checkpoints are saved with per-expert legacy names: resume must convert them back.
    extra = {"upcycle": {"num_experts": 4, "top_k": 2}} if sparse else {}

    def cfg(out):
        return stage_config(
            "mimic_sparse" if sparse else "mimic_dense",
            out,
            {"path": str(student_dir)},
            scenes_world,
            teacher=teacher_dir,
            **extra,
            loss={"kd_weight": 1.0, "ce_weight": 0.5},
            train={
                "max_steps": 6,
                "save_steps": 2,
                "learning_rate": 3e-3,
                "lr_scheduler_type": "cosine",
                "warmup_steps": 1,
            },
        )

    run_stage(cfg(tmp_path / "full"))
    reference = _weights(tmp_path / "full")

    original_step = MimicTrainer.training_step
    calls = {"n": 0}

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # dies during step 6, after checkpoint-4 was written
            raise RuntimeError("killed")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(MimicTrainer, "training_step", crashing_step)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(cfg(tmp_path / "crash"))
    monkeypatch.setattr(MimicTrainer, "training_step", original_step)
    checkpoints = tmp_path / "crash" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # A checkpoint cut off while being written (no trainer_state.json) must not be resumed from.
    (checkpoints / "checkpoint-6").mkdir()
    (checkpoints / "checkpoint-6" / "model.safetensors").write_bytes(b"partial")
    run_stage(cfg(tmp_path / "crash"))
    resumed = _weights(tmp_path / "crash")
    for name, value in reference.items():
        assert torch.allclose(value, resumed[name], atol=1e-6, rtol=0), name
    # Finished: running again is a no-op that returns the stored metrics.
    assert run_stage(cfg(tmp_path / "crash"))["steps"] == 6


def test_gradient_accumulation_does_not_change_the_update(tmp_path, scenes_world, teacher_dir, student_dir):
    def run(out, batch, accumulation):
        cfg = stage_config(
            "mimic_dense",
            out,
            {"path": str(student_dir)},
            scenes_world,
            teacher=teacher_dir,
            loss={"kd_weight": 1.0, "ce_weight": 0.3},
            train={
                "per_device_train_batch_size": batch,
                "gradient_accumulation_steps": accumulation,
                "max_grad_norm": 1e9,
                "learning_rate": 1e-3,
            },
        )
        run_stage(cfg)
        logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
        return logs, _weights(out)

    logs_a, weights_a = run(tmp_path / "b8", 8, 1)
    logs_b, weights_b = run(tmp_path / "b4x2", 4, 2)
    for a, b in zip(logs_a, logs_b):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4)
    for name, value in weights_a.items():
        assert torch.allclose(value, weights_b[name], atol=1e-5), name


def test_nan_loss_stops_with_a_one_line_error(tmp_path, scenes_world, student_dir, capsys):
    broken = tmp_path / "broken"
    loaded = load_model(student_dir)
    with torch.no_grad():
        loaded.model.model.multi_modal_projector.linear_1.weight.fill_(float("nan"))
    loaded.model.save_pretrained(broken)
    loaded.processor.save_pretrained(broken)
    config = tmp_path / "s0.yaml"
    config.write_text(
        f"stage: align\noutput_dir: {tmp_path / 'out'}\nstudent: {{path: {broken}}}\n"
        f"data: {{train: [{scenes_world / 'train.json'}], max_length: 96}}\n"
        "train: {max_steps: 2, per_device_train_batch_size: 4, disable_tqdm: true}\n"
    )
    from modistill.cli import main

    assert main(["train", str(config)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "loss is nan" in err[0] and "samples" in err[0]


def test_unknown_config_key_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("stage: align\noutput_dir: o\nstudent: {path: s}\ndata: {train: [d.json]}\nlos: {}\n")
    from modistill.cli import main

    assert main(["train", str(config), "train.learning_rate=1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "unknown key 'los'" in err and str(config) in err


def test_a_run_directory_holding_other_files_is_refused(tmp_path, scenes_world, student_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = stage_config("align", out, {"path": str(student_dir)}, scenes_world)
    with pytest.raises(UserError, match="holds other files"):
        run_stage(cfg)
    with pytest.raises(UserError, match="refusing to delete"):
        run_stage(cfg, fresh=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_final_checkpoint_loads_as_plain_transformers(tmp_path, scenes_world, student_dir):
    cfg = stage_config("align", tmp_path / "s0", {"path": str(student_dir)}, scenes_world)
    run_stage(cfg)
    files = {p.name for p in (tmp_path / "s0").iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "stage.yaml", "metrics.json"} <= files
    state = load_file(str(tmp_path / "s0" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values())
    metrics = json.loads((tmp_path / "s0" / "metrics.json").read_text())
    assert metrics["trainable"] == {
        "projector": sum(
            p.numel() for n, p in load_model(student_dir).model.named_parameters() if "multi_modal_projector" in n
        )
    }
