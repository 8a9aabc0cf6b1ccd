"""Shared helpers of the benchmarks: machine description, interleaved timing, peak memory, tables, results.

Timing: every variant of a benchmark runs in the same process, one repetition of each in turn
(A, B, C, A, B, C, ...) after a warm-up round, and the median is reported: on a shared 2-core
machine a burst of load elsewhere then hits every variant alike, and ratios are taken within one run.

Memory: a daemon thread samples the process's resident set size (psutil) every 2 ms while a
variant runs; the figure is the peak minus the RSS just before. Before each measured call freed
heap pages are handed back to the OS (gc + glibc malloc_trim), else the call would reuse pages an
earlier variant left resident and show less growth than it needs. glibc serves buffers of 32 MB
and more (every logits buffer here) with mmap and returns them on free, so they are counted exactly.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from modistill.eval.efficiency import RssPeak

# run_all --quick points this elsewhere so tiny runs never overwrite the real figures.
RESULTS_DIR = Path(os.environ.get("MODISTILL_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
GB = 1e9
MB = 1e6
START_LOAD = round(os.getloadavg()[0], 2)  # when the benchmark's process started


# ----------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import accelerate
    import transformers
    import trl

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "trl": trl.__version__,
        "transparent_hugepages": thp.read_text().strip() if thp.is_file() else "n/a",
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        # Other processes on the machine (1-minute load average; 2 cores = fully busy at 2.0).
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def setup_threads() -> None:
    """Use every core (2 here), as a training run would."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------ memory
def release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def process_rss() -> int:
    return psutil.Process().memory_info().rss


# ------------------------------------------------------------------------------------------ timing
def interleaved(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, log: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """Run each variant `warmup` + `repeats` times, in turn; time and peak extra RSS of each call.

    Returns {name: {"seconds": [...], "peak_extra_bytes": [...], "median_s", "median_peak_extra_bytes"}}.
    """
    runs: dict[str, dict[str, list]] = {name: {"seconds": [], "peak_extra_bytes": []} for name in variants}
    for round_index in range(warmup + repeats):
        for name, fn in variants.items():
            release_free_memory()
            with RssPeak(interval=0.002) as rss:
                start = time.perf_counter()
                fn()
                seconds = time.perf_counter() - start
            tag = "warm-up" if round_index < warmup else f"rep {round_index - warmup + 1}"
            log(f"  {tag:8s} {name:28s} {seconds:8.2f} s   peak +{rss.delta / MB:8.0f} MB")
            if round_index >= warmup:
                runs[name]["seconds"].append(round(seconds, 4))
                runs[name]["peak_extra_bytes"].append(rss.delta)
    return {
        name: {
            **r,
            "median_s": statistics.median(r["seconds"]),
            "median_peak_extra_bytes": int(statistics.median(r["peak_extra_bytes"])),
        }
        for name, r in runs.items()
    }


# ----------------------------------------------------------------------------------------- results
def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def finish(
    name: str,
    title: str,
    tables: list[str],
    notes: list[str],
    data: dict[str, Any],
    started: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Print the tables and write results/<name>.json (what run_all puts into RESULTS.md)."""
    machine = machine_info()
    notes = notes + [
        f"Load average (1 min) at the start / end of this benchmark: {START_LOAD} / "
        f"{machine['load_average_1min']} on {machine['logical_cores']} cores (this benchmark alone "
        "keeps it near the core count; more means other processes shared the machine)."
    ]
    result = {
        "name": name,
        "title": title,
        "quick": bool(getattr(args, "quick", False)),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine,
        "tables": tables,
        "notes": notes,
        "data": data,
    }
    print(f"\n## {title}\n")
    for table in tables:
        print(table + "\n")
    for note in notes:
        print(f"- {note}")
    print(f"\n({result['seconds']} s) -> {write_result(name, result)}")
    return result


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=3, help="measured repetitions per variant (median)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: checks that it runs")
    return parser


# ------------------------------------------------------------------------------------------ models
def qwen3_lm(hidden: int, layers: int, vocab: int, seed: int, head_dim: int = 64):
    """A text-only Qwen3 causal LM from a config (no download): heads of 64, MLP 3x hidden, untied."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = max(1, hidden // head_dim)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        intermediate_size=3 * hidden,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def token_batch(batch: int, length: int, vocab: int, seed: int, prompt: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids; labels = ids with the first `prompt` positions masked (-100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "sample_ids": [f"s{seed}-{i}" for i in range(batch)],
    }
