"""Per-token divergences between a student and a teacher distribution, and the masked KD loss.

Everything here is a pure tensor function. Inputs of any floating dtype are computed in at least
fp32 (bf16/fp16 are upcast; fp64 stays fp64 so tests can compare in double precision).

Zero-probability bins (log-prob ``-inf``) are first-class: a coarse top-k distribution's "rest" bin
has zero mass when k covers the whole vocabulary, and a teacher may mask tokens. The convention
``0 * log 0 = 0`` is applied with a double ``masked_fill`` so neither the value nor the gradient is
NaN (a single ``where`` would still back-propagate ``0 * inf``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCE_KINDS: tuple[str, ...] = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "tvd",
    "skew_kl",
    "skew_reverse_kl",
)

IGNORE_INDEX = -100

# A teacher's top-k rest bin never gets less mass than this (see teacher_topk_to_coarse).
DEFAULT_MIN_REST_MASS = 1e-6
# Top-k log-probs whose probabilities sum above 1 by more than this are not log-probabilities.
_TOPK_MASS_TOLERANCE = 0.01


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_kind(kind: str) -> None:
    """Raise ValueError unless ``kind`` is one of DIVERGENCE_KINDS."""
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; valid kinds: {', '.join(DIVERGENCE_KINDS)}")


def check_coefficients(kind: str, beta: float, alpha: float) -> None:
    """Validate the mixture coefficients that ``kind`` uses."""
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if kind in ("skew_kl", "skew_reverse_kl") and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{kind} alpha must be in [0, 1], got {alpha}")


def _kl_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) summed over the last dim, with 0 * log(0 / q) = 0. Shapes [..., K] -> [...]."""
    zero = torch.isneginf(logp)
    if not bool(zero.any()):
        return (logp.exp() * (logp - logq)).sum(-1)
    # Replace -inf by 0 *before* the arithmetic so the masked-out branch has finite gradients.
    logp_safe = logp.masked_fill(zero, 0.0)
    logq_safe = logq.masked_fill(zero, 0.0)
    terms = logp_safe.exp() * (logp_safe - logq_safe)
    return terms.masked_fill(zero, 0.0).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w * a + (1 - w) * b) elementwise from log a and log b; -inf only where both are -inf."""
    if weight_a == 1.0:
        return log_a
    if weight_a == 0.0:
        return log_b
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    has_zero = bool(both_zero.any())
    if has_zero:
        log_a = log_a.masked_fill(both_zero, 0.0)
        log_b = log_b.masked_fill(both_zero, 0.0)
    mixed = torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))
    return mixed.masked_fill(both_zero, float("-inf")) if has_zero else mixed


def per_token_divergence(
    student_logp: Tensor,
    teacher_logp: Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Divergence between two distributions per position.

    Args:
        student_logp: [..., K] log-probabilities of the student (K = vocab, or k+1 coarse bins).
        teacher_logp: [..., K] log-probabilities of the teacher over the same support.
        kind: one of DIVERGENCE_KINDS, with p_T = exp(teacher_logp), p_S = exp(student_logp):
            "forward_kl"      KL(p_T || p_S)
            "reverse_kl"      KL(p_S || p_T)
            "jsd"             TRL GKD's generalised JSD: with m = beta*p_T + (1-beta)*p_S,
                              beta*KL(p_T || m) + (1-beta)*KL(p_S || m); beta=0 is exactly
                              forward KL, beta=1 exactly reverse KL.
            "tvd"             0.5 * sum |p_T - p_S|
            "skew_kl"         DistiLLM skew KL: KL(p_T || alpha*p_T + (1-alpha)*p_S)
            "skew_reverse_kl" KL(p_S || alpha*p_S + (1-alpha)*p_T)
        beta: jsd interpolation coefficient in [0, 1].
        alpha: skew coefficient in [0, 1].

    Returns:
        [...] divergence per position (summed over the last dim), fp32 (fp64 if an input is fp64).
        Bins with zero probability contribute 0; the value is +inf only where the divergence truly
        is infinite (e.g. forward KL with p_T > 0 and p_S = 0).
    """
    check_kind(kind)
    check_coefficients(kind, beta, alpha)
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"student and teacher log-probs must have the same shape, got "
            f"{tuple(student_logp.shape)} and {tuple(teacher_logp.shape)}"
        )
    dtype = _compute_dtype(student_logp, teacher_logp)
    s = student_logp.to(dtype)
    t = teacher_logp.to(dtype)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl_terms(t, s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl_terms(s, t)
    if kind == "jsd":
        mixture = _log_mixture(t, s, beta)
        return beta * _kl_terms(t, mixture) + (1.0 - beta) * _kl_terms(s, mixture)
    if kind == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    if kind == "skew_kl":
        return _kl_terms(t, _log_mixture(t, s, alpha))
    # skew_reverse_kl
    return _kl_terms(s, _log_mixture(s, t, alpha))


def shift_for_next_token(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align causal-LM logits with the tokens they predict.

    The logits at position t predict token t+1, so the pairs are ``logits[:, :-1]`` with
    ``labels[:, 1:]`` and the KD mask is ``labels[:, 1:] != -100``. (LLaVA-MoD's official code
    masks the unshifted logits with the unshifted labels, an off-by-one; see docs/method.md.)

    Args:
        logits: [B, T, V].
        labels: [B, T] token ids, -100 where no loss is taken.

    Returns:
        (logits[:, :-1] [B, T-1, V], labels[:, 1:] [B, T-1]) as views.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return logits[:, :-1], labels[:, 1:]


def _normaliser(num_items: int | float | Tensor | None, counted: Tensor, dtype: torch.dtype) -> Tensor:
    """The loss denominator: num_items (whole accumulated batch) or the counted positions here."""
    if num_items is None:
        return counted.to(dtype).clamp_min(1.0)
    if isinstance(num_items, Tensor):
        return num_items.to(device=counted.device, dtype=dtype)
    if num_items <= 0:
        raise ValueError(f"num_items must be positive, got {num_items}")
    return torch.tensor(float(num_items), dtype=dtype, device=counted.device)


def divergence_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    num_items: int | float | Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Masked knowledge-distillation loss on full logits.

    Both logit tensors are divided by ``temperature`` and log-softmaxed in fp32. No T^2 factor is
    applied (TRL's GKD convention): the loss is the plain divergence between the tempered
    distributions. Shifting is the caller's job (see shift_for_next_token).

    Args:
        student_logits: [..., V].
        teacher_logits: [..., V], same shape. A teacher with extra (padding) vocabulary rows must be
            sliced to V by the caller, who decides whether that is allowed.
        kind, beta, alpha: see per_token_divergence.
        mask: [...] bool, True where the position counts; None counts every position.
        temperature: > 0.
        num_items: denominator. Give the number of counted positions of the whole accumulated
            batch so that gradient accumulation does not change the loss; None uses the number of
            counted positions in this call (at least 1).

    Returns:
        [] scalar: sum of per-position divergences over counted positions / denominator.
    """
    check_kind(kind)
    check_coefficients(kind, beta, alpha)
    if student_logits.shape != teacher_logits.shape:
        if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            raise ValueError(
                f"student vocabulary {student_logits.shape[-1]} != teacher vocabulary "
                f"{teacher_logits.shape[-1]}; slice the teacher's extra (padding) columns before "
                f"calling divergence_loss if they are meant to be dropped"
            )
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = student_logits.shape[-1]
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal the logits' leading shape "
                f"{tuple(student_logits.shape[:-1])}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        # Select first: masked positions cost no softmax at all.
        student_rows = student_logits[mask]
        teacher_rows = teacher_logits[mask]
    else:
        student_rows = student_logits.reshape(-1, vocab)
        teacher_rows = teacher_logits.reshape(-1, vocab)

    dtype = _compute_dtype(student_logits, teacher_logits)
    student_logp = F.log_softmax(student_rows.to(dtype) / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_rows.to(dtype) / temperature, dim=-1)
    per_position = per_token_divergence(student_logp, teacher_logp, kind, beta=beta, alpha=alpha)
    counted = torch.tensor(per_position.shape[0], device=per_position.device)
    return per_position.sum() / _normaliser(num_items, counted, dtype)


def coarse_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """Student log-probs on the coarse support {ids..., rest}.

    Args:
        logits: [..., V] full logits (already divided by the temperature).
        ids: [..., k] distinct token ids in [0, V) (e.g. the teacher's top-k).

    Returns:
        [..., k+1]: log p(ids[j]) for j < k, and log of the remaining mass in the last bin,
        computed as logsumexp(non-selected logits) - logsumexp(all logits) (never 1 - sum, which
        cancels catastrophically). The rest bin is -inf when k == V.
    """
    if logits.shape[:-1] != ids.shape[:-1]:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} must share leading dims")
    vocab, k = logits.shape[-1], ids.shape[-1]
    if k > vocab:
        raise ValueError(f"k={k} ids exceed the vocabulary size {vocab}")
    logits = logits.to(_compute_dtype(logits))
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
    selected = logits.gather(-1, ids) - log_total
    if k == vocab:
        rest = torch.full_like(log_total, float("-inf"))
        return torch.cat([selected, rest], dim=-1)
    others = logits.scatter(-1, ids, float("-inf"))
    # Rows whose non-selected logits are all -inf (masked vocabulary) would give a NaN gradient
    # through logsumexp; compute those on zeros and put -inf back afterwards.
    none_left = torch.isneginf(others).all(dim=-1, keepdim=True)
    has_empty = bool(none_left.any())
    if has_empty:
        others = others.masked_fill(none_left, 0.0)
    rest = torch.logsumexp(others, dim=-1, keepdim=True) - log_total
    if has_empty:
        rest = rest.masked_fill(none_left, float("-inf"))
    return torch.cat([selected, rest], dim=-1)


def teacher_topk_to_coarse(
    topk_logprobs: Tensor,
    *,
    full_vocab: bool = False,
    min_rest_mass: float = DEFAULT_MIN_REST_MASS,
) -> Tensor:
    """Teacher log-probs on the coarse support {top-k..., rest}.

    Args:
        topk_logprobs: [..., k] the teacher's log-probs (normalised over the full, student-sized
            vocabulary, at the distillation temperature) of its top-k tokens.
        full_vocab: True when k equals the vocabulary size: the rest bin is then exactly -inf.
        min_rest_mass: otherwise the rest mass 1 - sum(exp) (computed as -expm1(logsumexp), which
            is exact near 1) is clamped to at least this. Why not -inf when the top-k mass rounds
            to 1: the student's rest bin always has positive mass when k < V, so reverse-KL-type
            divergences would be +inf and training would NaN; a floor of 1e-6 changes the
            distribution by at most 1e-6 and only matters where the cache's rounding already did.

    Returns:
        [..., k+1] fp32 (fp64 for fp64 input) log-probs.
    """
    lp = topk_logprobs.to(_compute_dtype(topk_logprobs))
    log_mass = torch.logsumexp(lp, dim=-1, keepdim=True)
    if full_vocab:
        rest = torch.full_like(log_mass, float("-inf"))
        return torch.cat([lp, rest], dim=-1)
    if lp.numel() and float(log_mass.max()) > math.log1p(_TOPK_MASS_TOLERANCE):
        raise ValueError(
            f"teacher top-k probabilities sum to {float(log_mass.max().exp()):.4g} > 1; pass "
            f"log-probabilities (log_softmax over the vocabulary), not raw logits"
        )
    rest_mass = (-torch.expm1(log_mass)).clamp_min(min_rest_mass)
    return torch.cat([lp, rest_mass.log()], dim=-1)
