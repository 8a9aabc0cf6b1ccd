"""Reading images named by data files without surprises: inside the image root, regular files, bounded size.

A data file is input from elsewhere: `../outside/secret.png` or `/home/me/private.jpg` would be read
and trained on, a FIFO named `x.png` blocks `open()` forever, and a small PNG can declare billions
of pixels (a decompression bomb). Every image path goes through `confine` (where it may live) and
every decode through `open_image` (what may be decoded).
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# Pillow's own default warning bound (~89 Mpixels, a 9459 x 9459 image): far above any VLM input.
MAX_IMAGE_PIXELS = 89_478_485
ALLOW_KEY = "data.allow_outside_root: true"


class UnsafeImage(ValueError):
    """An image path or file that must not be read; the message names the path and the fix."""


@dataclass(frozen=True)
class ImageRoot:
    """Where a data file's relative image paths are resolved, and whether paths may leave it."""

    path: Path
    allow_outside: bool = False

    def resolve(self, name: str) -> str:
        """The path of image `name` (relative to the root, or absolute), confined to the root."""
        joined = name if os.path.isabs(name) else str(self.path / name)
        if not self.allow_outside:
            confine(joined, self.path)
        return joined


def confine(path: str | Path, root: str | Path, fix: str = f"move it under the root, or set {ALLOW_KEY}") -> Path:
    """`path` made absolute with `..` resolved; raises `UnsafeImage` if that lies outside `root`.

    The check is on the path as written (`..`, absolute paths): that is what a data file controls.
    Symlinks inside the root are followed, since only someone with access to the disk can put them
    there (a dataset's image folder linked into a project is common and intended).
    """
    normal = Path(os.path.abspath(path))
    normal_root = Path(os.path.abspath(root))
    if normal != normal_root and normal_root not in normal.parents:
        raise UnsafeImage(f"{path} is outside the image root {root} ({fix})")
    return normal


def check_regular_file(path: str | Path) -> os.stat_result:
    """The file's stat; raises `FileNotFoundError` if absent, `UnsafeImage` if not a regular file."""
    st = os.stat(path)  # follows symlinks: a link to a regular file is fine
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeImage(f"{path} is not a regular file (a FIFO, device or directory); give an image file")
    return st


def check_pixels(im: Image.Image, path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse an image whose header declares more than `max_pixels` before anything is decoded."""
    width, height = im.size
    if width * height > max_pixels:
        raise UnsafeImage(
            f"{path} declares {width}x{height} pixels, over the bound of {max_pixels} "
            f"(a decompression bomb or a huge image); downscale it"
        )


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open (lazily, header read) a regular image file within the pixel bound; the caller decodes it."""
    check_regular_file(path)
    try:
        with warnings.catch_warnings():  # Pillow's warning: our own bound below is the check
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:  # Pillow's own bound (twice MAX_IMAGE_PIXELS)
        raise UnsafeImage(f"{path}: {exc}; downscale it") from None
    try:
        check_pixels(im, path, max_pixels)
    except UnsafeImage:
        im.close()
        raise
    return im
