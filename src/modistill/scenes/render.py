"""Rendering scene graphs to small RGB images with Pillow.

Each object is drawn centred in its grid cell (up to `position_jitter` px off-centre), so with
cell = patch size every object sits inside one vision patch. The centre pixel of a cell always lies
inside the shape drawn there, which the tests use to check that an image really holds its graph.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from modistill.scenes.world import PALETTE, Scene, SceneObject, WorldConfig

# Shape extent as a fraction of the cell side.
SIZE_FRACTION = {"small": 0.5, "large": 0.88}


def _shape_box(obj: SceneObject, cfg: WorldConfig, dx: int, dy: int) -> tuple[float, float, float, float]:
    cell = cfg.cell
    side = SIZE_FRACTION[obj.size] * cell
    cx = obj.col * cell + cell / 2 + dx
    cy = obj.row * cell + cell / 2 + dy
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def _draw_object(
    draw: ImageDraw.ImageDraw, obj: SceneObject, cfg: WorldConfig, colour: tuple[int, int, int], dx: int, dy: int
) -> None:
    x0, y0, x1, y1 = _shape_box(obj, cfg, dx, dy)
    # Pillow boxes are inclusive of the end pixel: subtract 1 so sizes are what they say.
    x1, y1 = x1 - 1, y1 - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif obj.shape == "cross":
        t = max(2.0, (x1 - x0) / 6)  # wide enough to cover the cell centre under position jitter
        draw.rectangle((x0, cy - t, x1, cy + t), fill=colour)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=colour)
    else:  # WorldConfig validation makes this unreachable
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, cfg: WorldConfig, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` (background, objects with slight colour/position jitter, pixel noise)."""
    size = cfg.image_size
    img = Image.new("RGB", (size, size), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        base = np.array(PALETTE[obj.colour])
        jitter = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=3) if cfg.colour_jitter else 0
        r, g, b = (int(v) for v in np.clip(base + jitter, 0, 255))
        colour = (r, g, b)
        # Less jitter for shapes only a few pixels wide, so the cell centre stays inside the shape.
        jit = min(cfg.position_jitter, int(SIZE_FRACTION[obj.size] * cfg.cell / 4) - 1)
        dx, dy = rng.integers(-jit, jit + 1, size=2) if jit > 0 else (0, 0)
        _draw_object(draw, obj, cfg, colour, int(dx), int(dy))
    if cfg.pixel_noise > 0:
        arr = np.asarray(img, dtype=np.float32)
        arr += rng.normal(0.0, cfg.pixel_noise, size=arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    return img


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """An independent stream per image, so rendering order (or parallelism) never changes pixels."""
    return np.random.default_rng([seed, 0 if split == "train" else 1, index])
