"""Small helpers shared by tests."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image


def red_image(size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), (200, 30, 30))


def vlm_batch(processor, prompt: str = "describe the image.", n: int = 1, size: int = 32):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[red_image(size)] * n, text=[text] * n, return_tensors="pt")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run `modistill ARGS` in a fresh interpreter (exit code, stdout, stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "modistill.cli", *args], capture_output=True, text=True, timeout=300)
