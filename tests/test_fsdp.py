"""FSDP2 on CPU: a 2-process stage-1b run (torchrun, gloo) through the stage config's `train.fsdp`.

The stage config sets `train.fsdp: full_shard` and `train.fsdp_config: {version: 2, ...}`, which
the Trainer hands to Accelerate's FSDP plugin: `fully_shard` on each Qwen3-MoE decoder layer
and on the model (the same path a GPU user takes). The live teacher is never given to the
Trainer, so it stays an unwrapped inference-only module on each rank.

Checks: the 2-process FSDP run equals a 1-process run with the same global batch (balance loss
included, global scope) to fp32 tolerance; both ranks hold the same full weights; the final
student is a full checkpoint that plain transformers loads; a run killed after a checkpoint
resumes from it and ends where the uninterrupted run ends. DeepSpeed ZeRO-2 is not tested here
(deepspeed is not installed in the project's environment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from modistill.models.load import load_model
from modistill.upcycle import upcycle
from test_distributed import GLOBAL_BATCH, STEPS, relative_difference, run_one_process, saved_weights, stage1b

pytestmark = pytest.mark.distributed

# Runs `modistill train`; dumps each rank's full (gathered) weights at the end; with CRASH_AT_STEP,
# every rank dies at the end of that step (after the checkpoint of an earlier step was written).
WRAPPER = textwrap.dedent(
    """
    import json
    import os
    import sys

    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    import modistill.stages.mimic_sparse as stage
    from modistill.cli import main


    class DumpWeights(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_end(self, args, state, control, model=None, **kwargs):
            weights, sharded = {}, 0
            for name, p in model.named_parameters():  # full_tensor() is a collective: every rank calls it
                sharded += isinstance(p, DTensor)
                full = p.full_tensor() if isinstance(p, DTensor) else p
                weights[name] = full.detach().contiguous()
            path = os.path.join(os.environ["DUMP_DIR"], f"rank{args.process_index}")
            save_file(weights, path + ".safetensors")
            with open(path + ".json", "w") as f:
                teacher = self.trainer.teacher.model.parameters()
                json.dump({"sharded": sharded, "teacher_sharded": sum(isinstance(p, DTensor) for p in teacher)}, f)


    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["CRASH_AT_STEP"]):
                raise SystemExit(3)


    class RecordingTrainer(stage.SparseMimicTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(DumpWeights(self))
            if os.environ.get("CRASH_AT_STEP"):
                self.add_callback(Crash())


    stage.SparseMimicTrainer = RecordingTrainer
    sys.exit(main(sys.argv[1:]))
    """
)

FSDP = {
    "fsdp": "full_shard",
    "fsdp_config": {
        "version": 2,
        "transformer_layer_cls_to_wrap": ["Qwen3MoeDecoderLayer"],
        "state_dict_type": "FULL_STATE_DICT",
    },
}


def fsdp_stage1b(out, world, teacher_dir, student_dir, save_steps: int = 100) -> dict:
    cfg = stage1b(out, world, teacher_dir, student_dir, GLOBAL_BATCH // 2, 0.01)
    cfg["train"].update(FSDP, save_steps=save_steps, max_steps=STEPS + 1)
    return cfg


def torchrun(tmp_path, name: str, cfg: dict, crash_at: int | None = None) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "train_fsdp.py"
    wrapper.write_text(WRAPPER)
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps(cfg))  # JSON is YAML
    dumps = tmp_path / f"{name}-dumps"
    dumps.mkdir(exist_ok=True)
    env = {**os.environ, "DUMP_DIR": str(dumps), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CRASH_AT_STEP", None)
    if crash_at is not None:
        env["CRASH_AT_STEP"] = str(crash_at)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(wrapper),
        "train",
        str(config),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def rank_weights(tmp_path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    return {r: load_file(str(tmp_path / f"{name}-dumps" / f"rank{r}.safetensors")) for r in (0, 1)}


def check_ok(done: subprocess.CompletedProcess) -> None:
    log = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, log
    assert "terminate called" not in done.stderr, log


def test_fsdp_two_processes_match_one_save_and_resume(tmp_path, scenes_world, teacher_dir, student_dir):
    start = {
        n: p.detach() for n, p in upcycle(load_model(student_dir).model, 4, 2, "every-other", seed=3).named_parameters()
    }
    steps = STEPS + 1

    # One process, same global batch, no FSDP: the reference.
    one = tmp_path / "one"
    ref_cfg = stage1b(one, scenes_world, teacher_dir, student_dir, GLOBAL_BATCH, 0.01)
    ref_cfg["train"]["max_steps"] = steps
    run_one_process(one, ref_cfg)
    reference = saved_weights(one)

    # Two processes under FSDP2, uninterrupted.
    full = tmp_path / "fsdp"
    done = torchrun(tmp_path, "fsdp", fsdp_stage1b(full, scenes_world, teacher_dir, student_dir))
    check_ok(done)
    # FSDP really sharded the student (its parameters were DTensors, each rank holding a part);
    # the teacher stayed a plain module.
    dumped = json.loads((tmp_path / "fsdp-dumps" / "rank0.json").read_text())
    assert dumped["sharded"] == len(reference) and dumped["teacher_sharded"] == 0
    ranks = rank_weights(tmp_path, "fsdp")
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    for name in reference:  # gathered full tensors, not shards
        assert ranks[0][name].shape == reference[name].shape, name
        assert torch.equal(ranks[0][name], ranks[1][name]), name

    # The final student: a full checkpoint that plain transformers loads, equal to the ranks' weights.
    plain = AutoModelForImageTextToText.from_pretrained(full)
    final = {n: p.detach() for n, p in plain.named_parameters()}
    assert final.keys() == reference.keys()
    assert max(float((final[n] - ranks[0][n]).abs().max()) for n in final) == 0.0
    fsdp_vs_one = relative_difference(final, reference, start)
    assert fsdp_vs_one < 1e-3, fsdp_vs_one
    logs_two = [h for h in json.loads((full / "log_history.json").read_text()) if "loss" in h]
    logs_one = [h for h in json.loads((one / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in logs_two] == list(range(1, steps + 1))
    for a, b in zip(logs_two, logs_one, strict=True):
        for key in ("loss", "grad_norm", "balance"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a, b)

    # Killed at the end of step 3 (checkpoint-2 written), then resumed: ends where the full run ends.
    crash = tmp_path / "crash"
    cfg = fsdp_stage1b(crash, scenes_world, teacher_dir, student_dir, save_steps=2)
    died = torchrun(tmp_path, "crash", cfg, crash_at=3)
    assert died.returncode != 0
    assert sorted(p.name for p in (crash / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (crash / "metrics.json").exists()
    again = torchrun(tmp_path, "crash", cfg)
    check_ok(again)
    # It resumed from checkpoint-2: this run trained (and logged) steps 3 and 4 only.
    assert (again.stdout + again.stderr).count("{'loss'") == steps - 2, again.stdout[-3000:]
    resumed = saved_weights(crash)
    assert max(float((resumed[n] - final[n]).abs().max()) for n in final) <= 1e-6
    resumed_logs = [h for h in json.loads((crash / "log_history.json").read_text()) if "loss" in h]
    assert resumed_logs[-1]["step"] == steps
    print(f"\nFSDP2 2 processes vs 1 process, |w2 - w1| / |w1 - w0|: {fsdp_vs_one:.1e}")
