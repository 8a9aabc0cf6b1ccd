"""`modistill upcycle` on a directory holding only the model, or the model and some processor files."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from helpers import vlm_batch
from modistill.cli import main

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _subset(src, dst, names) -> None:
    dst.mkdir()
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


@pytest.mark.parametrize("extra", [(), TOKENIZER_FILES], ids=["model-only", "model+tokenizer"])
def test_upcycle_needs_no_processor_and_copies_what_exists(extra, tiny_vlm_dir, tmp_path):
    src, out = tmp_path / "dense", tmp_path / "moe"
    _subset(tiny_vlm_dir, src, MODEL_FILES + extra)
    assert main(["upcycle", "--model", str(src), "--out", str(out), "--layers", "all"]) == 0
    written = {p.name for p in out.iterdir()}
    assert "processor_config.json" not in written
    for name in extra:  # copied byte for byte, not re-serialised
        assert (out / name).read_bytes() == (src / name).read_bytes()
    if not extra:
        assert not written & set(TOKENIZER_FILES)
    dense = AutoModelForImageTextToText.from_pretrained(src).eval()
    moe = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert moe.config.text_config.model_type == "qwen3_moe"
    batch = vlm_batch(AutoProcessor.from_pretrained(tiny_vlm_dir))
    with torch.no_grad():
        torch.testing.assert_close(moe(**batch).logits, dense(**batch).logits, atol=1e-5, rtol=0)


def test_upcycle_copies_a_full_processor(tiny_vlm_dir, tmp_path):
    out = tmp_path / "moe"
    assert main(["upcycle", "--model", str(tiny_vlm_dir), "--out", str(out)]) == 0
    for name in ("processor_config.json",) + TOKENIZER_FILES:
        if (tiny_vlm_dir / name).is_file():
            assert (out / name).read_bytes() == (tiny_vlm_dir / name).read_bytes()
    assert (out / "processor_config.json").is_file()
