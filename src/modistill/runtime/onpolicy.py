"""On-policy mimic distillation: the student answers the batch's prompts itself, the teacher scores its answers.

GKD-style (Agarwal et al. 2024): for a fraction λ of micro-batches the dataset's last assistant
answer is replaced by one the current student samples (`generate` on the unwrapped student, eval
mode, no gradients, images included); KD then runs on those answers. Which micro-batches are
on-policy is a pure function of (seed, optimizer step, micro-batch index), so a run is
reproducible and a resumed run takes the same decisions; the sampling RNG is forked and seeded
from the same key, so the trainer's own RNG stream is untouched.

The prompt (every message before the last assistant turn, earlier answers as context) is rendered
by the data layer's `Renderer` (`render_prompt`: the chat template's generation prompt, images
expanded) for the student and, when it renders differently, for the teacher. Each row is then
prompt + the sampled ids, labels -100 on the prompt and on padding, the sampled ids (with the
end-of-turn token when the student emitted it) as labels. The ids are used as sampled, not decoded
and re-tokenised: decode → encode is not the identity for arbitrary samples (byte-level BPE merges,
partial UTF-8), and labels that are not the student's own tokens would not be on-policy. Teacher
and student share the tokenizer (checked at load), so the teacher scores the same tokens; the
live teacher's alignment check still runs on every batch. The student's prompt is by construction
the one it sampled from, image tokens included, and answers never exceed data.max_length in
either rendering.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modistill.data.collate import pad_batch
from modistill.data.render import IGNORE_INDEX, RenderedSample, Renderer
from modistill.errors import UserError


def is_onpolicy(fraction: float, seed: int, step: int, micro: int) -> bool:
    """Whether micro-batch `micro` of optimizer step `step` is on-policy (seeded; no state to resume)."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    # random.Random seeds from a str through SHA-512: the same on every run and every machine.
    return random.Random(f"onpolicy:{seed}:{step}:{micro}").random() < fraction


class RowsCollator:
    """A conversation collator that also passes the raw rows on (`batch["rows"]`) for re-rendering."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.student: Renderer = base.student
        self.teacher: Renderer | None = base.teacher  # None: the student's rendering serves the teacher

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(rows)
        batch["rows"] = [{"messages": list(r["messages"]), "images": list(r.get("images") or [])} for r in rows]
        return batch


@dataclass
class Sampled:
    batch: dict[str, Any]  # the rebuilt training batch (student keys, teacher_* keys when it renders differently)
    texts: list[str]  # the sampled answers, decoded (for logs; training uses the ids)
    new_ids: list[list[int]]  # the sampled tokens per row: the labels (end-of-turn included when emitted)


def _prompt_of(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages before the last assistant turn (earlier answers stay as context)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


class OnPolicySampler:
    """Samples answers from the student for a batch's prompts and rebuilds the batch around them."""

    def __init__(
        self,
        student: Renderer,
        teacher: Renderer | None,
        *,
        fraction: float,
        temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> None:
        self.student, self.teacher = student, teacher
        self.fraction, self.temperature, self.max_new_tokens, self.seed = fraction, temperature, max_new_tokens, seed

    def chosen(self, step: int, micro: int) -> bool:
        return is_onpolicy(self.fraction, self.seed, step, micro)

    def _generation_kwargs(self, model: nn.Module, max_new: int) -> dict[str, Any]:
        tok = self.student.tokenizer
        eos = getattr(model.generation_config, "eos_token_id", None)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": tok.pad_token_id,
            "use_cache": True,
            "eos_token_id": eos if eos is not None else tok.eos_token_id,
        }
        if self.student.image_token_id is not None:
            # An image token in an answer has no image features behind it (Llava refuses the batch): an
            # undertrained student does sample it, so it is suppressed (the only change to the policy).
            kwargs["suppress_tokens"] = [self.student.image_token_id]
        if self.temperature > 0:  # pure ancestral sampling: the student's own distribution, no top-k/top-p cut
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        return kwargs

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        pixel_values: torch.Tensor | None,
        key: str,
        room: int | None = None,
    ) -> list[list[int]]:
        """New token ids per prompt (left-padded batch; cut after the first end-of-turn token)."""
        param = next(model.parameters())
        pad = self.student.tokenizer.pad_token_id
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, length - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, length - len(p) :] = 1
        inputs: dict[str, Any] = {"input_ids": ids.to(param.device), "attention_mask": mask.to(param.device)}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values.to(param.device, param.dtype)
        max_new = self.max_new_tokens if room is None else min(self.max_new_tokens, room)
        if max_new < 1:
            raise UserError(
                f"a prompt of {length} tokens leaves no room for a sampled answer within "
                f"data.max_length {self.student.max_length}; raise data.max_length"
            )
        kwargs = self._generation_kwargs(model, max_new)
        eos = kwargs["eos_token_id"]
        stops = set(eos if isinstance(eos, list) else [eos])
        was_training = model.training
        model.eval()
        devices = [param.device] if param.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int.from_bytes(random.Random(key).randbytes(4), "little"))
                out = model.generate(**inputs, **kwargs)
        finally:
            model.train(was_training)
        new = out[:, length:].tolist()
        cut = []
        for seq in new:
            end = next((i + 1 for i, t in enumerate(seq) if t in stops), len(seq))
            cut.append(seq[:end])
        return cut

    def sample(self, model: nn.Module, batch: dict[str, Any], key: str) -> Sampled:
        """The batch with each row's last answer replaced by one the student samples now."""
        if "rows" not in batch:
            raise UserError("on-policy distillation needs the raw rows in the batch: collate with RowsCollator")
        rows = batch["rows"]
        renderers = [("", self.student)] + ([("teacher_", self.teacher)] if self.teacher is not None else [])
        prompts = {
            prefix: [r.render_prompt(_prompt_of(row["messages"]), row["images"]) for row in rows]
            for prefix, r in renderers
        }
        # Room for the answer within data.max_length in every rendering (the teacher's prompt may be longer).
        room = min(
            (r.max_length - max(map(len, prompts[prefix])) for prefix, r in renderers if r.max_length is not None),
            default=self.max_new_tokens,
        )
        new = self.generate(model, prompts[""], batch.get("pixel_values"), key, room)
        rebuilt: dict[str, Any] = {"sample_ids": batch.get("sample_ids", []), "rows": rows}
        for prefix, renderer in renderers:
            seqs = [
                RenderedSample(p + ids, [IGNORE_INDEX] * len(p) + ids, row["images"])
                for p, ids, row in zip(prompts[prefix], new, rows, strict=True)
            ]
            device = batch[f"{prefix}input_ids"].device
            padded = pad_batch(seqs, renderer.tokenizer.pad_token_id)
            rebuilt.update({prefix + k: v.to(device) for k, v in padded.items()})
            if f"{prefix}pixel_values" in batch:  # the same images, in the same order
                rebuilt[f"{prefix}pixel_values"] = batch[f"{prefix}pixel_values"]
        return Sampled(rebuilt, [self.student.tokenizer.decode(ids, skip_special_tokens=True) for ids in new], new)


def onpolicy_response_tokens(labels: torch.Tensor) -> int:
    """Response tokens (shifted labels) of a batch: what the Trainer counts into num_items_in_batch."""
    return int((labels[:, 1:] != -100).sum())
