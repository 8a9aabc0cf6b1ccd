"""The teacher's side of a KD loss, for the rows (response positions) the student is scored on.

    TeacherHidden  a live teacher: its final hidden states and LM head; logits are made chunk by chunk
    TeacherTopK    a cached teacher: the top-k token ids and their log-probs per row

`rows(start, end)` gives a chunk of rows in the same form, so the chunked loss passes the typed
teacher along and tells the forms apart with `isinstance` alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """fp32 logits [C, V]: the matmul runs in the model's dtype (as its own lm_head would); with
    fp32 inputs they are written into ``out`` when given (a reused workspace buffer)."""
    if out is None or hidden.dtype != torch.float32 or weight.dtype != torch.float32:
        return F.linear(hidden, weight, bias).float()
    torch.mm(hidden, weight.t(), out=out)
    return out if bias is None else out.add_(bias)


@dataclass
class TeacherHidden:
    """The teacher's final hidden states and LM head; logits are computed chunk by chunk.

    hidden [N, Ht], head_weight [Vt, Ht], head_bias [Vt] or None; Vt >= student V.
    """

    hidden: Tensor
    head_weight: Tensor
    head_bias: Tensor | None = None

    def rows(self, start: int, end: int) -> TeacherHidden:
        return TeacherHidden(self.hidden[start:end], self.head_weight, self.head_bias)  # the head is shared

    def detached(self) -> TeacherHidden:
        bias = None if self.head_bias is None else self.head_bias.detach()
        return TeacherHidden(self.hidden.detach(), self.head_weight.detach(), bias)

    def logits(self, vocab: int, out: Tensor | None = None) -> Tensor:
        """fp32 logits [N, vocab]: the teacher's rows beyond the student's vocabulary are dropped."""
        bias = None if self.head_bias is None else self.head_bias[:vocab]
        return head_logits(self.hidden, self.head_weight[:vocab], bias, out)


@dataclass
class TeacherTopK:
    """A cached sparse teacher: ids [N, k] long (distinct per row, < student V) and their
    log-probs [N, k], normalised over the student-sized vocabulary at the distillation temperature
    (see topk_from_logits)."""

    ids: Tensor
    logprobs: Tensor

    def rows(self, start: int, end: int) -> TeacherTopK:
        return TeacherTopK(self.ids[start:end], self.logprobs[start:end])

    def detached(self) -> TeacherTopK:
        return TeacherTopK(self.ids, self.logprobs.detach())


Teacher = TeacherHidden | TeacherTopK
