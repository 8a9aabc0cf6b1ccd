"""The chunked, checkpointed KD path against the plain full-logits path (values and gradients)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from modistill.losses import (
    DIVERGENCE_KINDS,
    TeacherHidden,
    TeacherTopK,
    chunked_token_logps,
    coarse_logprobs,
    divergence_loss,
    fused_distill_loss,
    per_token_divergence,
    teacher_topk_to_coarse,
    topk_from_logits,
)

N, H, V = 37, 16, 50  # 37 rows: the last chunk of 8 is partial
TEACHER_H, TEACHER_V = 24, 53  # the teacher has 3 extra (padding) vocabulary rows
TOPK = 5
TEMPERATURE = 1.5
CHUNK = 8


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    teacher_bias: torch.Tensor
    labels: torch.Tensor

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.hidden, self.weight, self.bias]

    def teacher_logits(self) -> torch.Tensor:
        return F.linear(self.teacher_hidden, self.teacher_weight, self.teacher_bias)

    def teacher(self, form: str, temperature: float = TEMPERATURE) -> TeacherHidden | TeacherTopK:
        if form == "logits":  # a teacher given by its logits: an identity head reproduces them exactly
            return TeacherHidden(self.teacher_logits(), torch.eye(TEACHER_V))
        if form == "hidden":
            return TeacherHidden(self.teacher_hidden, self.teacher_weight, self.teacher_bias)
        ids, logprobs = topk_from_logits(self.teacher_logits()[:, :V], TOPK, temperature)
        return TeacherTopK(ids, logprobs)


def make_case(seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::6] = -100
    return Case(
        hidden=torch.randn(N, H, generator=gen).requires_grad_(True),
        weight=(torch.randn(V, H, generator=gen) * 0.5).requires_grad_(True),
        bias=(torch.randn(V, generator=gen) * 0.1).requires_grad_(True),
        teacher_hidden=torch.randn(N, TEACHER_H, generator=gen),
        teacher_weight=torch.randn(TEACHER_V, TEACHER_H, generator=gen) * 0.5,
        teacher_bias=torch.randn(TEACHER_V, generator=gen) * 0.1,
        labels=labels,
    )


def plain_loss(
    case: Case,
    form: str,
    kind: str,
    *,
    num_items: int,
    kd_weight: float,
    ce_weight: float,
    temperature: float = TEMPERATURE,
) -> dict:
    """The same loss from fully materialised logits, via the (separately tested) plain functions."""
    logits = F.linear(case.hidden, case.weight, case.bias)
    counted = case.labels != -100
    if form == "topk":
        teacher = case.teacher("topk", temperature)
        per_row = per_token_divergence(
            coarse_logprobs(logits / temperature, teacher.ids),
            teacher_topk_to_coarse(teacher.logprobs),
            kind,
        )
        kd = per_row[counted].sum() / num_items
    else:
        kd = divergence_loss(
            logits,
            case.teacher_logits()[:, :V],
            kind,
            mask=counted,
            temperature=temperature,
            num_items=num_items,
        )
    ce = F.cross_entropy(logits, case.labels, ignore_index=-100, reduction="sum") / num_items
    return {"loss": kd_weight * kd + ce_weight * ce, "kd": kd, "ce": ce}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("temperature", [TEMPERATURE, 1.0])  # T=1 reuses the KD softmax for CE
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("form", ["logits", "hidden", "topk"])
def test_fused_matches_plain_values_and_grads(form: str, kind: str, temperature: float) -> None:
    case = make_case()
    num_items = int((case.labels != -100).sum()) + 3
    weights = {"kd_weight": 1.3, "ce_weight": 0.7}
    fused = fused_distill_loss(
        case.hidden,
        case.weight,
        teacher=case.teacher(form, temperature),
        labels=case.labels,
        kind=kind,
        temperature=temperature,
        chunk_size=CHUNK,
        num_items=num_items,
        student_head_bias=case.bias,
        **weights,
    )
    fused_grads = torch.autograd.grad(fused["loss"], case.params)
    plain = plain_loss(case, form, kind, num_items=num_items, temperature=temperature, **weights)
    plain_grads = torch.autograd.grad(plain["loss"], case.params)
    for key in ("loss", "kd", "ce"):
        assert fused[key].dtype == torch.float32
        assert_close_rel(fused[key], plain[key])
    assert fused["kd"] > 0
    for got, want in zip(fused_grads, plain_grads):
        assert want.abs().max() > 0
        assert_close_rel(got, want)


def test_frozen_head_gives_hidden_grads_and_leaves_head_untouched() -> None:
    """Stage 1b freezes lm_head by default: the hidden states still get the plain path's gradient,
    and the frozen weight and bias get none (no grad computed, nothing accumulated)."""
    case = make_case(4)
    weight, bias = case.weight.detach(), case.bias.detach()
    num_items = int((case.labels != -100).sum())
    common = {
        "kind": "reverse_kl",
        "temperature": TEMPERATURE,
        "num_items": num_items,
        "kd_weight": 1.0,
        "ce_weight": 0.5,
    }
    fused = fused_distill_loss(
        case.hidden,
        weight,
        teacher=case.teacher("logits"),
        labels=case.labels,
        chunk_size=CHUNK,
        student_head_bias=bias,
        **common,
    )
    fused["loss"].backward()
    assert weight.grad is None and bias.grad is None
    plain = plain_loss(replace(case, weight=weight, bias=bias), "logits", **common)
    want = torch.autograd.grad(plain["loss"], case.hidden)[0]
    assert want.abs().max() > 0
    assert_close_rel(case.hidden.grad, want)


@pytest.mark.parametrize("kd_weight, ce_weight", [(1.0, 0.0), (0.0, 1.0)])
def test_single_term_losses_match_plain(kd_weight: float, ce_weight: float) -> None:
    """KD-only (stage 1a) and CE-only (SFT) through the fused path: a zero weight drops its term
    from both the value and the gradient."""
    case = make_case(5)
    num_items = int((case.labels != -100).sum())
    weights = {"kd_weight": kd_weight, "ce_weight": ce_weight}
    fused = fused_distill_loss(
        case.hidden,
        case.weight,
        teacher=case.teacher("logits"),
        labels=case.labels,
        kind="forward_kl",
        temperature=1.0,
        chunk_size=CHUNK,
        num_items=num_items,
        student_head_bias=case.bias,
        **weights,
    )
    plain = plain_loss(case, "logits", "forward_kl", num_items=num_items, temperature=1.0, **weights)
    assert_close_rel(fused["loss"], plain["loss"])
    for got, want in zip(
        torch.autograd.grad(fused["loss"], case.params), torch.autograd.grad(plain["loss"], case.params)
    ):
        assert_close_rel(got, want)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_fused_topk_with_k_equal_vocab_equals_full_teacher(kind: str) -> None:
    case = make_case(1)
    ids, logprobs = topk_from_logits(case.teacher_logits()[:, :V], V, TEMPERATURE)
    common = {"labels": case.labels, "kind": kind, "temperature": TEMPERATURE, "chunk_size": CHUNK}
    topk = fused_distill_loss(case.hidden, case.weight, teacher=TeacherTopK(ids, logprobs), **common)
    topk_grads = torch.autograd.grad(topk["loss"], [case.hidden, case.weight])
    full = fused_distill_loss(case.hidden, case.weight, teacher=case.teacher("logits"), **common)
    full_grads = torch.autograd.grad(full["loss"], [case.hidden, case.weight])
    assert_close_rel(topk["loss"], full["loss"])
    for got, want in zip(topk_grads, full_grads):
        assert_close_rel(got, want)


def test_pure_ce_without_teacher() -> None:
    case = make_case(2)
    out = fused_distill_loss(
        case.hidden,
        case.weight,
        teacher=None,
        labels=case.labels,
        kd_weight=0.0,
        ce_weight=1.0,
        chunk_size=CHUNK,
    )
    expected = F.cross_entropy(case.hidden @ case.weight.T, case.labels, ignore_index=-100)
    assert_close_rel(out["loss"], expected)
    assert out["kd"].item() == 0.0
    got = torch.autograd.grad(out["loss"], case.weight)[0]
    want = torch.autograd.grad(expected, case.weight)[0]
    assert_close_rel(got, want)


def test_fused_gradient_accumulation_invariance() -> None:
    case = make_case(3)
    total = int((case.labels != -100).sum())
    kwargs = {
        "kind": "forward_kl",
        "temperature": TEMPERATURE,
        "chunk_size": CHUNK,
        "ce_weight": 1.0,
        "num_items": total,
    }
    full = fused_distill_loss(case.hidden, case.weight, teacher=case.teacher("hidden"), labels=case.labels, **kwargs)
    full_grad = torch.autograd.grad(full["loss"], case.weight)[0]
    teacher = case.teacher("hidden")
    parts, grads = [], []
    for rows in (slice(0, 20), slice(20, N)):
        part_teacher = TeacherHidden(teacher.hidden[rows], teacher.head_weight, teacher.head_bias)
        out = fused_distill_loss(
            case.hidden[rows], case.weight, teacher=part_teacher, labels=case.labels[rows], **kwargs
        )
        parts.append(out["loss"])
        grads.append(torch.autograd.grad(out["loss"], case.weight)[0])
    assert_close_rel(parts[0] + parts[1], full["loss"])
    assert_close_rel(grads[0] + grads[1], full_grad)


def test_fused_keeps_no_full_vocab_tensor_for_backward() -> None:
    """What autograd keeps for backward, summed over distinct storages: the checkpointed chunks keep
    only their inputs (the head weights, hidden rows), never per-chunk logits."""
    rows, vocab = 256, 512  # N x V = 131072 elements; the student head is only 8192
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(rows, H, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, H, generator=gen, requires_grad=True)
    teacher = TeacherHidden(torch.randn(rows, 8, generator=gen), torch.randn(vocab + 3, 8, generator=gen))

    def saved_elements(fn) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(storages.values())

    fused = saved_elements(lambda: fused_distill_loss(hidden, weight, teacher=teacher, labels=None, chunk_size=8))
    plain = saved_elements(
        lambda: divergence_loss(hidden @ weight.T, (teacher.hidden @ teacher.head_weight.T)[:, :vocab])
    )
    assert plain >= 2 * rows * vocab  # the plain path keeps several [N, V] tensors
    assert fused < rows * vocab // 4


def test_bf16_hidden_and_weights_give_fp32_loss() -> None:
    case = make_case(5)
    hidden = case.hidden.detach().bfloat16().requires_grad_(True)
    weight = case.weight.detach().bfloat16().requires_grad_(True)
    teacher = TeacherHidden(case.teacher_hidden.bfloat16(), case.teacher_weight.bfloat16())
    out = fused_distill_loss(hidden, weight, teacher=teacher, labels=case.labels, ce_weight=1.0, chunk_size=CHUNK)
    assert out["loss"].dtype == out["kd"].dtype == out["ce"].dtype == torch.float32
    out["loss"].backward()
    assert hidden.grad.dtype == torch.bfloat16 and torch.isfinite(hidden.grad.float()).all()
    reference = fused_distill_loss(
        hidden.detach().float(),
        weight.detach().float(),
        teacher=TeacherHidden(teacher.hidden.float(), teacher.head_weight.float()),
        labels=case.labels,
        ce_weight=1.0,
        chunk_size=CHUNK,
    )
    torch.testing.assert_close(out["loss"], reference["loss"], rtol=3e-2, atol=0)


def test_chunked_token_logps_matches_gather() -> None:
    case = make_case(6)
    targets = case.labels
    got = chunked_token_logps(case.hidden, case.weight, targets, chunk_size=CHUNK, head_bias=case.bias, temperature=1.7)
    logp = F.log_softmax(F.linear(case.hidden, case.weight, case.bias) / 1.7, -1)
    ignored = targets == -100
    want = logp.gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1).masked_fill(ignored, 0.0)
    assert (got[ignored] == 0).all()
    assert_close_rel(got, want)
    upstream = torch.linspace(-1, 1, N)
    for g, w in zip(
        torch.autograd.grad((got * upstream).sum(), case.params),
        torch.autograd.grad((want * upstream).sum(), case.params),
    ):
        assert_close_rel(g, w)


def test_topk_from_logits_matches_log_softmax() -> None:
    logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(7))
    ids, logprobs = topk_from_logits(logits, 4, temperature=0.7)
    values, want_ids = F.log_softmax(logits / 0.7, -1).topk(4, -1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(logprobs, values)
    with pytest.raises(ValueError, match="k must be"):
        topk_from_logits(logits, 21)


def test_bad_inputs_raise_clear_errors() -> None:
    case = make_case(8)
    h, w, labels = case.hidden, case.weight, case.labels
    with pytest.raises(ValueError, match="teacher vocabulary 40 is smaller than the student's 50"):
        fused_distill_loss(h, w, teacher=TeacherHidden(torch.randn(N, 40), torch.eye(40)), labels=labels)
    with pytest.raises(ValueError, match="teacher vocabulary 40"):
        fused_distill_loss(h, w, teacher=TeacherHidden(torch.randn(N, 4), torch.randn(40, 4)), labels=labels)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 50\)"):
        bad_ids = torch.arange(3).repeat(N, 1)
        bad_ids[0, 0] = 50
        fused_distill_loss(h, w, teacher=TeacherTopK(bad_ids, torch.full((N, 3), -2.0)), labels=labels)
    with pytest.raises(ValueError, match="distinct"):
        fused_distill_loss(
            h, w, teacher=TeacherTopK(torch.zeros(N, 2, dtype=torch.long), torch.full((N, 2), -2.0)), labels=labels
        )
    with pytest.raises(ValueError, match="hidden size 16 != head weight input size 15"):
        fused_distill_loss(h, torch.randn(V, 15), teacher=None, labels=labels, kd_weight=0.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        fused_distill_loss(h, w, teacher=None, labels=labels)
    with pytest.raises(ValueError, match="needs labels"):
        fused_distill_loss(h, w, teacher=case.teacher("logits"), labels=None, ce_weight=1.0)
    with pytest.raises(ValueError, match=f"teacher hidden has {N - 1} rows, the student {N}"):
        fused_distill_loss(h, w, teacher=TeacherHidden(torch.randn(N - 1, V), torch.eye(V)), labels=labels)
    with pytest.raises(ValueError, match="labels must be"):
        fused_distill_loss(h, w, teacher=None, labels=labels[:-1], kd_weight=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_distill_loss(h, w, teacher=None, labels=labels, kd_weight=0.0, chunk_size=0)
    with pytest.raises(ValueError, match="targets must be"):
        chunked_token_logps(h, w, torch.full((N,), V))
