"""Shared fixtures: a locally trained tiny tokenizer and tiny VLMs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    from modistill.models.tiny import tiny_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory, tok_dir):
    """A saved tiny dense Qwen3 Llava (SigLIP tower) with its processor."""
    from modistill.models.build import build_vlm
    from modistill.models.tiny import tiny_spec

    model, processor = build_vlm(tiny_spec(tok_dir))
    path = tmp_path_factory.mktemp("tiny_vlm")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def scenes_world(tmp_path_factory):
    """A small scenes world: images, LLaVA-format data, preference pairs, eval sets, tokenizer."""
    from modistill.scenes.build import build_world
    from modistill.scenes.world import WorldConfig

    path = tmp_path_factory.mktemp("world") / "world"
    build_world(path, WorldConfig(), n_train=48, n_test=8, seed=0, n_prefs=16, progress=False)
    return path


def vlm_spec(world, text_hidden: int, patch: int = 16, vision=None, seed: int = 0, text_type: str = "qwen3"):
    from modistill.models.spec import ModelSpec, TextSpec, VisionSpec

    return ModelSpec(
        vision=vision
        or VisionSpec(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, image_size=48, patch_size=patch),
        text=TextSpec(
            type=text_type,
            hidden_size=text_hidden,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=2 * text_hidden,
        ),
        tokenizer=str(world / "tokenizer"),
        seed=seed,
    )


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, scenes_world):
    """A (random) dense teacher VLM on the world's tokenizer; distillation tests need no trained one."""
    from modistill.models.build import build_vlm

    model, processor = build_vlm(vlm_spec(scenes_world, text_hidden=48, seed=1))
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, scenes_world, teacher_dir):
    """A dense student sharing the teacher's vision tower (as in LLaVA-MoD)."""
    from modistill.models.build import build_vlm
    from modistill.models.spec import VisionSpec

    spec = vlm_spec(scenes_world, text_hidden=32, vision=VisionSpec(pretrained=str(teacher_dir)), seed=2)
    model, processor = build_vlm(spec)
    path = tmp_path_factory.mktemp("student")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
