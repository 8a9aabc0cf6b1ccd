"""The demo's pretrained vision tower: a scene-graph reader whose tower loads as `vision.pretrained`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import SiglipVisionModel

from modistill.demo.onpolicy import read_train_scenes
from modistill.demo.vision_reader import ReaderPlan, SceneReader, cell_labels, pretrain_reader
from modistill.scenes.world import WorldConfig


def test_cell_labels_follow_the_scene_graph(scenes_world):
    world = WorldConfig(**json.loads((scenes_world / "world.json").read_text())["config"])
    for _, scene in read_train_scenes(scenes_world)[:10]:
        labels = cell_labels(scene, world)
        occupied = {o.row * scene.grid + o.col: o for o in scene.objects}
        for cell in range(scene.grid**2):
            obj = occupied.get(cell)
            expected = (
                (0, 0, 0)
                if obj is None
                else (
                    1 + world.colours.index(obj.colour),
                    1 + world.shapes.index(obj.shape),
                    1 + world.sizes.index(obj.size),
                )
            )
            assert (labels["colour"][cell], labels["shape"][cell], labels["size"][cell]) == expected


@pytest.mark.slow
def test_reader_learns_and_its_tower_builds_a_vlm(tmp_path, scenes_world):
    from modistill.config import from_dict
    from modistill.models.build import build_vlm
    from modistill.models.spec import ModelSpec

    plan = ReaderPlan(hidden_size=32, num_layers=1, num_heads=2, steps=60, batch_size=16, validation=8)
    out = tmp_path / "vision"
    metrics = pretrain_reader(scenes_world, out, plan, progress=False)
    # 40 training images, 60 steps: far from perfect, but well above always answering "empty".
    world = WorldConfig(**json.loads((scenes_world / "world.json").read_text())["config"])
    val = [cell_labels(s, world) for _, s in read_train_scenes(scenes_world)[:8]]
    empty_share = sum(v == 0 for lab in val for v in lab["colour"]) / (8 * 9)
    assert metrics["colour_accuracy"] > empty_share + 0.05
    tower = SiglipVisionModel.from_pretrained(out)
    assert tower.config.patch_size == world.cell and tower.config.hidden_size == 32
    spec = from_dict(
        ModelSpec,
        {
            "vision": {"pretrained": str(out)},
            "text": {"type": "qwen3", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
            "tokenizer": str(scenes_world / "tokenizer"),
        },
    )
    model, _ = build_vlm(spec)
    for name, p in tower.state_dict().items():  # the VLM carries the reader's tower unchanged
        torch.testing.assert_close(model.model.vision_tower.state_dict()[name], p)


def test_reader_loss_is_the_sum_of_per_head_cross_entropies():
    from transformers import SiglipVisionConfig

    torch.manual_seed(0)
    world = WorldConfig()
    config = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=48, patch_size=16
    )
    model = SceneReader(config, world)
    pixels = torch.randn(2, 3, 48, 48)
    labels = {k: torch.randint(0, n + 1, (2, 9)) for k, n in (("colour", 4), ("shape", 3), ("size", 2))}
    out = model(pixels, **labels)
    kind = torch.where(labels["colour"] > 0, (labels["colour"] - 1) * 3 + labels["shape"], 0)
    cells = torch.arange(9).expand(2, 9)
    every = {**labels, "kind": kind, "row": cells // 3, "col": cells % 3}
    logits = out["logits"]
    expected = sum(-torch.log_softmax(logits[k].double(), -1).gather(-1, every[k].unsqueeze(-1)).mean() for k in every)
    torch.testing.assert_close(out["loss"].double(), expected)
