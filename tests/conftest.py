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
