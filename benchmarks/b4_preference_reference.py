"""B4: a stage-2 (preference distillation) step with the precomputed teacher reference vs no reference term.

The student is a text-only Qwen3 (hidden 256 x 4, V = 151,936) upcycled to 4 experts top-2 on
layers 0 and 2, with stage 2's trainable groups (experts, routers, dense FFNs; the LM head frozen);
the reference is the teacher (hidden 512 x 6). 4 pairs, each answer 256 tokens of which the first
64 are the shared prompt. Variants, each a whole PreferenceTrainer step (paired KTO + balance loss,
backward, clip, AdamW step):
- precomputed reference: log pi_T read from a `ReferenceStore` (the default, `reference: precompute`);
- no reference term: the same step with a constant zero reference (what the step costs without it);
- live reference: the teacher run on every pair each step (`reference: live`), for comparison.

    python benchmarks/b4_preference_reference.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

import benchlib as bl
import steps
from modistill.runtime.groups import set_trainable
from modistill.runtime.inputs import pair_inputs, pair_logps
from modistill.stages.preference import PreferenceLoss, PreferenceTrainer
from modistill.teacher.reference import LiveReference, ReferenceStore, StoredReference, save_reference
from modistill.upcycle import upcycle

TARGET = 1.05


class ZeroReference:
    """No reference term: log pi_ref = 0 for every answer (the loss keeps its shape)."""

    def lookup_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(batch["sample_ids"])
        return torch.zeros(n), torch.zeros(n)


def pair_batch(pairs: int, length: int, prompt: int, vocab: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, vocab, (pairs, prompt), generator=gen)
    batch = {"sample_ids": [f"p{seed}-{i}" for i in range(pairs)]}
    for side in ("chosen", "rejected"):
        ids = torch.cat([prompt_ids, torch.randint(0, vocab, (pairs, length - prompt), generator=gen)], dim=1)
        labels = ids.clone()
        labels[:, :prompt] = -100
        batch.update(
            {f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids), f"{side}_labels": labels}
        )
    return batch


def store_reference(teacher, batch: dict, out_dir: str, chunk_size: int) -> ReferenceStore:
    inputs, labels = pair_inputs(batch, "teacher_", 0)
    with torch.no_grad():
        seq, _, _ = pair_logps(teacher, inputs, labels, "sum", chunk_size)
    half = len(seq) // 2
    save_reference(out_dir, list(batch["sample_ids"]), seq[:half].float(), seq[half:].float(), {"bench": True})
    return ReferenceStore(out_dir, {"bench": True})


def main(argv: list[str] | None = None) -> dict:
    parser = bl.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    bl.setup_threads()
    started = time.perf_counter()
    vocab, pairs, length, prompt, student_size, teacher_size = 151_936, 4, 256, 64, (256, 4), (512, 6)
    repeats = args.repeats
    if args.quick:
        vocab, pairs, length, prompt, student_size, teacher_size, repeats = 4096, 2, 64, 16, (64, 2), (128, 2), 1
    loss = PreferenceLoss()  # kto_pair, beta 0.1, balance 0.01, chunk 256

    student = upcycle(bl.qwen3_lm(*student_size, vocab, seed=0), 4, 2, "every-other", seed=0)
    # Stage 2 groups of an MoE student (the projector group only exists in a VLM).
    trainable = set_trainable(student, ["dense_mlp", "experts", "routers"])
    teacher = bl.qwen3_lm(*teacher_size, vocab, seed=1)
    teacher.eval().requires_grad_(False)
    batch = pair_batch(pairs, length, prompt, vocab, seed=2)
    warm = pair_batch(pairs, 16, 4, vocab, seed=3)
    store = store_reference(teacher, batch, tempfile.mkdtemp(prefix="modistill-bench-ref-"), loss.chunk_size)
    warm_store = store_reference(teacher, warm, tempfile.mkdtemp(prefix="modistill-bench-ref-"), loss.chunk_size)

    def trainer(reference) -> PreferenceTrainer:
        return PreferenceTrainer(
            model=student, args=steps.training_args(), loss_config=loss, reference=reference, pad_id=0
        )

    stored, zero, live = (
        trainer(StoredReference(store)),
        trainer(ZeroReference()),
        trainer(LiveReference(teacher, loss.logps, 0, loss.chunk_size)),
    )
    runner = steps.StepRunner(student, stored)

    def variants(b: dict, s: ReferenceStore) -> dict:
        stored.reference = StoredReference(s)
        return {
            "no reference term": runner.bind(zero, b),
            "precomputed reference (ReferenceStore)": runner.bind(stored, b),
            "live reference (teacher forward each step)": runner.bind(live, b),
        }

    print("B4 warm-up (small batch)")
    bl.interleaved(variants(warm, warm_store), repeats=1, warmup=0)
    print(f"B4: {pairs} pairs x 2 x {length} tokens, vocabulary {vocab:,}, {repeats} interleaved repetitions")
    runs = bl.interleaved(variants(batch, store), repeats=repeats, warmup=0)

    base = runs["no reference term"]
    rows = [
        [name, r["median_s"], r["median_s"] / base["median_s"], r["median_peak_extra_bytes"] / bl.GB]
        for name, r in runs.items()
    ]
    table = bl.markdown_table(["stage-2 step", "s/step", "/ no-reference step", "peak extra GB"], rows)
    ratio = runs["precomputed reference (ReferenceStore)"]["median_s"] / base["median_s"]
    notes = [
        f"Student: Qwen3 hidden {student_size[0]} x {student_size[1]} upcycled to 4 experts top-2 on every other "
        f"layer ({bl.parameter_count(student) / 1e6:.1f}M; trainable {sum(trainable.values()) / 1e6:.1f}M: "
        f"{', '.join(sorted(trainable))}), vocabulary {vocab:,}; {pairs} pairs, answers {length} tokens "
        f"({prompt} prompt); paired KTO beta 0.1 + 0.01 balance; medians of {repeats} interleaved repetitions.",
        f"precomputed reference / no reference = {ratio:.3f} (target <= {TARGET}: "
        f"{'met' if ratio <= TARGET else 'MISSED'}).",
    ]
    data = {
        "vocab": vocab,
        "pairs": pairs,
        "length": length,
        "runs": runs,
        "ratio_precomputed_over_none": ratio,
        "trainable": trainable,
    }
    return bl.finish(
        "b4_preference_reference",
        "B4 - stage-2 step: precomputed reference vs no reference term",
        [table],
        notes,
        data,
        started,
        args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
