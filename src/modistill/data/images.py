"""Decode an image file the way every modistill path sees it: upright, RGB, transparency on white.

Photographs come as JPEG/PNG in any mode (RGBA, LA, L, P with a palette or transparency, CMYK, 16-bit)
and phone pictures carry an EXIF orientation tag instead of rotated pixels. Training, `data check`,
`chat` and `eval` all decode through `open_rgb`, so a model sees one picture however it is read.
Transparent pixels are composited on white, as transformers' `convert_to_rgb` does for a PIL image a
user passes to the processor: plain `convert("RGB")` would expose whatever colour is stored beneath.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from modistill.data.image_safety import open_image


def to_rgb(image: Image.Image) -> Image.Image:
    """An upright RGB copy of `image` (EXIF orientation applied, alpha composited on white)."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit greyscale: keep the top 8 bits
        image = image.point(lambda v: v / 256).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Open and fully decode the image at `path` as upright RGB (Pillow's errors propagate)."""
    with open_image(path) as im:  # a regular file, its pixel count bounded before decoding
        return to_rgb(im)
