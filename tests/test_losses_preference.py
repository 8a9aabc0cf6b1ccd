"""Preference losses against float64 numpy re-computations of their formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modistill.losses import PREFERENCE_KINDS, preference_loss, sequence_logps

BETA = 0.1
# Log-ratio gaps chosen so that: mean(chosen) > 0 (KL_w active), mean(rejected) < 0 (KL_l clamped
# to 0), and beta * margin > 1 for samples 0 and 4 (hinge inactive there).
CHOSEN_DELTA = np.array([12.0, 3.0, -2.0, 5.0, 20.0, 1.0])
REJECTED_DELTA = np.array([-15.0, 2.0, -4.0, 1.0, -3.0, -8.0])


def make_inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    ref_chosen = rng.uniform(-60, -20, 6)
    ref_rejected = rng.uniform(-60, -20, 6)
    return [ref_chosen + CHOSEN_DELTA, ref_rejected + REJECTED_DELTA, ref_chosen, ref_rejected]


def np_loss(pc: np.ndarray, pr: np.ndarray, rc: np.ndarray, rr: np.ndarray, kind: str, beta: float = BETA) -> float:
    dw, dl = pc - rc, pr - rr

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-x))

    if kind == "kto_pair":
        kl_w, kl_l = max(0.0, dw.mean()), max(0.0, dl.mean())
        return float(np.concatenate([1 - sigmoid(beta * (dw - kl_l)), 1 - sigmoid(beta * (kl_w - dl))]).mean())
    margin = dw - dl
    if kind == "sigmoid":
        return float(np.logaddexp(0.0, -beta * margin).mean())  # -log sigmoid(beta m)
    if kind == "ipo":
        return float(((margin - 1.0 / (2.0 * beta)) ** 2).mean())
    if kind == "hinge":
        return float(np.maximum(0.0, 1.0 - beta * margin).mean())
    raise AssertionError(kind)


def np_finite_difference_grads(inputs: list[np.ndarray], kind: str, eps: float = 1e-6) -> list[np.ndarray]:
    grads = []
    for which in range(4):
        grad = np.zeros_like(inputs[which])
        for i in range(grad.size):
            plus = [x.copy() for x in inputs]
            minus = [x.copy() for x in inputs]
            plus[which][i] += eps
            minus[which][i] -= eps
            grad[i] = (np_loss(*plus, kind) - np_loss(*minus, kind)) / (2 * eps)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("kind", PREFERENCE_KINDS)
def test_values_and_rewards_match_numpy(kind: str) -> None:
    inputs = make_inputs()
    loss, chosen_rewards, rejected_rewards = preference_loss(
        *(torch.tensor(x, dtype=torch.float32) for x in inputs), beta=BETA, kind=kind
    )
    assert loss.dtype == torch.float32 and loss.shape == ()
    np.testing.assert_allclose(loss.item(), np_loss(*inputs, kind), rtol=1e-5)
    np.testing.assert_allclose(chosen_rewards.numpy(), BETA * CHOSEN_DELTA, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rejected_rewards.numpy(), BETA * REJECTED_DELTA, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", PREFERENCE_KINDS)
def test_gradients_match_finite_differences(kind: str) -> None:
    """detach_kl=False differentiates the whole formula, so finite differences must agree."""
    inputs = make_inputs()
    tensors = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs]
    loss, chosen_rewards, _ = preference_loss(*tensors, beta=BETA, kind=kind, detach_kl=False)
    assert not chosen_rewards.requires_grad
    grads = torch.autograd.grad(loss, tensors)
    for got, want in zip(grads, np_finite_difference_grads(inputs, kind)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-9)
    policy_chosen_grad = grads[0].numpy()
    if kind == "hinge":
        assert (policy_chosen_grad[[0, 4]] == 0).all()  # beta * margin > 1: no gradient
        assert (policy_chosen_grad[[1, 2, 3, 5]] < 0).all()
    else:
        assert (policy_chosen_grad != 0).all() and (grads[1].numpy() != 0).all()


def test_kto_pair_detached_kl_gradient_is_the_analytic_one() -> None:
    inputs = make_inputs()
    tensors = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs]
    loss, _, _ = preference_loss(*tensors, beta=BETA, kind="kto_pair")  # detach_kl=True default
    grads = torch.autograd.grad(loss, tensors)
    # With KL_w, KL_l constants: d/dpc_i = -beta s_i (1 - s_i) / 2B, d/dpr_i = +beta t_i (1 - t_i) / 2B.
    batch = len(CHOSEN_DELTA)
    kl_w, kl_l = max(0.0, CHOSEN_DELTA.mean()), max(0.0, REJECTED_DELTA.mean())
    s = 1 / (1 + np.exp(-BETA * (CHOSEN_DELTA - kl_l)))
    t = 1 / (1 + np.exp(-BETA * (kl_w - REJECTED_DELTA)))
    d_chosen = -BETA * s * (1 - s) / (2 * batch)
    d_rejected = BETA * t * (1 - t) / (2 * batch)
    for got, want in zip(grads, [d_chosen, d_rejected, -d_chosen, -d_rejected]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-14)
    # KL_w > 0 here: letting gradient through it adds a path from the chosen log-probs via the
    # rejected-side terms, so the chosen gradient must change.
    loss_grad_kl, _, _ = preference_loss(*tensors, beta=BETA, kind="kto_pair", detach_kl=False)
    grads_kl = torch.autograd.grad(loss_grad_kl, tensors)
    torch.testing.assert_close(loss_grad_kl, loss)
    assert not torch.allclose(grads_kl[0], grads[0])


def test_bf16_inputs_give_fp32_loss() -> None:
    inputs = [torch.tensor(x, dtype=torch.bfloat16) for x in make_inputs()]
    loss, chosen_rewards, _ = preference_loss(*inputs, kind="sigmoid")
    assert loss.dtype == torch.float32 and chosen_rewards.dtype == torch.float32


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_sums_response_tokens(average: bool) -> None:
    rng = np.random.default_rng(1)
    token_logps = -rng.uniform(0.1, 5.0, (3, 7))
    mask = np.zeros((3, 7), dtype=bool)
    mask[0, 2:6] = True
    mask[1, 1:] = True  # row 2 has no response tokens
    padded = torch.tensor(token_logps, dtype=torch.float32).masked_fill(~torch.tensor(mask), float("-inf"))
    got = sequence_logps(padded, torch.tensor(mask), average=average)
    sums = np.where(mask, token_logps, 0.0).sum(-1)
    want = sums / np.maximum(mask.sum(-1), 1) if average else sums
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_bad_inputs_raise_clear_errors() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="valid kinds: kto_pair, sigmoid, ipo, hinge"):
        preference_loss(x, x, x, x, kind="kto")
    with pytest.raises(ValueError, match=r"must all be \[B\]"):
        preference_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"B >= 1"):
        preference_loss(*(torch.zeros(0),) * 4)
    with pytest.raises(ValueError, match="beta"):
        preference_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 3))
