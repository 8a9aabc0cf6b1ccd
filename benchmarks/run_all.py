"""Run every benchmark (each in a fresh process, one after the other) and write benchmarks/RESULTS.md.

    make bench                              # = python benchmarks/run_all.py
    python benchmarks/run_all.py --only b2_live_teacher_step b3_cached_teacher_step
    python benchmarks/run_all.py --quick    # tiny sizes, results in a temporary directory

Each benchmark prints its table and writes benchmarks/results/<name>.json; this script collects
them into RESULTS.md with the machine, the command and the total wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "b1_kd_loss_memory",
    "b2_live_teacher_step",
    "b3_cached_teacher_step",
    "b4_preference_reference",
    "b5_moe_decode",
    "b6_speculative_decode",
    "b7_demo_batches",
]

# What the numbers rest on, independent of one run's figures (those are in the tables above it).
HOW_TO_READ = """\
## How to read these figures

- Every ratio compares variants measured in the same process, one repetition of each in turn
  (A, B, C, A, B, C, ...), medians reported. The machine is shared and noisy: absolute seconds
  drift by +-15 % (or more) between runs; compare ratios within one run only.
- "peak extra" is the process's RSS peak during one call minus its RSS just before (psutil, sampled
  every 2 ms, freed heap returned with malloc_trim first): the memory the step or loss itself needs,
  weights and optimizer state excluded.
- Why the fused KD path is cheap: `fused_distill_loss` processes the response rows in chunks and
  computes each chunk's gradient during the forward pass (forward KL + CE in closed form,
  (softmax(s/T) - p_T)/T and softmax(s) - onehot(y); other divergences through a private autograd
  graph), pushes it through the LM head at once and keeps only [N, H] and [V, H] gradients for
  backward. Full-vocabulary logits never exist, each head matmul runs once (no checkpoint
  recomputation), and the chunk buffers (chunk x V x 4 bytes) are the only vocabulary-sized
  allocations. On this VM a fresh 1.2 GB logits buffer costs about as much kernel time (page faults,
  zero-fill) as the matmul that fills it, which is why the full-logit paths (the CE step included)
  are slower than their FLOPs suggest.
- Environment knob: `THP_MEM_ALLOC_ENABLE=1` makes PyTorch back large CPU tensors with transparent
  huge pages (useful when the kernel is in `madvise` mode, as here): fewer page faults for every
  large fresh buffer. B1's last table measures it; the benchmarks themselves run without it.
"""


GPU_NOTE = """## GPU - the paper's shapes

`benchmarks/gpu_paper_shapes.py` (one GPU, <= 8 min) is not part of `make bench`, which runs on the
CPU: run it on a GPU machine; it writes `benchmarks/results/gpu_paper_shapes.json` (stage-1b and
stage-2 steps at the paper's shapes in bf16: tokens/s, peak GPU memory, MFU; TRL GKDTrainer as peer).
"""


def run_one(name: str, quick: bool, env: dict) -> tuple[int, float]:
    command = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if quick else [])
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, env=env)
    return done.returncode, time.perf_counter() - start


def machine_line(machine: dict) -> str:
    return (
        f"{machine['cpu']}, {machine['logical_cores']} logical cores ({machine['torch_threads']} torch threads), "
        f"{machine['memory_gb']} GiB RAM; Python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, accelerate {machine['accelerate']}, trl {machine['trl']}; transparent huge "
        f"pages: {machine['transparent_hugepages']}, THP_MEM_ALLOC_ENABLE={machine['THP_MEM_ALLOC_ENABLE']}"
    )


def write_report(path: Path, results_dir: Path, names: list[str], status: dict, total_s: float, command: str) -> None:
    results = {}
    for name in names:
        file = results_dir / f"{name}.json"
        if status[name][0] == 0 and file.is_file():
            results[name] = json.loads(file.read_text())
    machine = next(iter(results.values()))["machine"] if results else None
    lines = ["# modistill benchmarks", ""]
    if machine:
        lines += [f"Machine: {machine_line(machine)}.", f"Date: {machine['date']}.", ""]
    lines += [
        f"Command: `{command}`; total wall time {total_s / 60:.1f} min "
        f"({', '.join(f'{n.split(chr(95))[0]} {status[n][1]:.0f} s' for n in names)}).",
        "",
    ]
    for name in names:
        rc, seconds = status[name]
        if name not in results:
            lines += [f"## {name}", "", f"FAILED (exit code {rc}, {seconds:.0f} s): see the console output.", ""]
            continue
        r = results[name]
        lines += [f"## {r['title']}", ""]
        for table in r["tables"]:
            lines += [table, ""]
        lines += [f"- {note}" for note in r["notes"]]
        lines += [f"- Source: `benchmarks/{name}.py`; raw figures: `benchmarks/results/{name}.json`.", ""]
    lines.append(GPU_NOTE)
    lines.append(HOW_TO_READ)
    path.write_text("\n".join(lines))
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a check that all of them run)")
    args = parser.parse_args(argv)
    names = args.only or BENCHMARKS
    env = dict(os.environ)
    results_dir = HERE / "results"
    report = HERE / "RESULTS.md"
    if args.quick:  # never overwrite the real figures with tiny ones
        results_dir = Path(tempfile.mkdtemp(prefix="modistill-bench-quick-"))
        report = results_dir / "RESULTS.md"
    env["MODISTILL_BENCH_RESULTS"] = str(results_dir)
    command = "make bench" if not (args.quick or args.only) else "python benchmarks/run_all.py " + " ".join(argv or [])
    start = time.perf_counter()
    status = {name: run_one(name, args.quick, env) for name in names}
    total = time.perf_counter() - start
    write_report(report, results_dir, names, status, total, command)
    print(f"total {total / 60:.1f} min")
    return 0 if all(rc == 0 for rc, _ in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
