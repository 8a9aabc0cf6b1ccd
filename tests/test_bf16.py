"""bf16 on the CPU: whole stages under `train.bf16: true`, and saved students in bf16 / fp16.

`train.bf16` becomes `TrainingArguments(bf16=True)`: Accelerate runs the student's forward under
bf16 autocast (fp32 master weights, AdamW in fp32) and hands its outputs back in fp32, so the
fused KD/CE, preference and balance losses are computed in fp32 outside autocast. The tests
record, inside compute_loss, that the student's matmuls ran in bf16 and the loss is fp32, and
compare the whole run (3 steps) with the fp32 run of the same config: losses per step within 0.1 %
(measured: 1e-5 for stage 1b, 2e-5 for stage 2) and the final weights within 10 % of the update,
|w_bf16 - w_fp32| / |w_fp32 - w0| (measured: 3 % and 4 %); bf16 keeps 8 bits of mantissa, and
AdamW's sign-like first steps amplify rounding in weights whose gradient is ~0.
"""

from __future__ import annotations

import json

import pytest
import torch

import modistill.stages.mimic_sparse as sparse_stage
import modistill.stages.preference as preference_stage
from helpers import vlm_batch
from modistill.models.load import load_model
from modistill.stages import stage_from_dict
from modistill.upcycle import upcycle

LOSS_RTOL, WEIGHT_RTOL = 1e-3, 0.10


def recording(base):
    """A trainer subclass that notes the dtypes of the student's first projection and of the loss."""

    class Recording(base):
        seen: list[tuple[torch.dtype, torch.dtype]] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            proj = self.accelerator.unwrap_model(model).model.language_model.layers[0].self_attn.q_proj
            out = {}

            def note(module, args, output) -> None:
                out.setdefault("dtype", output.dtype)

            handle = proj.register_forward_hook(note)
            try:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                handle.remove()
            Recording.seen.append((out["dtype"], loss.dtype))
            return loss

    return Recording


def config(stage: str, out, world, student: dict, teacher_dir, bf16: bool, **sections):
    data = "prefs.json" if stage == "preference" else "train.json"
    loss = (
        {"balance_coef": 0.01} if stage == "preference" else {"kd_weight": 1.0, "ce_weight": 1.0, "balance_coef": 0.01}
    )
    return stage_from_dict(
        {
            "stage": stage,
            "output_dir": str(out),
            "student": student,
            "teacher": {"path": str(teacher_dir)},
            "data": {"train": [str(world / data)], "max_length": 96, "cache_dir": str(out) + "-data"},
            "loss": loss,
            **sections,
            "train": {
                "learning_rate": 1e-3,
                "max_steps": 3,
                "per_device_train_batch_size": 4,
                "logging_steps": 1,
                "save_steps": 100,
                "disable_tqdm": True,
                "warmup_steps": 0,
                "lr_scheduler_type": "constant",
                "use_cpu": True,
                "bf16": bf16,
            },
        }
    )


def weights(path) -> dict[str, torch.Tensor]:
    return {n: p.detach().float() for n, p in load_model(path).model.named_parameters()}


def logs(path) -> list[dict]:
    return [h for h in json.loads((path / "log_history.json").read_text()) if "loss" in h]


def compare(
    tmp_path, stage, run, trainer_name, module, student: dict, start, world, teacher_dir, monkeypatch, **sections
):
    results = {}
    for bf16 in (False, True):
        cls = recording(getattr(module, trainer_name))
        cls.seen = []
        monkeypatch.setattr(module, trainer_name, cls)
        out = tmp_path / f"{stage}-{'bf16' if bf16 else 'fp32'}"
        run(config(stage, out, world, student, teacher_dir, bf16, **sections))
        results[bf16] = (out, list(cls.seen))
    (fp32_out, fp32_seen), (bf16_out, bf16_seen) = results[False], results[True]
    assert {d for d, _ in fp32_seen} == {torch.float32}
    assert {d for d, _ in bf16_seen} == {torch.bfloat16}  # the student's forward ran under bf16 autocast ...
    assert {d for _, d in bf16_seen} == {torch.float32}  # ... and the loss stayed fp32
    for a, b in zip(logs(bf16_out), logs(fp32_out), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (a, b)
    w16, w32 = weights(bf16_out), weights(fp32_out)
    num = sum(float((w16[n] - w32[n]).double().pow(2).sum()) for n in w32)
    den = sum(float((w32[n] - start[n]).double().pow(2).sum()) for n in w32)
    assert den > 0
    rel = (num / den) ** 0.5
    assert rel < WEIGHT_RTOL, rel
    assert all(p.dtype == torch.float32 for p in w16.values())  # saved from the fp32 master weights
    loss_gap = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(logs(bf16_out), logs(fp32_out)))
    print(f"\n{stage} bf16 vs fp32: losses within {loss_gap:.1e} (relative), weights {rel:.1e} of the update")
    return bf16_out


@pytest.mark.slow
def test_stage1b_and_stage2_under_bf16_match_fp32(tmp_path, scenes_world, teacher_dir, student_dir, monkeypatch):
    upcycled = {"num_experts": 4, "top_k": 2, "seed": 3}
    start = {
        n: p.detach().float()
        for n, p in upcycle(load_model(student_dir).model, 4, 2, "every-other", seed=3).named_parameters()
    }
    s1b = compare(
        tmp_path,
        "mimic_sparse",
        sparse_stage.run,
        "SparseMimicTrainer",
        sparse_stage,
        {"path": str(student_dir)},
        start,
        scenes_world,
        teacher_dir,
        monkeypatch,
        upcycle=upcycled,
    )
    # Stage 2 from the bf16 stage-1b student.
    start2 = weights(s1b)
    compare(
        tmp_path,
        "preference",
        preference_stage.run,
        "PreferenceTrainer",
        preference_stage,
        {"path": str(s1b)},
        start2,
        scenes_world,
        teacher_dir,
        monkeypatch,
    )

    # The saved student loads and generates in bf16 and in fp16.
    for dtype in (torch.bfloat16, torch.float16):
        loaded = load_model(s1b, dtype=dtype)
        assert {p.dtype for p in loaded.model.parameters()} == {dtype}
        batch = vlm_batch(loaded.processor, n=1, size=48)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.no_grad():
            logits = loaded.model(**batch).logits
            new = loaded.model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        assert new.shape == (1, batch["input_ids"].shape[1] + 4)
