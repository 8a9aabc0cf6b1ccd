"""B6: speculative decoding with a small student drafting for a large teacher (greedy, output unchanged).

Random-weight VLMs sharing one tokenizer (speed does not depend on the weights; acceptance does):
- teacher: SigLIP 48 px + Qwen3 hidden 768 x 8 (the largest that keeps this benchmark to a few
  minutes on 2 CPU cores); draft: the same tower + Qwen3 hidden 256 x 4.
Measured (batch 1, greedy, fp32, medians over interleaved rounds):
- teacher alone (`generate`, KV cache) vs `modistill.eval.speculative.speculative_generate` with the
  random draft (acceptance ~0: the worst case, what a useless drafter costs), output checked identical;
- the cost of one teacher forward over K+1 tokens vs over 1 token, and of one draft token.
From these, the speed-up a drafter with acceptance α would give at this scale (the standard model:
E[tokens per teacher forward] = (1 − α^(K+1)) / (1 − α)); α measured on distilled pairs at demo scale
is read from docs/ablations_onpolicy.json when present.

    python benchmarks/b6_speculative_decode.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import DynamicCache

import benchlib as bl
from modistill.eval.generate import encode_batch, render_prompt
from modistill.eval.speculative import speculative_generate, teacher_greedy
from modistill.info import parameter_counts
from modistill.models.build import build_vlm
from modistill.models.spec import ModelSpec, TextSpec, VisionSpec
from modistill.models.tiny import tiny_tokenizer

K = 4


def _spec(tok: str, hidden: int, layers: int, seed: int) -> ModelSpec:
    vision = VisionSpec(hidden_size=128, num_layers=3, num_heads=4, intermediate_size=512, image_size=48, patch_size=16)
    text = TextSpec(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=8 if hidden >= 512 else 4,
        num_kv_heads=2,
        intermediate_size=3 * hidden,
    )
    return ModelSpec(vision=vision, text=text, tokenizer=tok, seed=seed)


@torch.inference_mode()
def _forward_cost(model, inputs: dict, tokens: int, repeats: int) -> float:
    """Seconds of one cached forward over `tokens` new tokens after the prompt (median)."""
    times = []
    for _ in range(repeats):
        cache = DynamicCache()
        model(**inputs, past_key_values=cache, use_cache=True)
        x = torch.zeros((1, tokens), dtype=torch.long) + 5
        start = time.perf_counter()
        model(input_ids=x, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def predicted_speedup(alpha: float, k: int, t1: float, tk: float, td: float) -> float:
    """Teacher-alone time per token / speculative time per token, for acceptance α."""
    tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens * t1 / (k * td + tk)


def measured_alphas() -> dict[str, float]:
    path = Path(__file__).resolve().parent.parent / "docs" / "ablations_onpolicy.json"
    if not path.is_file():
        return {}
    return {s["draft"]: s["acceptance_rate"] for s in json.loads(path.read_text()).get("speculative", [])}


def main(argv: list[str] | None = None) -> dict:
    parser = bl.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    bl.setup_threads()
    started = time.perf_counter()
    repeats = 1 if args.quick else args.repeats
    new_tokens = 8 if args.quick else args.new_tokens
    tok = tempfile.mkdtemp(prefix="modistill-bench-tok-")
    tiny_tokenizer(tok)
    t_hidden, t_layers = (128, 2) if args.quick else (768, 8)
    teacher, processor = build_vlm(_spec(tok, t_hidden, t_layers, 1))
    draft, _ = build_vlm(_spec(tok, 256 if not args.quick else 64, 4 if not args.quick else 2, 2))
    for m in (teacher, draft):
        m.eval()
    image = Image.new("RGB", (48, 48), (200, 30, 30))
    inputs = encode_batch(processor, [image], [render_prompt(processor, "Describe the image briefly.")], teacher)
    # Greedy decoding of exactly new_tokens: no end-of-sequence can stop either path early.
    never = {-1}
    alone_s, spec_s, identical, stats = [], [], True, None
    for _ in range(repeats + 1):
        start = time.perf_counter()
        ref = teacher_greedy(
            teacher, inputs, max_new_tokens=new_tokens, pad_id=processor.tokenizer.pad_token_id, eos=never
        )
        alone_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        out, stats = speculative_generate(
            teacher, draft, inputs, inputs, max_new_tokens=new_tokens, num_draft=K, eos=never
        )
        spec_s.append(time.perf_counter() - start)
        identical &= out == ref
    alone, spec = statistics.median(alone_s[1:]), statistics.median(spec_s[1:])  # first round: warm-up
    t1 = _forward_cost(teacher, inputs, 1, repeats + 2)
    tk = _forward_cost(teacher, inputs, K + 1, repeats + 2)
    td = _forward_cost(draft, inputs, 1, repeats + 2)
    counts = {"teacher": parameter_counts(teacher), "draft": parameter_counts(draft)}
    rows = [
        ["teacher alone (generate)", alone, new_tokens / alone, 1.0, "-", "-"],
        [
            "teacher + random draft (measured)",
            spec,
            new_tokens / spec,
            alone / spec,
            f"{stats.acceptance_rate:.3f}",
            f"{stats.tokens_per_teacher_forward:.2f}",
        ],
    ]
    rows.append(["teacher alone, cached forwards (model)", new_tokens * t1, 1 / t1, 1.0, "-", "1.00"])
    alphas = {f"α = {a:g} (model)": a for a in (0.5, 0.7, 0.9)}
    alphas.update({f"α of demo drafter `{k}` (model)": v for k, v in measured_alphas().items()})
    for name, a in alphas.items():
        s = predicted_speedup(a, K, t1, tk, td)
        # Seconds against the modelled teacher alone (new_tokens cached forwards of t1 each).
        rows.append(
            [
                f"teacher + draft, {name}",
                new_tokens * t1 / s,
                s / t1,
                s,
                f"{a:.3f}",
                f"{(K + 1) if a >= 1 else (1 - a ** (K + 1)) / (1 - a):.2f}",
            ]
        )
    table = bl.markdown_table(
        ["decoding", "seconds", "tokens/s", "speed-up", "acceptance", "tokens / teacher fwd"], rows
    )
    notes = [
        f"Teacher {counts['teacher']['total'] / 1e6:.1f}M parameters (text h{t_hidden} x {t_layers}), draft "
        f"{counts['draft']['total'] / 1e6:.1f}M; batch 1, greedy, exactly {new_tokens} new tokens after a 48 px image "
        f"(9 image tokens); K = {K} draft tokens per verification; medians of {repeats} rounds after a warm-up.",
        f"Output of the speculative loop identical to the teacher alone: {identical}.",
        f"Costs: teacher forward over 1 token {t1 * 1e3:.1f} ms, over K+1 = {K + 1} tokens {tk * 1e3:.1f} ms "
        f"({tk / t1:.2f}x), draft token {td * 1e3:.1f} ms ({td / t1:.2f}x the teacher's).",
        "Modelled rows: speed-up = E[tokens per verification] x t1 / (K x t_draft + t_verify) against the teacher "
        "alone as t1 per token; `generate`'s and the loop's Python overhead are in the measured rows only.",
    ]
    data = {
        "counts": counts,
        "alone_s": alone_s,
        "spec_s": spec_s,
        "t1": t1,
        "tk": tk,
        "td": td,
        "k": K,
        "identical": identical,
        "acceptance_random_draft": stats.acceptance_rate,
        "alphas": alphas,
    }
    return bl.finish(
        "b6_speculative_decode",
        "B6 - the student as speculative drafter (greedy, output unchanged)",
        [table],
        notes,
        data,
        started,
        args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
