"""Efficiency of a VLM: parameters (total / activated), decode speed, peak memory of generation.

What is measured (the paper's efficiency table reports tokens/s and memory on one A100):
- parameters: `modistill.info.parameter_counts` (activated = what one token uses in an MoE);
- speed: greedy generation of exactly `new_tokens` tokens (min_new_tokens = max_new_tokens, so EOS
  cannot cut a run short) on one image + prompt, at batch 1 and at `batch_size`. Each setting is
  timed `repeats` times after a warm-up and the fastest run is kept (timeit's convention: on a
  shared 2-core machine another busy process only ever adds time, so the minimum is the most
  reproducible figure; every run's time is kept in `seconds_all`).
  `generate_tokens_per_s` = batch * new_tokens / wall time of the whole generate() call (vision
  tower, prefill and decode: what a user waits for); `decode_tokens_per_s` = batch * (new_tokens - 1)
  / (t(new_tokens) - t(1)): the decode steps alone, prefill subtracted;
- peak memory of one batched generate() call, in a separate run (the sampler thread would perturb
  the timings). GPU: `torch.cuda.max_memory_allocated` minus the allocation before the call (tensors
  only, no allocator cache). CPU: the process's resident set size (RSS) sampled every millisecond by a
  background thread with psutil, peak minus the RSS before the call; without psutil, the kernel's
  exact high-water mark VmHWM after resetting it through /proc/self/clear_refs (Linux). Before the
  call freed heap pages are handed back to the OS (gc + glibc malloc_trim), else generation would
  reuse pages the earlier runs left resident and show no growth. RSS still depends on the
  allocator: treat the delta as +-10 MB / +-30 %, and `peak_bytes` (whole process: weights,
  Python, torch) as the figure comparable to the paper's memory column. torch's CPU allocations
  are invisible to tracemalloc and resource.getrusage cannot be reset, hence neither is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from modistill.eval.generate import check_vlm, encode_batch, generation_kwargs, render_prompt
from modistill.info import parameter_counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ memory
class RssPeak:
    """Peak RSS of this process while the `with` block runs (psutil, polled by a daemon thread).

    Also used by benchmarks/: `delta` is the peak extra memory over the RSS at entry.
    """

    def __init__(self, interval: float = 0.001) -> None:
        import psutil  # optional: the caller falls back to VmHWM when it is missing

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.before = self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> RssPeak:
        self.before = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.before)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(match.group(1)) * 1024


def _vmhwm_peak(fn: Callable[[], Any]) -> tuple[int, int]:
    """(RSS before, peak RSS during fn) from the kernel's high-water mark, reset first ("5" > clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    fn()
    return before, _status_kb("VmHWM")


def _release_free_memory() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)  # glibc only; elsewhere RSS just stays higher
    except (OSError, AttributeError, TypeError):
        pass


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Run fn once and report the memory it added at its peak (see the module docstring)."""
    _release_free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        method = "torch.cuda.max_memory_allocated"
    else:
        try:
            with RssPeak() as sampler:
                fn()
            before, peak, method = sampler.before, sampler.peak, "RSS sampled every 1 ms (psutil)"
        except ImportError:
            try:
                before, peak = _vmhwm_peak(fn)
                method = "VmHWM after /proc/self/clear_refs reset"
            except OSError:
                return {"method": "unavailable (no psutil, no /proc)", "peak_bytes": None, "delta_bytes": None}
    return {"method": method, "before_bytes": before, "peak_bytes": peak, "delta_bytes": max(0, peak - before)}


# ------------------------------------------------------------------------------------- speed
def _blank_image(processor: Any) -> Image.Image:
    size = getattr(processor.image_processor, "size", None) or {}
    side = int(dict(size).get("height") or dict(size).get("shortest_edge") or 224)
    return Image.new("RGB", (side, side), (128, 128, 128))


def measure_efficiency(
    model: Any,
    processor: Any,
    *,
    image: Image.Image | None = None,
    prompt: str = "Describe the image in detail.",
    new_tokens: int = 32,
    batch_size: int = 8,
    repeats: int = 3,
    memory: bool = True,
) -> dict[str, Any]:
    """Parameters, greedy decode speed at batch 1 and `batch_size`, and peak generation memory."""
    check_vlm(model, processor)
    if new_tokens < 2 or batch_size < 1 or repeats < 1:
        raise ValueError("need new_tokens >= 2, batch_size >= 1, repeats >= 1")
    device = model.device
    image = image if image is not None else _blank_image(processor)
    text = render_prompt(processor, prompt)
    param = next(model.parameters())
    result: dict[str, Any] = {
        "parameters": parameter_counts(model),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "device": str(device),
        "dtype": str(param.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "new_tokens": new_tokens,
        "repeats": repeats,
    }
    was_training = model.training
    model.eval()

    def run(batch: dict[str, torch.Tensor], n: int) -> Callable[[], Any]:
        kwargs = generation_kwargs(
            model, processor, max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=1.0
        )

        def go() -> None:
            out = model.generate(**batch, **kwargs)
            if out.shape[1] - batch["input_ids"].shape[1] != n:  # the count is what the speed divides by
                raise RuntimeError(
                    f"generate() stopped after {out.shape[1] - batch['input_ids'].shape[1]} of {n} tokens"
                )

        return go

    try:
        with torch.inference_mode():
            for name, bs in (("batch1", 1), ("batched", batch_size)):
                batch = encode_batch(processor, [image] * bs, [text] * bs, model)
                full, first = run(batch, new_tokens), run(batch, 1)
                first()  # warm-up: lazy initialisation, allocator growth
                # Interleaved, so a burst of load elsewhere hits both kinds of run alike.
                times = [(_timed(full, device), _timed(first, device)) for _ in range(repeats)]
                t_full, t_first = min(t for t, _ in times), min(t for _, t in times)
                decode = t_full - t_first
                result[name] = {
                    "batch_size": bs,
                    "seconds": t_full,
                    "seconds_all": [round(t, 5) for t, _ in times],
                    "prefill_seconds": t_first,
                    "generate_tokens_per_s": bs * new_tokens / t_full,
                    "decode_tokens_per_s": bs * (new_tokens - 1) / decode if decode > 0 else float("nan"),
                }
            if memory:
                batch = encode_batch(processor, [image] * batch_size, [text] * batch_size, model)
                result["peak_memory"] = {"batch_size": batch_size, **peak_memory(run(batch, new_tokens), device)}
    finally:
        model.train(was_training)
    return result
