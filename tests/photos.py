"""Real photographs for tests: matplotlib's grace_hopper.jpg and variants of it in every mode Pillow writes."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
EXIF_ORIENTATION = 0x0112


def photo_variants(out: Path) -> dict[str, Path]:
    """Write the variants into `out`: name -> path. "exif6" stores the pixels rotated, with the tag that undoes it."""
    out.mkdir(parents=True, exist_ok=True)
    with Image.open(GRACE_HOPPER) as im:
        rgb = im.convert("RGB")
    paths = {"jpeg": GRACE_HOPPER}
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))  # fully transparent top row
    variants = {
        "rgba.png": rgba,
        "grey.jpg": rgb.convert("L"),
        "palette.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "cmyk.jpg": rgb.convert("CMYK"),
        "tiny.png": rgb.resize((7, 5)),
        "large.jpg": rgb.resize((1700, 1990)),
    }
    for name, image in variants.items():
        image.save(out / name)
        paths[name.split(".")[0]] = out / name
    grey16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # 16-bit PNG, full range
    Image.fromarray(grey16).save(out / "grey16.png")
    paths["grey16"] = out / "grey16.png"
    palette = variants["palette.png"].copy()
    palette.save(out / "palette_transparent.png", transparency=0)
    paths["palette_transparent"] = out / "palette_transparent.png"
    # Orientation 6 means "rotate 90 degrees clockwise to display": store the photo turned the other way.
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    rgb.transpose(Image.Transpose.ROTATE_90).save(out / "exif6.jpg", exif=exif.tobytes(), quality=95)
    paths["exif6"] = out / "exif6.jpg"
    return paths
