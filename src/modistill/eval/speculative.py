"""The distilled student as its teacher's speculative drafter: greedy speculative decoding for Llava VLMs.

The draft proposes K tokens greedily (its own KV cache); the teacher scores all K in one forward
(its KV cache) and keeps the longest prefix it agrees with, plus its own next token. With greedy
verification the output is token for token the teacher's greedy output (Leviathan et al. 2023;
Chen et al. 2023); only the number of teacher forwards changes. Both models see the image: each
gets its own rendering of the prompt (its processor's image-token expansion), the generated
tokens are shared (teacher and draft must share the tokenizer).

Why not `teacher.generate(..., assistant_model=draft)`: transformers' assisted generation hands
the draft the teacher's model kwargs only when the vocabularies match and expects the two to
take the same `input_ids`; a draft with another image expansion would silently read the wrong
prompt, and it reports no acceptance statistics. The loop here is ~60 lines, batch 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from modistill.errors import UserError
from modistill.eval.generate import encode_batch, load_image, render_prompt


@dataclass
class SpeculativeStats:
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, accepted by the teacher
    teacher_forwards: int = 0  # prefill + one per verification
    generated: int = 0  # tokens in the output
    per_prompt: list[dict[str, int]] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_teacher_forward(self) -> float:
        return self.generated / self.teacher_forwards if self.teacher_forwards else float("nan")

    def add(self, other: SpeculativeStats) -> None:
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.teacher_forwards += other.teacher_forwards
        self.generated += other.generated
        self.per_prompt.append(
            {
                "proposed": other.proposed,
                "accepted": other.accepted,
                "teacher_forwards": other.teacher_forwards,
                "generated": other.generated,
            }
        )


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return set(eos if isinstance(eos, list) else [eos])


def _forward(model: Any, ids: list[int], cache: DynamicCache, extra: dict[str, Any]) -> torch.Tensor:
    """Logits [len(ids), V] of feeding `ids` after what `cache` holds (the image only at prefill)."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    out = model(input_ids=x, past_key_values=cache, use_cache=True, **extra)
    return out.logits[0]


def _keep(cache: DynamicCache, length: int) -> None:
    """Drop the cache's positions beyond `length` (transformers 5's `crop` takes how many to remove, negative)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.inference_mode()
def speculative_generate(
    teacher: Any,
    draft: Any,
    teacher_inputs: dict[str, torch.Tensor],
    draft_inputs: dict[str, torch.Tensor],
    *,
    max_new_tokens: int,
    num_draft: int,
    eos: set[int],
) -> tuple[list[int], SpeculativeStats]:
    """Greedy speculative decoding of one prompt: (new token ids, stats). Inputs: batch-1 processor outputs."""
    if num_draft < 1:
        raise UserError(f"--num-draft must be >= 1, not {num_draft}")
    stats = SpeculativeStats()
    t_cache, d_cache = DynamicCache(), DynamicCache()
    t_prompt, d_prompt = teacher_inputs["input_ids"][0].tolist(), draft_inputs["input_ids"][0].tolist()
    t_pixels = {k: v for k, v in teacher_inputs.items() if k == "pixel_values"}
    d_pixels = {k: v for k, v in draft_inputs.items() if k == "pixel_values"}
    logits = _forward(teacher, t_prompt, t_cache, t_pixels)
    stats.teacher_forwards += 1
    new = [int(logits[-1].argmax())]
    # The draft's prefill: the prompt alone with the image (a generated image-token id must never be
    # paired with image features).
    _forward(draft, d_prompt, d_cache, d_pixels)
    # Invariant: the teacher's cache holds every position but the last token of (its prompt + new); the
    # draft's may lag behind (`d_fed` new tokens fed) and catches up with the tokens it has not seen.
    d_fed = 0
    while len(new) < max_new_tokens and not eos.intersection(new):
        k = min(num_draft, max_new_tokens - len(new))
        proposal: list[int] = []
        feed = new[d_fed:]
        for _ in range(k):
            d_logits = _forward(draft, feed, d_cache, {})
            proposal.append(int(d_logits[-1].argmax()))
            feed = [proposal[-1]]
        # The draft cache now holds prompt + new + proposal[:-1].
        t_logits = _forward(teacher, [new[-1]] + proposal, t_cache, {})
        stats.teacher_forwards += 1
        preds = t_logits.argmax(-1).tolist()  # preds[i]: the teacher's token after proposal[:i]
        n = 0
        while n < k and proposal[n] == preds[n]:
            n += 1
        stats.proposed += k
        stats.accepted += n
        accepted = proposal[:n] + [preds[n]]
        base = len(new)  # new[-1] sits at position len(prompt) + base - 1
        new.extend(accepted)
        # Teacher cache: keep prompt + new[:-1] (it fed new[base-1] and proposal; the bonus token is unfed).
        _keep(t_cache, len(t_prompt) + len(new) - 1)
        # Draft cache: keep what agrees with new, at most what it holds.
        keep = min(base + n, base + k - 1)
        _keep(d_cache, len(d_prompt) + keep)
        d_fed = keep
    if any(t in eos for t in new):
        new = new[: next(i for i, t in enumerate(new) if t in eos) + 1]
    new = new[:max_new_tokens]
    stats.generated = len(new)
    return new, stats


@torch.inference_mode()
def teacher_greedy(
    teacher: Any, inputs: dict[str, torch.Tensor], *, max_new_tokens: int, pad_id: int, eos: set[int]
) -> list[int]:
    """The teacher alone, greedy, through transformers' `generate` (the reference the output must equal)."""
    out = teacher.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_k=None,
        top_p=None,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos),
        use_cache=True,
    )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def check_pair(teacher: Any, t_proc: Any, draft: Any, d_proc: Any) -> None:
    if t_proc.tokenizer.get_vocab() != d_proc.tokenizer.get_vocab():
        raise UserError(
            "--draft-model: the draft's tokenizer differs from the teacher's; a drafter must share the "
            "teacher's tokenizer (a student distilled from it does)"
        )
    rows = min(teacher.get_output_embeddings().weight.shape[0], draft.get_output_embeddings().weight.shape[0])
    if rows < len(t_proc.tokenizer):
        raise UserError("--draft-model: a model's LM head is smaller than the tokenizer")


def speculate(
    teacher: Any,
    t_proc: Any,
    draft: Any,
    d_proc: Any,
    items: list[dict[str, Any]],
    *,
    max_new_tokens: int = 48,
    num_draft: int = 4,
    image_root: Any = None,
) -> dict[str, Any]:
    """Teacher alone vs teacher + draft on the same prompts (greedy, batch 1): identity, acceptance, speed-up."""
    check_pair(teacher, t_proc, draft, d_proc)
    teacher.eval()
    draft.eval()
    eos = _eos_ids(teacher, t_proc.tokenizer)
    stats = SpeculativeStats()
    time_alone = time_spec = 0.0
    identical = 0
    for item in items:
        image = load_image(item["image"], image_root, item.get("source", ""))
        t_in = encode_batch(t_proc, [image], [render_prompt(t_proc, str(item["text"]))], teacher)
        d_in = encode_batch(d_proc, [image], [render_prompt(d_proc, str(item["text"]))], draft)
        start = time.perf_counter()
        alone = teacher_greedy(
            teacher, t_in, max_new_tokens=max_new_tokens, pad_id=t_proc.tokenizer.pad_token_id, eos=eos
        )
        time_alone += time.perf_counter() - start
        start = time.perf_counter()
        spec, one = speculative_generate(
            teacher, draft, t_in, d_in, max_new_tokens=max_new_tokens, num_draft=num_draft, eos=eos
        )
        time_spec += time.perf_counter() - start
        identical += int(alone == spec)
        stats.add(one)
    return {
        "prompts": len(items),
        "identical": identical,
        "all_identical": identical == len(items),
        "num_draft": num_draft,
        "max_new_tokens": max_new_tokens,
        "acceptance_rate": stats.acceptance_rate,
        "tokens_per_teacher_forward": stats.tokens_per_teacher_forward,
        "generated_tokens": stats.generated,
        "teacher_forwards": stats.teacher_forwards,
        "seconds_teacher_alone": time_alone,
        "seconds_speculative": time_spec,
        "speedup": time_alone / time_spec if time_spec > 0 else float("nan"),
        "per_prompt": stats.per_prompt,
    }


def speculate_files(
    model: str,
    draft_model: str,
    data: list[str],
    *,
    limit: int | None = 20,
    max_new_tokens: int = 48,
    num_draft: int = 4,
    image_root: str | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """`modistill speculate`: load teacher and draft, read prompts from eval files, compare decoding."""
    from modistill.eval.run import load_eval_file, load_vlm  # the eval runner, only for this entry point

    teacher, _ = load_vlm(model, dtype)
    draft, _ = load_vlm(draft_model, dtype)
    items = []
    for path in data:
        s = load_eval_file(path, limit=limit)
        items += [
            {"image": str(s.image_root / str(r["image"])), "text": str(r["text"]), "source": w}
            for r, w in zip(s.rows, s.where, strict=True)
        ]
    result = speculate(
        teacher.model,
        teacher.processor,
        draft.model,
        draft.processor,
        items,
        max_new_tokens=max_new_tokens,
        num_draft=num_draft,
        image_root=image_root,
    )
    result.update(model=str(model), draft_model=str(draft_model), data=[str(p) for p in data])
    return result


def format_speculation(r: dict[str, Any]) -> str:
    return (
        f"{r['prompts']} prompts, K={r['num_draft']} draft tokens: output identical to the teacher alone on "
        f"{r['identical']}/{r['prompts']}; acceptance {r['acceptance_rate']:.3f}; "
        f"{r['tokens_per_teacher_forward']:.2f} tokens per teacher forward; "
        f"teacher alone {r['seconds_teacher_alone']:.2f} s, with the draft {r['seconds_speculative']:.2f} s "
        f"(speed-up {r['speedup']:.2f}x)"
    )
