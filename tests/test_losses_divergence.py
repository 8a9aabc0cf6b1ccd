"""Divergences and the masked KD loss against independent references (F.kl_div, float64 numpy, TRL)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modistill.losses import (
    DIVERGENCE_KINDS,
    coarse_logprobs,
    divergence_loss,
    per_token_divergence,
    shift_for_next_token,
    teacher_topk_to_coarse,
    topk_from_logits,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

BETA = 0.3
ALPHA = 0.2


# ---------------------------------------------------------------- float64 numpy reference
def np_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sum p log(p/q) with 0 log 0 = 0."""
    safe_p = np.where(p > 0, p, 1.0)
    safe_q = np.where(p > 0, q, 1.0)
    with np.errstate(divide="ignore"):
        terms = np.where(p > 0, p * (np.log(safe_p) - np.log(safe_q)), 0.0)
    return terms.sum(-1)


def np_divergence(ps: np.ndarray, pt: np.ndarray, kind: str, beta: float, alpha: float) -> np.ndarray:
    """Written from the definitions, on probabilities (student ps, teacher pt)."""
    if kind == "forward_kl":
        return np_kl(pt, ps)
    if kind == "reverse_kl":
        return np_kl(ps, pt)
    if kind == "jsd":
        if beta == 0:  # TRL's convention at the end points
            return np_kl(pt, ps)
        if beta == 1:
            return np_kl(ps, pt)
        m = beta * pt + (1 - beta) * ps
        return beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)
    if kind == "tvd":
        return 0.5 * np.abs(pt - ps).sum(-1)
    if kind == "skew_kl":
        return np_kl(pt, alpha * pt + (1 - alpha) * ps)
    if kind == "skew_reverse_kl":
        return np_kl(ps, alpha * ps + (1 - alpha) * pt)
    raise AssertionError(kind)


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def random_logits(*shape: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=gen) * 2.0
    teacher = torch.randn(*shape, generator=gen) * 2.0
    return student, teacher


# ---------------------------------------------------------------- per-token values
def test_kl_directions_match_f_kl_div() -> None:
    student, teacher = random_logits(4, 5, 9, seed=0)
    s, t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    forward = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    reverse = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(per_token_divergence(s, t, "forward_kl"), forward)
    torch.testing.assert_close(per_token_divergence(s, t, "reverse_kl"), reverse)
    torch.testing.assert_close(per_token_divergence(s, t, "jsd", beta=0.0), forward)
    torch.testing.assert_close(per_token_divergence(s, t, "jsd", beta=1.0), reverse)
    assert not torch.allclose(forward, reverse)


@pytest.mark.parametrize("use_num_items", [False, True])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_divergence_loss_matches_numpy(kind: str, use_num_items: bool) -> None:
    temperature = 1.7
    student, teacher = random_logits(3, 7, 11, seed=1)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) > 0.3
    num_items = int(mask.sum()) + 4 if use_num_items else None
    loss = divergence_loss(
        student,
        teacher,
        kind,
        mask=mask,
        temperature=temperature,
        num_items=num_items,
        beta=BETA,
        alpha=ALPHA,
    )
    ps = np_softmax(as_np(student) / temperature)
    pt = np_softmax(as_np(teacher) / temperature)
    per_token = np_divergence(ps, pt, kind, BETA, ALPHA)
    m = mask.numpy()
    expected = per_token[m].sum() / (num_items if use_num_items else m.sum())
    assert loss.dtype == torch.float32 and loss.shape == ()
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_generalized_jsd(beta: float) -> None:
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher = random_logits(2, 6, 13, seed=3)
    labels = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(4))
    labels[0, :2] = -100
    labels[1, 4] = -100
    mask = labels != -100
    ours = divergence_loss(student, teacher, "jsd", mask=mask, temperature=2.0, beta=beta)
    trl = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=2.0)
    torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-7)
    ours_n = divergence_loss(student, teacher, "jsd", mask=mask, temperature=2.0, beta=beta, num_items=17)
    trl_n = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels=labels, beta=beta, temperature=2.0, num_items_in_batch=17
    )
    torch.testing.assert_close(ours_n, trl_n, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_gradient_accumulation_invariance(kind: str) -> None:
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(8, 6, 4, generator=gen)
    teacher = torch.randn(8, 6, 13, generator=gen)
    mask = torch.rand(8, 6, generator=gen) > 0.4
    mask[:4, 0] = True  # the halves have different token counts
    head = torch.randn(13, 4, generator=gen, requires_grad=True)
    total = int(mask.sum())

    full = divergence_loss(hidden @ head.T, teacher, kind, mask=mask, temperature=1.3, num_items=total)
    (full_grad,) = torch.autograd.grad(full, head)

    halves, grads = [], []
    for part in (slice(0, 4), slice(4, 8)):
        loss = divergence_loss(
            hidden[part] @ head.T,
            teacher[part],
            kind,
            mask=mask[part],
            temperature=1.3,
            num_items=total,
        )
        halves.append(loss)
        grads.append(torch.autograd.grad(loss, head)[0])
    torch.testing.assert_close(halves[0] + halves[1], full, rtol=1e-5, atol=0)
    torch.testing.assert_close(grads[0] + grads[1], full_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- zero-probability bins
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_zero_mass_bins_give_no_nan(kind: str) -> None:
    student_logits, teacher_logits = random_logits(3, 6, seed=6)
    student_logits.requires_grad_(True)
    teacher_logits.requires_grad_(True)
    student_zero = torch.zeros(3, 6, dtype=torch.bool)
    teacher_zero = torch.zeros(3, 6, dtype=torch.bool)
    student_zero[:, 0] = teacher_zero[:, 0] = True  # both zero (an empty "rest" bin)
    if kind != "reverse_kl":
        teacher_zero[:, 1] = True  # only the teacher is zero: finite for these kinds
    if kind != "forward_kl":
        student_zero[:, 2] = True  # only the student is zero
    s = F.log_softmax(student_logits.masked_fill(student_zero, float("-inf")), -1)
    t = F.log_softmax(teacher_logits.masked_fill(teacher_zero, float("-inf")), -1)

    value = per_token_divergence(s, t, kind, beta=BETA, alpha=ALPHA)
    expected = np_divergence(as_np(s.exp()), as_np(t.exp()), kind, BETA, ALPHA)
    np.testing.assert_allclose(value.detach().numpy(), expected, rtol=1e-5, atol=1e-7)
    student_grad, teacher_grad = torch.autograd.grad(value.sum(), [student_logits, teacher_logits])
    assert torch.isfinite(student_grad).all() and torch.isfinite(teacher_grad).all()
    assert student_grad[~student_zero].abs().sum() > 0
    assert (student_grad[student_zero] == 0).all()


def test_coarse_rest_bin_with_every_other_logit_masked() -> None:
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(7))
    logits = logits.masked_fill(torch.tensor([False, False, True, True, True]), float("-inf"))
    logits.requires_grad_(True)
    ids = torch.tensor([[0, 1], [1, 0]])
    coarse = coarse_logprobs(logits, ids)
    assert torch.isneginf(coarse[:, -1]).all()
    teacher = teacher_topk_to_coarse(torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.2]])))
    loss = per_token_divergence(coarse, teacher, "skew_reverse_kl").sum()
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ---------------------------------------------------------------- top-k coarse bins
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_topk_with_k_equal_vocab_equals_full_divergence(kind: str) -> None:
    temperature = 1.3
    student, teacher = random_logits(5, 12, seed=8)
    student.requires_grad_(True)
    ids, teacher_lp = topk_from_logits(teacher, 12, temperature)
    coarse = per_token_divergence(
        coarse_logprobs(student / temperature, ids),
        teacher_topk_to_coarse(teacher_lp, full_vocab=True),
        kind,
        beta=BETA,
        alpha=ALPHA,
    )
    full = per_token_divergence(
        F.log_softmax(student / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        kind,
        beta=BETA,
        alpha=ALPHA,
    )
    torch.testing.assert_close(coarse, full, rtol=1e-5, atol=1e-6)
    (grad_coarse,) = torch.autograd.grad(coarse.sum(), student)
    (grad_full,) = torch.autograd.grad(full.sum(), student)
    torch.testing.assert_close(grad_coarse, grad_full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_topk_small_k_matches_float64_bins(kind: str) -> None:
    temperature, k = 0.8, 3
    student, teacher = random_logits(4, 10, seed=9)
    ids, teacher_lp = topk_from_logits(teacher, k, temperature)
    ours = per_token_divergence(
        coarse_logprobs(student / temperature, ids),
        teacher_topk_to_coarse(teacher_lp),
        kind,
        beta=BETA,
        alpha=ALPHA,
    )
    ps = np_softmax(as_np(student) / temperature)
    pt = np_softmax(as_np(teacher) / temperature)
    top = np.argsort(-pt, axis=-1)[:, :k]
    np.testing.assert_array_equal(ids.numpy(), top)

    def bins(p: np.ndarray) -> np.ndarray:
        chosen = np.take_along_axis(p, top, -1)
        return np.concatenate([chosen, 1.0 - chosen.sum(-1, keepdims=True)], -1)

    expected = np_divergence(bins(ps), bins(pt), kind, BETA, ALPHA)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_teacher_rest_bin_floor_and_raw_logits_rejected() -> None:
    # Rounding can make a cached top-k sum slightly above 1: the rest bin is floored, not NaN.
    over_one = torch.log(torch.tensor([[0.6, 0.4 + 1e-4]]))
    coarse = teacher_topk_to_coarse(over_one, min_rest_mass=1e-6)
    assert torch.isfinite(coarse).all()
    np.testing.assert_allclose(coarse[0, -1].exp().item(), 1e-6, rtol=1e-4)
    exact = teacher_topk_to_coarse(torch.log(torch.tensor([[0.5, 0.25]])))
    np.testing.assert_allclose(exact[0, -1].exp().item(), 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match="log-probabilities"):
        teacher_topk_to_coarse(torch.tensor([[3.0, 1.0]]))


# ---------------------------------------------------------------- dtypes, shapes, shift
def test_bf16_inputs_give_fp32_loss() -> None:
    student, teacher = random_logits(2, 5, 17, seed=10)
    student_bf16 = student.bfloat16().requires_grad_(True)
    loss = divergence_loss(student_bf16, teacher.bfloat16(), "forward_kl", temperature=2.0)
    reference = divergence_loss(student.bfloat16().float(), teacher.bfloat16().float(), temperature=2.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    loss.backward()
    assert student_bf16.grad is not None and student_bf16.grad.dtype == torch.bfloat16
    per_token = per_token_divergence(
        F.log_softmax(student, -1).bfloat16(), F.log_softmax(teacher, -1).bfloat16(), "tvd"
    )
    assert per_token.dtype == torch.float32


def test_bad_inputs_raise_clear_errors() -> None:
    student, teacher = random_logits(2, 3, 8, seed=11)
    with pytest.raises(ValueError, match="vocabulary 8 != teacher vocabulary 9"):
        divergence_loss(student, torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="same shape"):
        divergence_loss(student, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="mask shape"):
        divergence_loss(student, teacher, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        divergence_loss(student, teacher, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="valid kinds: forward_kl, reverse_kl, jsd"):
        divergence_loss(student, teacher, "kl")
    with pytest.raises(ValueError, match="temperature"):
        divergence_loss(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        divergence_loss(student, teacher, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        per_token_divergence(student, teacher, "skew_kl", alpha=-0.1)
    with pytest.raises(ValueError, match="num_items"):
        divergence_loss(student, teacher, num_items=0)
    with pytest.raises(ValueError, match="exceed the vocabulary"):
        coarse_logprobs(student, torch.zeros(2, 3, 9, dtype=torch.long))


def test_shift_pairs_logits_with_next_token() -> None:
    labels = torch.tensor([[-100, -100, 5, 2, 7], [-100, 3, 3, 1, -100]])
    # A perfect next-token predictor: the logits at t peak at the token at t+1.
    logits = torch.full((2, 5, 9), -5.0)
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                logits[b, t, labels[b, t + 1]] = 5.0
    shifted_logits, shifted_labels = shift_for_next_token(logits, labels)
    mask = shifted_labels != -100
    assert shifted_logits.shape == (2, 4, 9) and shifted_labels.shape == (2, 4)
    assert torch.equal(shifted_logits[mask].argmax(-1), shifted_labels[mask])
    # Unshifted (the official code's off-by-one) does not line up.
    assert not torch.equal(logits[labels != -100].argmax(-1), labels[labels != -100])
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        shift_for_next_token(logits, labels[:, :4])
