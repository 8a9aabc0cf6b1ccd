"""B1: memory and time of the KD loss alone at a 151,936-token vocabulary, fused/chunked vs plain.

Both paths start from the same final hidden states (student [N, H] with gradient, teacher [N, H]
constant) and LM heads [V, H], and run forward + backward of forward KL(teacher || student) at T=1:
- plain: student logits and teacher logits in full, F.kl_div on their log-softmaxes (what most KD
  code does);
- fused: modistill's `fused_distill_loss` with `TeacherHidden` (chunks of `chunk_size` rows; the
  gradient of each chunk is computed and pushed through the head before the next chunk).
Reported: peak extra RSS of the call (above the RSS before it: weights and inputs excluded), and time.

    python benchmarks/b1_kd_loss_memory.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import benchlib as bl
from modistill.losses import TeacherHidden, fused_distill_loss

VOCAB = 151_936
DEFAULT_CHUNK = 256  # LossConfig.chunk_size
TARGET_MEMORY, TARGET_TIME = 0.10, 1.3


def make_inputs(rows: int, hidden: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(rows, hidden, generator=gen).requires_grad_(True),
        "weight": (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).requires_grad_(True),
        "teacher_hidden": torch.randn(rows, hidden, generator=gen),
        "teacher_weight": torch.randn(vocab, hidden, generator=gen) * hidden**-0.5 * 1.5,
        "labels": torch.randint(0, vocab, (rows,), generator=gen),
    }


def plain_kd(x: dict[str, torch.Tensor]) -> float:
    student = F.linear(x["hidden"], x["weight"])
    with torch.no_grad():
        teacher = F.linear(x["teacher_hidden"], x["teacher_weight"])
    loss = (
        F.kl_div(
            F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True, reduction="sum"
        )
        / student.shape[0]
    )
    loss.backward()
    return float(loss)


def fused_kd(x: dict[str, torch.Tensor], chunk_size: int) -> float:
    teacher = TeacherHidden(x["teacher_hidden"], x["teacher_weight"])
    loss = fused_distill_loss(x["hidden"], x["weight"], teacher=teacher, labels=x["labels"], chunk_size=chunk_size)[
        "loss"
    ]
    loss.backward()
    return float(loss)


def variants(x: dict[str, torch.Tensor], chunks: list[int]) -> dict:
    def clear_grads() -> None:
        x["hidden"].grad = x["weight"].grad = None

    def run(fn, *args):
        def go():
            clear_grads()
            fn(x, *args)
            clear_grads()  # the gradient is part of the call's peak, not of the next call's baseline

        return go

    table = {"plain (full logits, F.kl_div)": run(plain_kd)}
    for chunk in chunks:
        table[f"fused, chunk {chunk}"] = run(fused_kd, chunk)
    return table


def thp_worker(rows: int, hidden: int, vocab: int, chunk: int) -> None:
    """Child process of the huge-page probe: seconds of one plain and one fused call (after a warm-up)."""
    x = make_inputs(rows, hidden, vocab)
    plain_kd(x)
    times = {}
    for name, fn in (("plain", lambda: plain_kd(x)), ("fused", lambda: fused_kd(x, chunk))):
        x["hidden"].grad = x["weight"].grad = None
        start = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - start
    print(json.dumps(times))


def thp_probe(rows: int, hidden: int, vocab: int, chunk: int, rounds: int = 2) -> dict:
    """THP_MEM_ALLOC_ENABLE=0/1 (PyTorch backs large CPU tensors with huge pages), alternating processes."""
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    for _ in range(rounds):
        for setting in runs:
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting}
            out = subprocess.run(
                [sys.executable, __file__, "--thp-worker", str(rows), str(hidden), str(vocab), str(chunk)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
    return {
        setting: {name: statistics.median(r[name] for r in rs) for name in ("plain", "fused")}
        for setting, rs in runs.items()
    }


def main(argv: list[str] | None = None) -> dict:
    parser = bl.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        default=[64, 128, 256, 512, 1024],
        help="chunk sizes tried on a quarter of the rows first",
    )
    parser.add_argument("--thp-worker", type=int, nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.thp_worker:
        bl.setup_threads()
        return thp_worker(*args.thp_worker)
    bl.setup_threads()
    started = time.perf_counter()
    vocab, rows, hidden = VOCAB, args.batch * args.length, args.hidden
    repeats = args.repeats
    if args.quick:
        vocab, rows, hidden, repeats, args.sweep = 8192, 256, 64, 1, [32, 128]

    # Sanity: both paths compute the same loss and gradient (small slice, float64-free check).
    check = make_inputs(64, hidden, vocab, seed=1)
    plain_kd(check)
    want = check["hidden"].grad.clone()
    check["hidden"].grad = check["weight"].grad = None
    fused_kd(check, 16)
    torch.testing.assert_close(check["hidden"].grad, want, rtol=1e-4, atol=1e-6)
    del check

    # 1. Chunk-size sweep on a quarter of the rows (per-row costs do not depend on the row count;
    #    the chunk buffers do not depend on it either). One repetition each.
    sweep_rows = max(rows // 4, max(args.sweep))
    print(f"B1 sweep: {sweep_rows} rows x V={vocab}, hidden {hidden}")
    x = make_inputs(sweep_rows, hidden, vocab)
    sweep = bl.interleaved(variants(x, args.sweep), repeats=1, warmup=0)  # the sanity check warmed up
    del x
    plain_sweep = sweep.pop("plain (full logits, F.kl_div)")
    best = min(args.sweep, key=lambda c: sweep[f"fused, chunk {c}"]["median_s"])
    # The headline compares the default chunk size and the fastest one of the sweep with plain.
    chosen = sorted({DEFAULT_CHUNK if DEFAULT_CHUNK <= rows else args.sweep[-1], best})

    # 2. Headline: the full batch, interleaved repetitions.
    print(f"B1 headline: {rows} rows x V={vocab}, hidden {hidden}, chunks {chosen}, {repeats} repetitions")
    x = make_inputs(rows, hidden, vocab)
    head = bl.interleaved(variants(x, chosen), repeats=repeats, warmup=0)
    plain = head["plain (full logits, F.kl_div)"]

    rows_out = []
    for name, r in head.items():
        rows_out.append(
            [
                name,
                r["median_s"],
                r["median_s"] / plain["median_s"],
                r["median_peak_extra_bytes"] / bl.GB,
                r["median_peak_extra_bytes"] / plain["median_peak_extra_bytes"],
            ]
        )
    headline = bl.markdown_table(
        ["path (forward + backward of the loss)", "s", "time / plain", "peak extra GB", "memory / plain"], rows_out
    )
    sweep_rows_out = [["plain", plain_sweep["median_s"], 1.0, plain_sweep["median_peak_extra_bytes"] / bl.MB, 1.0]]
    for chunk in args.sweep:
        r = sweep[f"fused, chunk {chunk}"]
        sweep_rows_out.append(
            [
                f"fused, chunk {chunk}",
                r["median_s"],
                r["median_s"] / plain_sweep["median_s"],
                r["median_peak_extra_bytes"] / bl.MB,
                r["median_peak_extra_bytes"] / plain_sweep["median_peak_extra_bytes"],
            ]
        )
    sweep_table = bl.markdown_table(
        ["sweep (1/4 of the rows)", "s", "time / plain", "peak extra MB", "memory / plain"], sweep_rows_out
    )
    default = head.get(f"fused, chunk {DEFAULT_CHUNK}") or head[f"fused, chunk {chosen[0]}"]
    mem_ratio = default["median_peak_extra_bytes"] / plain["median_peak_extra_bytes"]
    time_ratio = default["median_s"] / plain["median_s"]
    notes = [
        f"{rows} rows (batch x length), vocabulary {vocab:,}, student and teacher hidden {hidden}, fp32, "
        f"forward KL at T=1 on every row; {torch.get_num_threads()} threads; medians of {repeats} interleaved "
        "repetitions.",
        f"Default chunk ({DEFAULT_CHUNK}): memory {mem_ratio:.3f} of plain (target <= {TARGET_MEMORY}: "
        f"{'met' if mem_ratio <= TARGET_MEMORY else 'MISSED'}), time {time_ratio:.2f}x (target <= {TARGET_TIME}: "
        f"{'met' if time_ratio <= TARGET_TIME else 'MISSED'}). Fastest chunk in the sweep: {best}.",
        "Peak extra = RSS peak during the call minus RSS before it (inputs and weights excluded; the weight "
        "gradient, 1 x [V, H], is included for both paths).",
    ]
    del x
    probe_rows = 64 if args.quick else 256
    print(f"B1 huge-page probe: {probe_rows} rows, THP_MEM_ALLOC_ENABLE=0/1 in alternating processes")
    thp = thp_probe(probe_rows, hidden, vocab, DEFAULT_CHUNK, rounds=1 if args.quick else 2)
    thp_table = bl.markdown_table(
        [f"THP_MEM_ALLOC_ENABLE ({probe_rows} rows)", "plain s", "fused s (chunk 256)", "fused / plain"],
        [[setting, t["plain"], t["fused"], t["fused"] / t["plain"]] for setting, t in thp.items()],
    )
    notes.append(
        f"Huge pages: with THP_MEM_ALLOC_ENABLE=1 the plain path takes {thp['1']['plain'] / thp['0']['plain']:.2f}x "
        f"and the fused path {thp['1']['fused'] / thp['0']['fused']:.2f}x the time without (medians of alternating "
        "fresh processes); the benchmarks themselves run without it."
    )
    data = {
        "rows": rows,
        "vocab": vocab,
        "hidden": hidden,
        "headline": head,
        "sweep": {**sweep, "plain": plain_sweep},
        "best_chunk": best,
        "memory_ratio_default": mem_ratio,
        "time_ratio_default": time_ratio,
        "thp_probe": thp,
    }
    return bl.finish(
        "b1_kd_loss_memory",
        "B1 - KD loss memory and time at V=151,936",
        [headline, sweep_table, thp_table],
        notes,
        data,
        started,
        args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
