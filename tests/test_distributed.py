"""Data parallelism on CPU: a 2-process stage-1b run (torchrun, gloo) equals a 1-process run.

torchrun starts `modistill train` through a small wrapper (written into tmp_path) that only adds a
callback dumping each rank's final weights, so the test can check that both ranks hold the same
model. The global batch is the same as the 1-process run's: 2 processes x 2 samples take, step by
step, exactly the 4 samples the single process takes (Accelerate hands consecutive per-device
batches of one seeded permutation to the ranks in turn), and the trainer normalises KD and CE by
the token count of all ranks, so the update is the same up to fp32 summation order.

The MoE balance loss (paper's coefficient 0.01) with `loss.balance_scope: global` (the default)
takes its routing statistics over both ranks (modistill.losses.balance), so it too is the loss of
the union and the runs agree to rounding. With `local`, each rank balances its own tokens and DDP
averages the ranks' gradients: the mean of per-rank balance losses is not the balance loss of the
union, and the difference to one process is far above rounding (about 10 % of the whole update).
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

from modistill.models.load import load_model
from modistill.stages import run_stage, stage_from_dict
from modistill.upcycle import upcycle

pytestmark = pytest.mark.distributed

# Runs `modistill train` with a callback that saves this rank's final weights (named as in memory).
WRAPPER = textwrap.dedent(
    """
    import os
    import sys

    from safetensors.torch import save_file
    from transformers import TrainerCallback

    import modistill.stages.mimic_sparse as stage
    from modistill.cli import main


    class DumpWeights(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            weights = {n: p.detach().contiguous() for n, p in model.named_parameters()}
            save_file(weights, os.path.join(os.environ["DUMP_DIR"], f"rank{args.process_index}.safetensors"))


    class RecordingTrainer(stage.SparseMimicTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(DumpWeights())


    stage.SparseMimicTrainer = RecordingTrainer
    sys.exit(main(sys.argv[1:]))
    """
)

STEPS = 3
GLOBAL_BATCH = 4


def stage1b(out, world, teacher_dir, student_dir, per_device: int, balance: float, scope: str = "global") -> dict:
    return {
        "stage": "mimic_sparse",
        "output_dir": str(out),
        "student": {"path": str(student_dir)},
        "upcycle": {"num_experts": 4, "top_k": 2, "seed": 3},
        "teacher": {"path": str(teacher_dir)},
        "data": {"train": [str(world / "train.json")], "max_length": 96, "cache_dir": str(out) + "-data"},
        "loss": {"kd_weight": 1.0, "ce_weight": 1.0, "balance_coef": balance, "balance_scope": scope},
        "train": {
            "learning_rate": 1e-2,
            "max_steps": STEPS,
            "per_device_train_batch_size": per_device,
            "logging_steps": 1,
            "save_steps": 100,
            "disable_tqdm": True,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "use_cpu": True,
        },
    }


def run_two_processes(tmp_path, name: str, cfg: dict) -> dict[str, dict[str, torch.Tensor]]:
    """torchrun --standalone --nproc_per_node 2 <wrapper> train CONFIG.yaml; returns each rank's weights."""
    wrapper = tmp_path / "train_and_dump.py"
    wrapper.write_text(WRAPPER)
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps(cfg))  # JSON is YAML
    dumps = tmp_path / f"{name}-dumps"
    dumps.mkdir()
    env = {**os.environ, "DUMP_DIR": str(dumps), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
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
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    log = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, log
    assert "terminate called" not in done.stderr, log
    return {f"rank{r}": load_file(str(dumps / f"rank{r}.safetensors")) for r in (0, 1)}


def run_one_process(out, cfg: dict) -> None:
    run_stage(stage_from_dict(cfg))


def train_logs(out) -> list[dict]:
    return [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def saved_weights(out) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in load_model(out).model.named_parameters()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a if a[n].numel())


def relative_difference(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> float:
    """||a - b|| / ||b - start||: the runs' disagreement as a fraction of what training changed.

    AdamW divides each gradient by its running RMS, so a weight whose gradient is ~0 moves by up to
    the learning rate whatever the gradient's rounding: absolute weight differences say little,
    their size relative to the whole update does.
    """
    num = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in a)
    den = sum(float((b[n] - start[n]).double().pow(2).sum()) for n in a)
    return (num / den) ** 0.5


def test_two_cpu_processes_match_one(tmp_path, scenes_world, teacher_dir, student_dir):
    start = {
        n: p.detach() for n, p in upcycle(load_model(student_dir).model, 4, 2, "every-other", seed=3).named_parameters()
    }
    results = {}
    for scope in ("global", "local"):
        two = tmp_path / f"two-{scope}"
        one = tmp_path / f"one-{scope}"
        ranks = run_two_processes(
            tmp_path, scope, stage1b(two, scenes_world, teacher_dir, student_dir, GLOBAL_BATCH // 2, 0.01, scope)
        )
        run_one_process(one, stage1b(one, scenes_world, teacher_dir, student_dir, GLOBAL_BATCH, 0.01, scope))

        # DDP: both ranks apply the same averaged gradient, so they hold bit-identical weights ...
        assert max_difference(ranks["rank0"], ranks["rank1"]) == 0.0
        # ... and rank 0 wrote them as the final model.
        final = saved_weights(two)
        assert max_difference(final, ranks["rank0"]) == 0.0
        assert [h["step"] for h in train_logs(two)] == list(range(1, STEPS + 1))
        results[scope] = (relative_difference(final, saved_weights(one), start), train_logs(two), train_logs(one))

    # Global balance: 2 x 2 samples are the 4 samples of one process, balance loss included: same
    # losses, gradient norms, logged balance and expert load to fp32 rounding, and weights that
    # differ by rounding only.
    exact, logs_two, logs_one = results["global"]
    assert exact < 1e-3, exact
    for a, b in zip(logs_two, logs_one, strict=True):
        for key in ("loss", "grad_norm", "balance", "load/L0/E0", "load/max_share"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a, b)

    # Local balance: each rank balances its own tokens: a real difference, far above rounding.
    local, logs_two, logs_one = results["local"]
    assert local > 100 * exact, (local, exact)
    print(
        f"\n2 vs 1 process, |w2 - w1| / |w1 - w0| at balance 0.01: global {exact:.1e}; local {local:.1e} "
        f"(local losses {[round(h['loss'], 5) for h in logs_two]} vs {[round(h['loss'], 5) for h in logs_one]})"
    )


def test_global_balance_with_accumulation_matches_one_process(tmp_path, scenes_world, teacher_dir, student_dir):
    """2 processes x 1 sample x 2 accumulation steps = 1 process x 2 samples x 2 accumulation steps.

    The global statistics are taken over both ranks per micro-batch (modistill.losses.balance): rank r's
    k-th micro-batch is sample 2k + r, so the union of the ranks' k-th micro-batches is the 1-process run's
    k-th micro-batch, and the balance term (the mean over micro-batches) is the same loss.
    """
    two, one = tmp_path / "two-ga", tmp_path / "one-ga"
    cfg_two = stage1b(two, scenes_world, teacher_dir, student_dir, 1, 0.01)
    cfg_one = stage1b(one, scenes_world, teacher_dir, student_dir, 2, 0.01)
    for cfg in (cfg_two, cfg_one):
        cfg["train"]["gradient_accumulation_steps"] = 2
    start = {
        n: p.detach() for n, p in upcycle(load_model(student_dir).model, 4, 2, "every-other", seed=3).named_parameters()
    }
    ranks = run_two_processes(tmp_path, "ga", cfg_two)
    run_one_process(one, cfg_one)
    assert max_difference(ranks["rank0"], ranks["rank1"]) == 0.0
    rel = relative_difference(saved_weights(two), saved_weights(one), start)
    assert rel < 1e-3, rel
    for a, b in zip(train_logs(two), train_logs(one), strict=True):
        for key in ("loss", "grad_norm", "balance"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a, b)
    print(f"\n2 x 1 x GA 2 vs 1 x 2 x GA 2, |w2 - w1| / |w1 - w0| at balance 0.01: {rel:.1e}")
