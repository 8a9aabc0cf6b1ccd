"""B3: a KD step from the offline teacher cache (top-32) vs the student's CE step; cache bytes per token.

Same student, vocabulary and batch as B2 (hidden 256 x 4, V = 151,936, 4 x 512, every token a
response token). The teacher runs once to write the cache (`TeacherCacheWriter`, as `modistill
cache-teacher` does) and is then deleted; the KD step reads the batch's rows from the safetensors
shards (`TeacherCache.targets`, alignment check included) and computes KL against the coarse top-k
distribution. Each variant is a whole step (forward, backward, clip, AdamW step).

    python benchmarks/b3_cached_teacher_step.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time

import benchlib as bl
import steps
from modistill.runtime.inputs import output_head
from modistill.teacher.cache import CacheIdentity, TeacherCache, TeacherCacheWriter
from modistill.teacher.live import LiveTeacher

TARGET = 1.10
DISTILLKIT_BYTES_PER_TOKEN = 300  # DistillKit's stored top-k logits, as reported by its authors (~300 B/token)


def write_cache(teacher, batch: dict, vocab: int, top_k: int, out_dir: str) -> dict:
    identity = CacheIdentity(
        teacher="bench-teacher",
        teacher_fingerprint="-",
        data_fingerprint="-",
        tokenizer_fingerprint="-",
        vocab_rows=vocab,
        top_k=top_k,
        temperature=1.0,
    )
    writer = TeacherCacheWriter(out_dir, identity, shard_size=1024)
    states = LiveTeacher(teacher, vocab).forward(batch)
    weight, bias = output_head(teacher)
    writer.add_batch(batch["sample_ids"], states.hidden, weight, states.targets, states.counts, bias)
    return writer.close()


def main(argv: list[str] | None = None) -> dict:
    parser = bl.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=32)
    args = parser.parse_args(argv)
    bl.setup_threads()
    started = time.perf_counter()
    vocab, batch_size, length, student_size, teacher_size = 151_936, 4, 512, (256, 4), (512, 6)
    repeats = args.repeats
    if args.quick:
        vocab, batch_size, length, student_size, teacher_size, repeats = 4096, 2, 64, (64, 2), (128, 2), 1

    student = bl.qwen3_lm(*student_size, vocab, seed=0)
    teacher = bl.qwen3_lm(*teacher_size, vocab, seed=1)
    teacher.eval().requires_grad_(False)
    batch = bl.token_batch(batch_size, length, vocab, seed=2)
    warm = bl.token_batch(batch_size, 16, vocab, seed=3)
    cache_dir = tempfile.mkdtemp(prefix="modistill-bench-cache-")
    t0 = time.perf_counter()
    manifest = write_cache(teacher, batch, vocab, args.top_k, cache_dir)
    write_cache_s = time.perf_counter() - t0
    warm_dir = tempfile.mkdtemp(prefix="modistill-bench-cache-")
    write_cache(teacher, warm, vocab, args.top_k, warm_dir)
    del teacher  # the point of the cache: training never holds the teacher
    gc.collect()

    ce = steps.ce_trainer(student)
    sft = steps.distill_trainer(student, None, kd_weight=0.0, ce_weight=1.0)
    kd = steps.distill_trainer(student, TeacherCache(cache_dir), kd_weight=1.0, ce_weight=0.0)
    kd_ce = steps.distill_trainer(student, TeacherCache(cache_dir), kd_weight=1.0, ce_weight=1.0)
    runner = steps.StepRunner(student, kd)

    def variants(b: dict, source_dir: str) -> dict:
        kd.teacher = kd_ce.teacher = TeacherCache(source_dir)
        return {
            "student CE step": runner.bind(ce, steps.model_batch(b)),
            "modistill SFT step (chunked CE)": runner.bind(sft, b),
            f"modistill KD, cached top-{args.top_k}": runner.bind(kd, b),
            f"modistill KD + CE, cached top-{args.top_k}": runner.bind(kd_ce, b),
        }

    print("B3 warm-up (small batch)")
    bl.interleaved(variants(warm, warm_dir), repeats=1, warmup=0)
    print(f"B3: batch {batch_size} x {length}, vocabulary {vocab:,}, {repeats} interleaved repetitions")
    runs = bl.interleaved(variants(batch, cache_dir), repeats=repeats, warmup=0)

    base = runs["student CE step"]
    rows = [
        [
            name,
            r["median_s"],
            r["median_s"] / base["median_s"],
            r["median_peak_extra_bytes"] / bl.GB,
            r["median_peak_extra_bytes"] / base["median_peak_extra_bytes"],
        ]
        for name, r in runs.items()
    ]
    table = bl.markdown_table(["step", "s/step", "/ CE step", "peak extra GB", "peak extra / CE step's"], rows)
    cache_table = bl.markdown_table(
        ["cache", "tokens", "bytes", "bytes/token", "DistillKit bytes/token", "write time s (teacher fwd + top-k)"],
        [
            [
                f"top-{args.top_k}",
                manifest["num_tokens"],
                manifest["bytes"],
                manifest["bytes_per_token"],
                DISTILLKIT_BYTES_PER_TOKEN,
                write_cache_s,
            ]
        ],
    )
    ratio = runs[f"modistill KD, cached top-{args.top_k}"]["median_s"] / base["median_s"]
    notes = [
        f"Student hidden {student_size[0]} x {student_size[1]} ({bl.parameter_count(student) / 1e6:.1f}M), vocabulary "
        f"{vocab:,}, batch {batch_size} x {length}, fp32, every token a response token; medians of {repeats} "
        "interleaved repetitions.",
        f"cached KD / CE step = {ratio:.2f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'MISSED'}).",
        f"Cache layout: ids int32 + log-probs fp32 per kept token and a target id: 8k + 4 = "
        f"{8 * args.top_k + 4} B/token plus the safetensors header.",
    ]
    data = {
        "vocab": vocab,
        "batch": [batch_size, length],
        "runs": runs,
        "manifest": manifest,
        "write_cache_s": write_cache_s,
        "ratio_cached_kd_over_ce": ratio,
    }
    return bl.finish(
        "b3_cached_teacher_step",
        "B3 - cached-teacher KD step vs student CE step",
        [table, cache_table],
        notes,
        data,
        started,
        args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
