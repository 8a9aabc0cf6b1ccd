"""FSDP2 through the Trainer, on GPUs and on CPU processes (torchrun + gloo), and its full save.

A stage config's `train.fsdp` / `train.fsdp_config` become `TrainingArguments.fsdp` /
`fsdp_config`; the Trainer turns them into Accelerate's `FullyShardedDataParallelPlugin` and
Accelerate's `prepare` calls `fully_shard` on each wrapped layer class and on the model.

Accelerate 1.15 switches to FSDP only on accelerator devices (GPU, NPU, XPU, ...): with
`use_cpu` it keeps `MULTI_CPU` (plain DDP) and drops the plugin without a word. PyTorch's FSDP2
itself shards on CPU with gloo, so `CpuFsdpMixin` switches the accelerator state to FSDP with
the same plugin the GPU path builds; everything after that (wrapping, the optimizer on DTensors,
gradient reduce-scatter, clipping, checkpoint save/resume) is Accelerate's and the Trainer's own
FSDP code. It changes nothing where Accelerate already enabled FSDP, or where no FSDP was asked.
"""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer

from modistill.errors import UserError


class CpuFsdpMixin(Trainer):
    """Trainer mixin: honour `fsdp` / `fsdp_config` on CPU processes as on GPUs (FSDP2 only)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        plugin_args = self.args.fsdp_plugin_args
        state = self.accelerator.state
        if plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
            return
        if int(plugin_args.get("fsdp_version", 1)) != 2:
            raise UserError("train.fsdp_config.version: FSDP on CPU processes needs FSDP2; set version: 2")
        plugin = FullyShardedDataParallelPlugin(**plugin_args)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        # As AcceleratorState does itself at the end of its setup: every later AcceleratorState()
        # (the optimizer wrapper, the save helpers) re-reads the distributed type from PartialState.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


def full_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The student's full (unsharded) weights under FSDP, else None (the model holds them already).

    A collective: every rank must call it. The main process gets the full tensors on the CPU,
    to pass as `save_pretrained(state_dict=...)`; the checkpoint is then a plain one.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)
