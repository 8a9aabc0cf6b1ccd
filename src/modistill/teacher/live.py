"""A live teacher: a frozen model run beside the student, on its own rendering of each batch."""

from __future__ import annotations

import torch
from torch import nn

from modistill.errors import UserError
from modistill.losses.teachers import TeacherHidden
from modistill.runtime.inputs import ResponseStates, model_inputs, output_head, response_states, to_model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a teacher is never trained and never saved with the student."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_aligned(
    student: ResponseStates,
    teacher_targets: torch.Tensor,
    teacher_counts: torch.Tensor,
    sample_ids,
    who: str = "teacher",
) -> None:
    """The teacher's response tokens must be the student's, sample by sample (KD aligns by position)."""
    if torch.equal(student.counts.cpu(), teacher_counts.cpu()) and torch.equal(
        student.targets.cpu(), teacher_targets.cpu()
    ):
        return
    ids = list(sample_ids) if sample_ids is not None else []
    s_counts, t_counts = student.counts.tolist(), teacher_counts.tolist()
    for i, (a, b) in enumerate(zip(s_counts, t_counts)):
        if a != b:
            name = ids[i] if i < len(ids) else i
            raise UserError(
                f"sample {name}: the {who} has {b} response tokens, the student {a}; "
                f"both must render the same answer (same tokenizer, no truncation of the answer)"
            )
    raise UserError(
        f"samples {ids[:4]}: the {who}'s response tokens differ from the student's; "
        f"teacher and student must share the tokenizer"
    )


class LiveTeacher:
    """Runs the teacher on a batch and hands the fused loss its hidden states and LM head."""

    def __init__(self, model: nn.Module, student_vocab_rows: int, device: torch.device | str | None = None):
        self.model = freeze(model)
        if device is not None:
            self.model.to(device)
        self.rows = student_vocab_rows

    def forward(self, batch: dict) -> ResponseStates:
        inputs, labels = to_model(self.model, *model_inputs(batch, prefix="teacher_"))
        with torch.no_grad():
            return response_states(self.model, inputs, labels)

    def targets(self, batch: dict, student: ResponseStates) -> TeacherHidden:
        states = self.forward(batch)
        check_aligned(student, states.targets, states.counts, batch.get("sample_ids"))
        weight, bias = output_head(self.model)
        device = student.hidden.device
        # Padding rows beyond the student's vocabulary were cleared by check_vocab_compatible.
        return TeacherHidden(
            states.hidden.to(device),
            weight[: self.rows].to(device),
            None if bias is None else bias[: self.rows].to(device),
        )
