"""Offline teacher cache: the teacher's top-k log-probs at every response position, on disk.

Run the teacher once (`modistill cache-teacher`), then train stages 1a/1b without it in memory.
Layout of a cache directory:

    manifest.json            written last: a cache without it is incomplete
    shard-00000.safetensors  ids [T, k] int32, logprobs [T, k] float32, targets [T] int32,
                             offsets [n+1] int64 (sample i owns rows offsets[i]:offsets[i+1]);
                             metadata "sample_ids": JSON list

`targets` (the response token each row predicts) lets training check, sample by sample, that the
student sees exactly the tokens the cache was made for. Bytes per token: 8k + 4 (k=32: 260 B).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modistill.errors import UserError
from modistill.io import write_json_atomic
from modistill.losses.fused import topk_from_logits
from modistill.losses.teachers import TeacherTopK
from modistill.runtime.inputs import ResponseStates
from modistill.teacher.fingerprint import data_fingerprint, tokenizer_fingerprint
from modistill.teacher.live import check_aligned

FORMAT = "modistill-teacher-cache/1"


@dataclass
class CacheIdentity:
    """What a cache must match to be used: recorded at write time, compared at read time."""

    teacher: str
    teacher_fingerprint: str
    data_fingerprint: str
    tokenizer_fingerprint: str
    vocab_rows: int
    top_k: int
    temperature: float


def cache_identity(
    data_cfg,
    tokenizer,
    vocab_rows: int,
    temperature: float,
    top_k: int = 0,
    teacher: str = "",
    teacher_fingerprint: str = "",
) -> CacheIdentity:
    """The identity a run expects of its cache (teacher fields are informative, not compared)."""
    return CacheIdentity(
        teacher=teacher,
        teacher_fingerprint=teacher_fingerprint,
        data_fingerprint=data_fingerprint(data_cfg.train, data_cfg.max_length, data_cfg.max_samples),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_rows=vocab_rows,
        top_k=top_k,
        temperature=temperature,
    )


class TeacherCacheWriter:
    """Accumulates per-sample top-k rows and writes shards of `shard_size` samples."""

    def __init__(self, out_dir: str | Path, identity: CacheIdentity, shard_size: int = 1024):
        self.out_dir = Path(out_dir)
        self.identity = identity
        self.shard_size = shard_size
        self._buffer: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._shards: list[str] = []
        self.num_samples = 0
        self.num_tokens = 0

    @torch.no_grad()
    def add_batch(
        self,
        sample_ids,
        hidden: torch.Tensor,
        head_weight: torch.Tensor,
        targets: torch.Tensor,
        counts: torch.Tensor,
        head_bias: torch.Tensor | None = None,
        chunk_size: int = 256,
    ) -> None:
        """hidden [N, H] at response positions of the batch (grouped by sample, `counts` [B] rows each)."""
        weight = head_weight[: self.identity.vocab_rows]
        bias = None if head_bias is None else head_bias[: self.identity.vocab_rows]
        ids_parts, lp_parts = [], []
        for start in range(0, hidden.shape[0], chunk_size):
            logits = torch.nn.functional.linear(
                hidden[start : start + chunk_size].float(), weight.float(), None if bias is None else bias.float()
            )
            ids, logprobs = topk_from_logits(logits, self.identity.top_k, self.identity.temperature)
            ids_parts.append(ids.to(torch.int32).cpu())
            lp_parts.append(logprobs.float().cpu())
        ids = torch.cat(ids_parts) if ids_parts else torch.zeros(0, self.identity.top_k, dtype=torch.int32)
        logprobs = torch.cat(lp_parts) if lp_parts else torch.zeros(0, self.identity.top_k)
        targets = targets.to(torch.int32).cpu()
        start = 0
        for sample_id, count in zip(sample_ids, counts.tolist()):
            end = start + count
            self._buffer.append((str(sample_id), ids[start:end], logprobs[start:end], targets[start:end]))
            start = end
        self.num_samples += len(counts)
        self.num_tokens += int(hidden.shape[0])
        while len(self._buffer) >= self.shard_size:
            self._flush(self._buffer[: self.shard_size])
            self._buffer = self._buffer[self.shard_size :]

    def _flush(self, rows) -> None:
        name = f"shard-{len(self._shards):05d}.safetensors"
        counts = torch.tensor([0] + [r[1].shape[0] for r in rows], dtype=torch.int64)
        tensors = {
            "ids": torch.cat([r[1] for r in rows]).contiguous(),
            "logprobs": torch.cat([r[2] for r in rows]).contiguous(),
            "targets": torch.cat([r[3] for r in rows]).contiguous(),
            "offsets": counts.cumsum(0),
        }
        tmp = self.out_dir / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata={"sample_ids": json.dumps([r[0] for r in rows])})
        tmp.replace(self.out_dir / name)
        self._shards.append(name)

    def close(self) -> dict:
        if self._buffer:
            self._flush(self._buffer)
            self._buffer = []
        size = sum((self.out_dir / s).stat().st_size for s in self._shards)
        manifest = {
            "format": FORMAT,
            **self.identity.__dict__,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "bytes": size,
            "bytes_per_token": round(size / max(self.num_tokens, 1), 1),
            "shards": self._shards,
        }
        write_json_atomic(self.out_dir / "manifest.json", manifest)
        return manifest


class TeacherCache:
    """Reads a cache; `targets(batch, student_states)` serves the trainer like a live teacher."""

    def __init__(self, cache_dir: str | Path, expected: CacheIdentity | None = None):
        self.dir = Path(cache_dir)
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(
                f"{self.dir}: not a complete teacher cache (no manifest.json); run `modistill cache-teacher`"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{manifest_path}: unknown cache format {self.manifest.get('format')!r}")
        if expected is not None:
            self._check(expected)
        self._handles: dict[str, Any] = {}
        self._index: dict[str, tuple[str, int, int]] = {}
        for shard in self.manifest["shards"]:
            handle = self._open(shard)
            offsets = handle.get_tensor("offsets").tolist()
            for i, sample_id in enumerate(json.loads(handle.metadata()["sample_ids"])):
                self._index[sample_id] = (shard, offsets[i], offsets[i + 1])

    def _check(self, expected: CacheIdentity) -> None:
        m = self.manifest
        checks = [
            ("data_fingerprint", "the training data (files or max_length) changed since the cache was made"),
            ("tokenizer_fingerprint", "the student's tokenizer differs from the one the cache was made for"),
            ("vocab_rows", "the student's vocabulary size differs"),
            ("temperature", "loss.temperature differs from the cache's temperature"),
        ]
        for key, why in checks:
            if m.get(key) != getattr(expected, key):
                raise UserError(
                    f"{self.dir}: teacher cache does not match this run: {why} "
                    f"({key}: cache {m.get(key)!r}, run {getattr(expected, key)!r}); re-run `modistill cache-teacher`"
                )

    def _open(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard]

    def lookup(self, sample_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [N,k], logprobs [N,k], targets [N], counts [B] for the samples, in order."""
        ids, lps, targets, counts = [], [], [], []
        for sample_id in sample_ids:
            try:
                shard, start, end = self._index[str(sample_id)]
            except KeyError:
                raise UserError(
                    f"sample {sample_id}: not in teacher cache {self.dir}; re-run `modistill cache-teacher`"
                ) from None
            handle = self._open(shard)
            ids.append(handle.get_slice("ids")[start:end])
            lps.append(handle.get_slice("logprobs")[start:end])
            targets.append(handle.get_slice("targets")[start:end])
            counts.append(end - start)
        return torch.cat(ids), torch.cat(lps), torch.cat(targets), torch.tensor(counts)

    def targets(self, batch: dict, student: ResponseStates) -> TeacherTopK:
        ids, logprobs, targets, counts = self.lookup(batch["sample_ids"])
        check_aligned(student, targets.long(), counts, batch["sample_ids"], who="teacher cache")
        device = student.hidden.device
        return TeacherTopK(ids.long().to(device), logprobs.to(device))
