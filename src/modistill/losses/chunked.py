"""The machinery behind `fused_distill_loss` and `chunked_token_logps`: chunks of rows whose
gradient is computed during the forward pass.

Each chunk's logits exist only while that chunk is processed: the loss on them and the gradient of
the loss w.r.t. them are computed at once (forward KL + CE in closed form, any other loss through a
private, short-lived autograd graph), the gradient is pushed through the LM head into [N, H] (hidden
states) and [V, H] (head weight) accumulators, and the chunk is freed. The backward pass only scales
the stored gradients. Compared with checkpointing each chunk (recomputing its logits in backward),
every LM-head matmul runs once: student logits, teacher logits, and the two gradient matmuls.

The stored gradients are those of the weighted loss; if its parts are back-propagated on their own,
or the graph a second time (`retain_graph`), backward recomputes the chunks with the weights it is
given. Double backward (`create_graph=True`) is not supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from modistill.losses.divergence import IGNORE_INDEX, coarse_logprobs, per_token_divergence, teacher_topk_to_coarse
from modistill.losses.teachers import Teacher, TeacherHidden, TeacherTopK, head_logits


class _Workspace:
    """[C, V] fp32 buffers that every chunk of one call reuses.

    A fresh buffer of this size comes straight from the OS (glibc mmaps anything >= 32 MB): zeroed
    pages, one page fault each, on every chunk. On the CPUs this was measured on that kernel time
    rivals the arithmetic; reused buffers fault once per call.
    """

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, rows: int) -> Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self._buffers[name] = torch.empty(rows, self.vocab, dtype=torch.float32, device=self.device)
        return buffer[:rows]


def tempered(logits: Tensor, temperature: float) -> Tensor:
    return logits / temperature if temperature != 1.0 else logits


def sums_from_logits(
    logits: Tensor,
    labels: Tensor | None,
    counted: Tensor,
    teacher: Teacher | None,
    *,
    kind: str,
    temperature: float,
    beta: float,
    alpha: float,
) -> Tensor:
    """[2] = (sum of KD over counted rows, sum of CE over labelled rows) for one chunk's fp32 logits.

    teacher: the same chunk's rows of the teacher, or None (CE only).
    """
    vocab = logits.shape[-1]
    zero = logits.new_zeros(())

    kd_sum = zero
    student_logp_t1: Tensor | None = None  # the full log-softmax at T=1, reused by CE if it exists
    if teacher is not None:
        scaled = tempered(logits, temperature)
        if isinstance(teacher, TeacherTopK):
            student_logp = coarse_logprobs(scaled, teacher.ids)
            teacher_logp = teacher_topk_to_coarse(teacher.logprobs, full_vocab=teacher.ids.shape[-1] == vocab)
        else:
            with torch.no_grad():
                teacher_logits = teacher.logits(vocab)
                teacher_logp = F.log_softmax(tempered(teacher_logits, temperature), dim=-1)
            student_logp = F.log_softmax(scaled, dim=-1)
            if temperature == 1.0:
                student_logp_t1 = student_logp
        divergence = per_token_divergence(student_logp, teacher_logp, kind, beta=beta, alpha=alpha)
        kd_sum = divergence.masked_fill(~counted, 0.0).sum()

    ce_sum = zero
    if labels is not None:
        if student_logp_t1 is not None:
            ce_sum = F.nll_loss(student_logp_t1, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        else:
            ce_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return torch.stack([kd_sum, ce_sum])


def _closed_form(
    logits: Tensor,
    teacher: tuple[str, Tensor, Tensor | None] | None,
    labels: Tensor | None,
    counted: Tensor,
    temperature: float,
    coefficients: tuple[float | Tensor, float | Tensor] | None,
    workspace: _Workspace,
) -> tuple[Tensor, Tensor | None] | None:
    """Forward KL at ``temperature`` + CE at T=1 for one chunk, and the gradient w.r.t. the logits s
    of ``coefficients[0] * kd_sum + coefficients[1] * ce_sum``, in closed form (no autograd graph).

    teacher: ("full", teacher log-probs [C, V] at T, consumed), ("topk", ids [C, k], coarse teacher
    log-probs [C, k+1] from teacher_topk_to_coarse), or None (CE only). With q = softmax(s / T):

        full:  d KL / d s = (q - p_T) / T
        top-k: d KL / d s = (P q - p_j [v = id_j] - p_rest q_v / q_rest [v not an id]) / T, where
               P = sum of the coarse teacher probs and q_rest = the student's mass outside the ids
        CE:    d CE / d s = softmax(s) - onehot(y)

    The same sums as sums_from_logits with kind "forward_kl" in a fraction of its passes over [C, V]
    buffers (reused, mostly in place). Returns None when a row is not finite (e.g. a teacher with
    zero-probability tokens, a student with no mass outside the ids): the general path handles those.
    """
    rows = logits.shape[0]
    if teacher is None:
        temperature = 1.0  # CE only: the temperature plays no part
    student_logp = torch.log_softmax(tempered(logits, temperature), dim=-1, out=workspace.get("student_logp", rows))
    kd_sum = logits.new_zeros(())
    if teacher is not None and teacher[0] == "full":
        diff = teacher[1]  # overwritten below: the caller made it for this call
        teacher_p = torch.exp(diff, out=workspace.get("teacher", rows))  # the raw teacher logits are spent
        diff.sub_(student_logp)  # log p_T - log q
        kl = torch.bmm(teacher_p.unsqueeze(1), diff.unsqueeze(2)).view(-1)
        grad = torch.exp(student_logp, out=diff)  # q, in the buffer diff no longer needs
    elif teacher is not None:
        _, ids, teacher_coarse = teacher
        assert teacher_coarse is not None  # the "topk" form always carries its coarse log-probs
        grad = torch.exp(student_logp, out=workspace.get("probs", rows))  # q
        q_ids = grad.gather(1, ids)
        q_rest = grad.scatter_(1, ids, 0.0).sum(-1)  # summed without the ids: no cancellation
        grad.scatter_(1, ids, q_ids)
        student_coarse = torch.cat([student_logp.gather(1, ids), q_rest.log()[:, None]], dim=-1)
        kl = per_token_divergence(student_coarse, teacher_coarse, "forward_kl")
        teacher_probs = teacher_coarse.exp()
        total, rest = teacher_probs.sum(-1), teacher_probs[:, -1]
        rest_ratio = rest / q_rest
        if not bool(torch.isfinite(rest_ratio).all()):
            return None
    else:
        kl = None
        grad = torch.exp(student_logp, out=workspace.get("probs", rows))  # softmax(s)
    if kl is not None:
        if not bool(torch.isfinite(kl).all()):
            return None
        kd_sum = kl.masked_fill(~counted, 0.0).sum()
    ce_sum = logits.new_zeros(())
    logp_t1 = None
    if labels is not None:
        labelled = labels != IGNORE_INDEX
        safe = labels.masked_fill(~labelled, 0)
        logp_t1 = student_logp if temperature == 1.0 else F.log_softmax(logits, dim=-1)
        ce_sum = -logp_t1.gather(1, safe[:, None]).squeeze(1).masked_fill(~labelled, 0.0).sum()
    sums = torch.stack([kd_sum, ce_sum])
    if coefficients is None:
        return sums, None

    # grad holds q; every row is scaled, the teacher's part subtracted, then CE's softmax and one-hot.
    kd_rows = None
    if teacher is not None:
        kd_rows = (coefficients[0] / temperature) * counted.to(grad.dtype)
    ce_coefficient = coefficients[1]
    ce_rows = None
    if logp_t1 is not None and (isinstance(ce_coefficient, Tensor) or ce_coefficient != 0):
        ce_rows = ce_coefficient * labelled.to(grad.dtype)
    same_softmax = temperature == 1.0 and ce_rows is not None  # CE's softmax is q itself
    scale = torch.zeros(rows, dtype=grad.dtype, device=grad.device)
    if teacher is not None and kd_rows is not None:
        scale = scale + (kd_rows if teacher[0] == "full" else kd_rows * (total - rest_ratio))
    if same_softmax and ce_rows is not None:
        scale = scale + ce_rows
    grad.mul_(scale[:, None])
    if teacher is not None and kd_rows is not None and teacher[0] == "full":
        grad.sub_(teacher_p.mul_(kd_rows[:, None]))
    elif teacher is not None and kd_rows is not None:
        at_ids = kd_rows[:, None] * (q_ids * total[:, None] - teacher_probs[:, :-1])
        if same_softmax and ce_rows is not None:
            at_ids = at_ids + ce_rows[:, None] * q_ids
        grad.scatter_(1, ids, at_ids)
    if ce_rows is not None and logp_t1 is not None:
        if not same_softmax:
            grad.add_(logp_t1.exp().mul_(ce_rows[:, None]))
        grad.index_put_((torch.arange(rows, device=grad.device), safe), -ce_rows, accumulate=True)
    return sums, grad


@dataclass
class Chunks:
    """Everything a chunk of the fused loss needs besides the student head: rows, labels, teacher."""

    size: int
    labels: Tensor | None
    counted: Tensor
    teacher: Teacher | None  # detached: the teacher is a constant
    sums_fn: Callable[..., Tensor]  # sums_from_logits with the loss options bound
    weights: tuple[float, float]  # (kd_weight, ce_weight)
    kind: str
    temperature: float
    vocab: int  # the student's

    def _teacher(self, start: int, end: int) -> Teacher | None:
        return None if self.teacher is None else self.teacher.rows(start, end)

    def _labels(self, start: int, end: int) -> Tensor | None:
        return None if self.labels is None else self.labels[start:end]

    def sums(self, logits: Tensor, start: int, end: int) -> Tensor:
        return self.sums_fn(logits, self._labels(start, end), self.counted[start:end], self._teacher(start, end))

    @property
    def has_closed_form(self) -> bool:
        """Forward KL (or no KD) against a full or top-k teacher; top-k covering the whole
        vocabulary (an empty rest bin) goes through the general path."""
        if self.teacher is None:
            return True
        if self.kind != "forward_kl":
            return False
        return not isinstance(self.teacher, TeacherTopK) or self.teacher.ids.shape[-1] < self.vocab

    def closed_form(
        self, logits: Tensor, start: int, end: int, coefficients, workspace: _Workspace
    ) -> tuple[Tensor, Tensor | None] | None:
        """Sums and logit gradient in closed form (None: use the general path)."""
        rows = end - start
        chunk = self._teacher(start, end)
        with torch.no_grad():
            teacher: tuple[str, Tensor, Tensor | None] | None = None
            if isinstance(chunk, TeacherTopK):
                teacher = ("topk", chunk.ids, teacher_topk_to_coarse(chunk.logprobs, full_vocab=False))
            elif isinstance(chunk, TeacherHidden):
                raw = chunk.logits(logits.shape[-1], workspace.get("teacher", rows))
                raw = raw.div_(self.temperature) if self.temperature != 1.0 else raw
                teacher = ("full", torch.log_softmax(raw, dim=-1, out=workspace.get("teacher_logp", rows)), None)
            return _closed_form(
                logits,
                teacher,
                self._labels(start, end),
                self.counted[start:end],
                self.temperature,
                coefficients,
                workspace,
            )


def _identity(t: Tensor) -> Tensor:
    return t


@contextlib.contextmanager
def _private_graph() -> Iterator[None]:
    """Grad mode for a chunk's own short-lived graph (logits -> loss, differentiated at once).

    Identity saved-tensor hooks shield it from any outer ``saved_tensors_hooks`` (CPU offloading,
    memory probes): nothing of it is kept for the outer backward, so nothing of it should be packed.
    """
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
        yield


def chunked_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunks: Chunks,
    coefficients: tuple[float | Tensor, float | Tensor] | None,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One pass over the chunks: the loss sums [2] and, unless ``coefficients`` is None, the
    gradients of ``coefficients[0] * kd_sum + coefficients[1] * ce_sum`` w.r.t. hidden, weight and
    bias (None where ``need`` says no), in their dtypes."""
    rows = hidden.shape[0]
    grad_hidden = torch.empty_like(hidden) if need[0] else None
    grad_weight = torch.zeros_like(weight) if need[1] else None
    grad_bias = torch.zeros_like(bias) if need[2] and bias is not None else None
    sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)
    workspace = _Workspace(weight.shape[0], hidden.device)
    for start in range(0, rows, chunks.size):
        end = min(start + chunks.size, rows)
        rows_hidden = hidden[start:end]
        closed = None
        if chunks.has_closed_form:
            with torch.no_grad():
                logits = head_logits(rows_hidden, weight, bias, workspace.get("logits", end - start))
            closed = chunks.closed_form(logits, start, end, coefficients, workspace)
            if closed is None:  # the general path below differentiates the logits: its own copy
                logits = logits.clone()
        else:
            with torch.no_grad():
                logits = head_logits(rows_hidden, weight, bias)
        if closed is not None:
            part, grad_logits = closed
        elif coefficients is None:
            with torch.no_grad():
                part, grad_logits = chunks.sums(logits, start, end), None
        else:
            logits.requires_grad_(True)
            with _private_graph():
                part = chunks.sums(logits, start, end)
                objective = coefficients[0] * part[0] + coefficients[1] * part[1]
                grad_logits = torch.autograd.grad(objective, logits)[0] if objective.requires_grad else None
            del objective
        sums += part.detach()
        if grad_logits is None:
            continue
        # Through the head now, in the head's dtype (as autograd would do it), then free the chunk.
        grad_logits = grad_logits.to(weight.dtype)
        if grad_hidden is not None:
            if grad_hidden.dtype == weight.dtype:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = grad_logits @ weight
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T, rows_hidden.to(weight.dtype))
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
        del grad_logits, logits, part
    if grad_hidden is not None and rows == 0:
        grad_hidden.zero_()
    return sums, grad_hidden, grad_weight, grad_bias


def _no_double_backward(name: str) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name} does not support double backward (create_graph=True)")


class FusedHeadLoss(torch.autograd.Function):
    """(kd_weight * kd_sum + ce_weight * ce_sum, kd_sum, ce_sum) with gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, chunks: Chunks):
        ctx.set_materialize_grads(False)
        need = tuple(ctx.needs_input_grad[:3])
        sums, *grads = chunked_pass(hidden, weight, bias, chunks, chunks.weights, need)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.chunks, ctx.need = chunks, need
        # Kept on ctx (not saved tensors) so that backward can hand them over and drop them: the
        # gradient then becomes the parameter's .grad without a copy.
        ctx.precomputed = grads
        kd_weight, ce_weight = chunks.weights
        return kd_weight * sums[0] + ce_weight * sums[1], sums[0].clone(), sums[1].clone()

    @staticmethod
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        _no_double_backward("fused_distill_loss")
        precomputed, ctx.precomputed = ctx.precomputed, None
        if grad_loss is None and grad_kd is None and grad_ce is None:
            return None, None, None, None
        if precomputed is not None and grad_kd is None and grad_ce is None:
            scale_is_one = bool(grad_loss == 1)
            grads = [g if g is None or scale_is_one else g.mul_(grad_loss) for g in precomputed]
            return (*grads, None)
        # kd / ce back-propagated on their own, or a second backward: recompute with these weights.
        kd_weight, ce_weight = ctx.chunks.weights
        coefficients = tuple(
            (0.0 if grad_loss is None else grad_loss * w) + (0.0 if g is None else g)
            for w, g in ((kd_weight, grad_kd), (ce_weight, grad_ce))
        )
        hidden, weight, bias = ctx.saved_tensors
        _, *grads = chunked_pass(hidden, weight, bias, ctx.chunks, coefficients, ctx.need)
        return (*grads, None)


def logps_from_logits(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    if temperature != 1.0:
        logits = logits / temperature
    ignored = targets == IGNORE_INDEX
    safe_targets = targets.masked_fill(ignored, 0)
    logp = logits.gather(-1, safe_targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp.masked_fill(ignored, 0.0)


def chunk_token_logps(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *, temperature: float
) -> Tensor:
    return logps_from_logits(head_logits(hidden, weight, bias), targets, temperature)


class FrozenHeadTokenLogps(torch.autograd.Function):
    """log p(target) [N] when only the hidden states need a gradient (a frozen LM head, as in stages
    1b and 2). Row i's log-prob depends on hidden row i alone, so d logp_i / d hidden_i [N, H] is
    computed in forward and backward is a per-row scale: one head matmul per chunk fewer than a
    checkpointed chunk, which recomputes the logits."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int, temperature: float
    ) -> Tensor:
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_rows = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            with torch.no_grad():
                logits = head_logits(hidden[start:end], weight, bias)
            logits.requires_grad_(True)
            with _private_graph():
                chunk_logps = logps_from_logits(logits, targets[start:end], temperature)
                grad_logits = torch.autograd.grad(chunk_logps.sum(), logits)[0]
            logps[start:end] = chunk_logps.detach()
            grad_rows[start:end] = grad_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_rows)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        _no_double_backward("chunked_token_logps")
        (grad_rows,) = ctx.saved_tensors
        return (grad_logps[:, None] * grad_rows).to(grad_rows.dtype), None, None, None, None, None
