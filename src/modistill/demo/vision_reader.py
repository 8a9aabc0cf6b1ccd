"""Pretrain the demo's vision tower as a reader of the scene graph, before any language model sees it.

LLaVA-MoD's teacher and student share a *pretrained* CLIP: the VLM stages never teach the tower to
see, they teach the language model to talk about what it sees. The scenes world has no CLIP, so the
demo makes one the cheap way: a SigLIP tower whose every patch (one grid cell) is classified into
its object's colour, shape and size, or "empty". The labels come from the training scene graphs
(never the test ones). Afterwards the heads are dropped and the tower is saved as a plain
`SiglipVisionModel` directory with its image processor, which `vision.pretrained` accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel, Trainer, TrainingArguments

from modistill.data.images import open_rgb
from modistill.demo.onpolicy import read_train_scenes
from modistill.errors import UserError
from modistill.io import atomic_output_dir, write_json_atomic
from modistill.models.processor import build_image_processor
from modistill.scenes.world import Scene, WorldConfig


@dataclass
class ReaderPlan:
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-3
    validation: int = 500  # training scenes held out to measure the reader (never test scenes)


class SceneReader(nn.Module):
    """A SigLIP tower with linear heads on each patch: colour, shape and size (+ "empty"), and the
    patch's row and column, so that the tower's output still says where each patch is."""

    def __init__(self, config: SiglipVisionConfig, world: WorldConfig):
        super().__init__()
        self.tower = SiglipVisionModel(config)
        h = config.hidden_size
        self.heads = nn.ModuleDict(
            {
                "colour": nn.Linear(h, len(world.colours) + 1),
                "shape": nn.Linear(h, len(world.shapes) + 1),
                "size": nn.Linear(h, len(world.sizes) + 1),
                # The joint colour x shape class: a kind is one direction of the token, so a question
                # about a "red triangle" can find it with one query instead of two separate matches.
                "kind": nn.Linear(h, len(world.colours) * len(world.shapes) + 1),
                "row": nn.Linear(h, world.grid),
                "col": nn.Linear(h, world.grid),
            }
        )

    def forward(self, pixel_values, colour, shape, size):
        """pixel_values (B, 3, H, W); colour/shape/size (B, P) class ids, 0 = empty cell."""
        # The last layer's output before the post-layernorm: what a Llava model reads (vision_feature_layer -1).
        states = self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]  # (B, P, h)
        cells = torch.arange(states.shape[1], device=states.device).expand(states.shape[:2])
        grid = self.heads["row"].out_features
        n_shapes = self.heads["shape"].out_features - 1
        kind = torch.where(colour > 0, (colour - 1) * n_shapes + shape, 0)
        labels = {
            "colour": colour,
            "shape": shape,
            "size": size,
            "kind": kind,
            "row": cells // grid,
            "col": cells % grid,
        }
        logits = {k: head(states) for k, head in self.heads.items()}
        loss = sum(nn.functional.cross_entropy(logits[k].flatten(0, 1), labels[k].flatten()) for k in labels)
        return {"loss": loss, "logits": logits}


def cell_labels(scene: Scene, world: WorldConfig) -> dict[str, list[int]]:
    """Per grid cell (reading order): 1 + index of the object's colour/shape/size, 0 where empty."""
    n = scene.grid * scene.grid
    labels = {"colour": [0] * n, "shape": [0] * n, "size": [0] * n}
    for o in scene.objects:
        cell = o.row * scene.grid + o.col
        labels["colour"][cell] = 1 + world.colours.index(o.colour)
        labels["shape"][cell] = 1 + world.shapes.index(o.shape)
        labels["size"][cell] = 1 + world.sizes.index(o.size)
    return labels


def _tensors(world_dir: Path, rows: list[tuple[str, Scene]], world: WorldConfig, processor) -> dict:
    pixels = processor(images=[open_rgb(world_dir / image) for image, _ in rows], return_tensors="pt")
    labels = [cell_labels(scene, world) for _, scene in rows]
    out = {"pixel_values": pixels["pixel_values"]}
    for key in ("colour", "shape", "size"):
        out[key] = torch.tensor([lab[key] for lab in labels])
    return out


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["pixel_values"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


@torch.no_grad()
def reader_accuracy(model: SceneReader, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-cell accuracy of each head, and the share of images whose whole graph is read right."""
    model.eval()
    out = model(**tensors)["logits"]
    right = {k: out[k].argmax(-1) == tensors[k] for k in ("colour", "shape", "size")}
    every = torch.stack(list(right.values())).all(0)
    return {
        **{f"{k}_accuracy": v.float().mean().item() for k, v in right.items()},
        "scene_accuracy": every.all(-1).float().mean().item(),
    }


def pretrain_reader(
    world_dir: str | Path, out_dir: str | Path, plan: ReaderPlan, seed: int = 0, progress: bool = True
) -> dict:
    """Train the reader on `world_dir`'s training scenes and save its tower to `out_dir`."""
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    world = WorldConfig(**json.loads((world_dir / "world.json").read_text())["config"])
    patch = world.cell
    if world.image_size % patch:
        raise UserError(f"{world_dir}: image size {world.image_size} is not a multiple of its cell {patch}")
    config = SiglipVisionConfig(
        hidden_size=plan.hidden_size,
        intermediate_size=2 * plan.hidden_size,
        num_hidden_layers=plan.num_layers,
        num_attention_heads=plan.num_heads,
        image_size=world.image_size,
        patch_size=patch,  # one patch per grid cell: the reader's labels are per patch
        vision_use_head=False,  # SigLIP's pooling head: a Llava model reads patch states, never the pool
    )
    processor = build_image_processor("siglip", world.image_size)
    rows = read_train_scenes(world_dir)
    if len(rows) <= plan.validation:
        raise UserError(f"{world_dir}: {len(rows)} training scenes; the reader needs more than {plan.validation}")
    val = _tensors(world_dir, rows[: plan.validation], world, processor)
    train = _tensors(world_dir, rows[plan.validation :], world, processor)
    torch.manual_seed(seed)
    model = SceneReader(config, world)
    with atomic_output_dir(out_dir, overwrite=True, kind="vision-reader") as tmp:
        args = TrainingArguments(
            output_dir=str(tmp / "checkpoints"),
            max_steps=plan.steps,
            per_device_train_batch_size=plan.batch_size,
            learning_rate=plan.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            weight_decay=0.0,
            logging_steps=max(1, plan.steps // 10),
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not progress,
            remove_unused_columns=False,
        )
        Trainer(model=model, args=args, train_dataset=_Rows(train)).train()
        metrics = reader_accuracy(model, val)
        model.tower.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json_atomic(tmp / "metrics.json", {"validation_scenes": plan.validation, **metrics})
    return metrics
