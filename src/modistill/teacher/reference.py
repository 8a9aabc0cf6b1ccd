"""The reference model's sequence log-probs for preference pairs, computed once and stored.

In LLaVA-MoD's preference distillation the reference is the frozen teacher; it contributes only
log π_T(chosen) and log π_T(rejected) per pair, so they can be computed before training and the
teacher need not be in memory while the student trains.

    reference/manifest.json          teacher, fingerprints, logps mode (written last)
    reference/logps.safetensors      chosen [M], rejected [M] float32; metadata "sample_ids"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modistill.errors import UserError
from modistill.io import atomic_output_dir, write_json_atomic
from modistill.runtime.inputs import frozen_pair_logps

FORMAT = "modistill-reference-logps/1"


@torch.no_grad()
def compute_reference(
    teacher, dataset, collator, batch_size: int, mode: str, pad_id: int, chunk_size: int = 256
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Run the teacher over every pair once: sample ids, chosen logps [M], rejected logps [M]."""
    ids: list[str] = []
    chosen: list[torch.Tensor] = []
    rejected: list[torch.Tensor] = []
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    for batch in tqdm(loader, desc="reference log-probs", unit="batch"):
        batch_chosen, batch_rejected = frozen_pair_logps(teacher, batch, pad_id, mode, chunk_size)
        ids.extend(str(i) for i in batch["sample_ids"])
        chosen.append(batch_chosen.cpu())
        rejected.append(batch_rejected.cpu())
    return ids, torch.cat(chosen), torch.cat(rejected)


def save_reference(
    out_dir: str | Path, sample_ids: list[str], chosen: torch.Tensor, rejected: torch.Tensor, identity: dict
) -> None:
    with atomic_output_dir(out_dir, overwrite=True, kind="reference", legacy=("manifest.json",)) as tmp:
        save_file(
            {"chosen": chosen.contiguous(), "rejected": rejected.contiguous()},
            str(tmp / "logps.safetensors"),
            metadata={"sample_ids": json.dumps(sample_ids)},
        )
        write_json_atomic(tmp / "manifest.json", {"format": FORMAT, **identity, "num_pairs": len(sample_ids)})


class ReferenceStore:
    """Stored reference log-probs, refused when they were made for other data or another teacher."""

    def __init__(self, path: str | Path, expected: dict):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"{self.path}: no complete reference log-probs here (manifest.json missing)")
        manifest = json.loads(manifest_path.read_text())
        for key, value in expected.items():
            if manifest.get(key) != value:
                raise UserError(
                    f"{self.path}: stored reference log-probs do not match this run ({key}: stored "
                    f"{manifest.get(key)!r}, run {value!r}); delete the directory to recompute them"
                )
        with safe_open(str(self.path / "logps.safetensors"), framework="pt") as f:
            self.chosen = f.get_tensor("chosen")
            self.rejected = f.get_tensor("rejected")
            ids = json.loads(f.metadata()["sample_ids"])
        self.index = {sample_id: i for i, sample_id in enumerate(ids)}

    @staticmethod
    def exists(path: str | Path) -> bool:
        return (Path(path) / "manifest.json").is_file()

    def lookup(self, sample_ids) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            rows = torch.tensor([self.index[str(i)] for i in sample_ids])
        except KeyError as exc:
            raise UserError(f"sample {exc.args[0]}: no stored reference log-prob in {self.path}") from None
        return self.chosen[rows], self.rejected[rows]


class StoredReference:
    """The reference log-probs of a training batch, read from a `ReferenceStore`."""

    def __init__(self, store: ReferenceStore):
        self.store = store

    def lookup_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.lookup(batch["sample_ids"])


class LiveReference:
    """The teacher run beside the student: the same numbers as a `ReferenceStore`, every step."""

    def __init__(self, model, mode: str, pad_id: int, chunk_size: int):
        self.model, self.mode, self.pad_id, self.chunk_size = model, mode, pad_id, chunk_size

    def lookup_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return frozen_pair_logps(self.model, batch, self.pad_id, self.mode, self.chunk_size)
