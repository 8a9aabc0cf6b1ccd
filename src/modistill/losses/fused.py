"""Chunked LM-head + distillation loss that never holds full-vocabulary logits.

With a 152k vocabulary the logits of a batch (tokens x V x 4 bytes) dominate memory: naive KD keeps
the student's logits, both log-softmaxes and several same-sized temporaries alive until backward.
Here the response rows are processed ``chunk_size`` at a time and each chunk's gradient is computed
during the forward pass and pushed through the LM head at once (modistill.losses.chunked, as
Liger-Kernel's fused linear losses do). Peak extra memory is a few ``chunk_size x V`` buffers plus
one head-sized gradient; each LM-head matmul runs once, as in the plain path.

The teacher is treated as a constant: its tensors are detached and its logits computed under
``no_grad``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from modistill.losses.chunked import (
    Chunks,
    FrozenHeadTokenLogps,
    FusedHeadLoss,
    chunk_token_logps,
    chunked_pass,
    sums_from_logits,
)
from modistill.losses.divergence import IGNORE_INDEX, _normaliser, check_coefficients, check_kind
from modistill.losses.teachers import Teacher, TeacherHidden, TeacherTopK


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, who: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{who} hidden must be [N, H] and head weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{who} hidden size {hidden.shape[1]} != head weight input size {weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{who} head bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _check_teacher(teacher: Teacher, rows: int, vocab: int) -> None:
    def too_small(teacher_vocab: int) -> ValueError:
        return ValueError(
            f"teacher vocabulary {teacher_vocab} is smaller than the student's {vocab}; the "
            f"teacher must cover every student token id"
        )

    if isinstance(teacher, TeacherHidden):
        _check_head(teacher.hidden, teacher.head_weight, teacher.head_bias, "teacher")
        if teacher.hidden.shape[0] != rows:
            raise ValueError(f"teacher hidden has {teacher.hidden.shape[0]} rows, the student {rows}")
        if teacher.head_weight.shape[0] < vocab:
            raise too_small(teacher.head_weight.shape[0])
    elif isinstance(teacher, TeacherTopK):
        ids, lps = teacher.ids, teacher.logprobs
        if ids.dim() != 2 or ids.shape[0] != rows or ids.shape != lps.shape:
            raise ValueError(
                f"teacher top-k ids and logprobs must both be [{rows}, k], got {tuple(ids.shape)} "
                f"and {tuple(lps.shape)}"
            )
        if ids.dtype != torch.long:
            raise ValueError(f"teacher top-k ids must be int64, got {ids.dtype}")
        k = ids.shape[1]
        if k == 0 or k > vocab:
            raise ValueError(f"teacher top-k must have 1 <= k <= {vocab} ids per row, got {k}")
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"teacher top-k ids must lie in [0, {vocab}) (the student vocabulary), found "
                    f"{low if low < 0 else high}"
                )
            ordered = ids.sort(dim=-1).values
            if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
                raise ValueError("teacher top-k ids must be distinct within each row")
    else:
        raise ValueError(f"teacher must be TeacherHidden or TeacherTopK, got {type(teacher).__name__}")


def fused_distill_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    *,
    teacher: Teacher | None,
    labels: Tensor | None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    chunk_size: int = 256,
    num_items: int | float | Tensor | None = None,
    student_head_bias: Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> dict[str, Tensor]:
    """KD (+ CE) loss from the student's final hidden states, without full-vocabulary logits.

    Rows are the already selected, already shifted response positions: row i's hidden state
    predicts ``labels[i]``. A row counts for both KD and CE unless ``labels[i] == -100``; with
    ``labels=None`` every row counts for KD.

    Args:
        student_hidden: [N, H] (any float dtype; the loss is fp32).
        student_head_weight: [V, H] the student's LM head.
        teacher: TeacherHidden / TeacherTopK for the same N rows, or None (only
            with kd_weight == 0). Teacher columns beyond V are dropped before the softmax.
        labels: [N] int64 next-token ids or -100, or None (only with ce_weight == 0).
        kind, beta, alpha: divergence, see per_token_divergence.
        temperature: applied to student and teacher logits for KD (TeacherTopK log-probs must
            already be at this temperature); CE is always at T=1. No T^2 factor.
        ce_weight, kd_weight: loss = kd_weight * kd + ce_weight * ce.
        chunk_size: rows per chunk (the peak holds a few chunk_size x V fp32 buffers).
        num_items: denominator for both parts (counted rows of the whole accumulated batch, so
            gradient accumulation does not change the loss); None uses the counted rows here.
        student_head_bias: [V] or None.

    Returns:
        {"loss": [], "kd": [], "ce": []} fp32 scalars. "kd" is 0 when teacher is None and "ce" is 0
        when labels is None (those parts are not computed).
    """
    _check_head(student_hidden, student_head_weight, student_head_bias, "student")
    _check_chunk_size(chunk_size)
    check_kind(kind)
    check_coefficients(kind, beta, alpha)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows, vocab = student_hidden.shape[0], student_head_weight.shape[0]
    if teacher is None and kd_weight != 0:
        raise ValueError("kd_weight != 0 needs a teacher; pass teacher=... or kd_weight=0")
    if labels is None and ce_weight != 0:
        raise ValueError("ce_weight != 0 needs labels; pass labels=... or ce_weight=0")
    if teacher is not None:
        _check_teacher(teacher, rows, vocab)
    if labels is not None:
        if labels.shape != (rows,):
            raise ValueError(f"labels must be [{rows}], got {tuple(labels.shape)}")
        if labels.dtype != torch.long:
            raise ValueError(f"labels must be int64, got {labels.dtype}")
        valid = labels[labels != IGNORE_INDEX]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
            raise ValueError(f"labels must be -100 or in [0, {vocab}), got out-of-range ids")
        counted = labels != IGNORE_INDEX
    else:
        counted = torch.ones(rows, dtype=torch.bool, device=student_hidden.device)

    chunks = Chunks(
        size=chunk_size,
        labels=labels,
        counted=counted,
        teacher=None if teacher is None else teacher.detached(),
        sums_fn=functools.partial(sums_from_logits, kind=kind, temperature=temperature, beta=beta, alpha=alpha),
        weights=(kd_weight, ce_weight),
        kind=kind,
        temperature=temperature,
        vocab=vocab,
    )
    head = (student_hidden, student_head_weight, student_head_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in head):
        loss_sum, kd_sum, ce_sum = FusedHeadLoss.apply(*head, chunks)
    else:
        sums = chunked_pass(*head, chunks, None, (False, False, False))[0]
        loss_sum, kd_sum, ce_sum = kd_weight * sums[0] + ce_weight * sums[1], sums[0], sums[1]

    denominator = _normaliser(num_items, counted.sum(), torch.float32)
    return {"loss": loss_sum / denominator, "kd": kd_sum / denominator, "ce": ce_sum / denominator}


def chunked_token_logps(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 256,
    head_bias: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """log p(target) per row from hidden states, chunked: full-vocabulary logits never exist.

    With a frozen head (weight and bias need no gradient) the per-row gradient is computed in
    forward (FrozenHeadTokenLogps); with a trainable head each chunk is checkpointed (the logits
    are recomputed in backward); without gradients the chunks are simply evaluated.

    Args:
        hidden: [N, H]; head_weight: [V, H]; head_bias: [V] or None.
        targets: [N] int64 next-token ids; -100 rows get log-prob 0.

    Returns:
        [N] fp32 log-probabilities, differentiable w.r.t. hidden, weight and bias.
    """
    _check_head(hidden, head_weight, head_bias, "policy")
    _check_chunk_size(chunk_size)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows, vocab = hidden.shape[0], head_weight.shape[0]
    if targets.shape != (rows,) or targets.dtype != torch.long:
        raise ValueError(f"targets must be int64 [{rows}], got {targets.dtype} {tuple(targets.shape)}")
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise ValueError(f"targets must be -100 or in [0, {vocab})")
    if rows == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    head_needs_grad = any(t is not None and t.requires_grad for t in (head_weight, head_bias))
    if torch.is_grad_enabled() and hidden.requires_grad and not head_needs_grad:
        return FrozenHeadTokenLogps.apply(hidden, head_weight, head_bias, targets, chunk_size, temperature)
    chunk_fn = functools.partial(chunk_token_logps, temperature=temperature)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or head_needs_grad)):
        with torch.no_grad():
            return torch.cat(
                [
                    chunk_fn(
                        hidden[start : start + chunk_size], head_weight, head_bias, targets[start : start + chunk_size]
                    )
                    for start in range(0, rows, chunk_size)
                ]
            )
    pieces = [
        checkpoint(
            chunk_fn,
            hidden[start : start + chunk_size],
            head_weight,
            head_bias,
            targets[start : start + chunk_size],
            use_reentrant=False,
        )
        for start in range(0, rows, chunk_size)
    ]
    return torch.cat(pieces)


def topk_from_logits(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The k most likely tokens per row and their log-probs at ``temperature`` (for the cache).

    The log-probs are normalised over all columns given, so slice a teacher's extra (padding)
    vocabulary rows off first. Top-k is taken on the raw logits (same order as the log-probs), so
    no full [N, V] log-softmax is kept, only its [N, 1] normaliser.

    Args:
        logits: [N, V] (or [..., V]).
        k: 1 <= k <= V.

    Returns:
        (ids [N, k] int64, logprobs [N, k] fp32), sorted by decreasing probability.
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    values, ids = logits.topk(k, dim=-1)
    log_total = torch.logsumexp(logits.float() / temperature, dim=-1, keepdim=True)
    return ids, values.float() / temperature - log_total
