"""Real photographs in the data path: any mode and size decodes upright in RGB, checks and trains."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from modistill.cli import main
from modistill.data.images import open_rgb
from modistill.eval.generate import load_image
from photos import GRACE_HOPPER, photo_variants

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_variants(tmp_path_factory.mktemp("photos"))


def test_every_variant_decodes_upright_rgb(photos):
    upright = np.asarray(open_rgb(GRACE_HOPPER), dtype=np.float32)
    for name, path in photos.items():
        image = open_rgb(path)
        assert image.mode == "RGB", name
        if name not in ("tiny", "large"):
            assert image.size == (512, 600), name
    with Image.open(photos["exif6"]) as raw:
        assert raw.size == (600, 512)  # stored sideways; the tag turns it
    turned = np.asarray(open_rgb(photos["exif6"]), dtype=np.float32)
    assert np.abs(turned - upright).mean() < 4.0  # JPEG re-encoding error only
    # Transparent pixels become white, as transformers' convert_to_rgb makes them.
    assert open_rgb(photos["rgba"]).getpixel((10, 0)) == (255, 255, 255)
    # 16-bit greyscale keeps its top 8 bits: exactly the 8-bit greyscale photo.
    with Image.open(GRACE_HOPPER) as im:
        grey = np.asarray(im.convert("L").convert("RGB"))
    assert np.array_equal(np.asarray(open_rgb(photos["grey16"])), grey)
    # Eval / chat read images through the same function.
    assert np.array_equal(np.asarray(load_image(str(photos["exif6"]))), turned.astype(np.uint8))


def _dataset(photos, tmp_path) -> str:
    """The photos under one image root (tmp_path/images), named relative to it as user data would be."""
    root = tmp_path / "images"
    root.mkdir()
    for name, path in photos.items():
        shutil.copy(path, root / f"{name}{path.suffix}")
    rows = [
        {
            "id": f"photo-{name}",
            "image": f"{name}{path.suffix}",
            "conversations": [
                {"from": "human", "value": "<image>\nWho is this?"},
                {"from": "gpt", "value": "a red circle and a blue square"},
            ],
        }
        for name, path in sorted(photos.items())
    ]
    data = tmp_path / "photos.json"
    data.write_text(json.dumps(rows))
    return str(data)


def test_photos_of_every_mode_check_and_train(photos, tiny_vlm_dir, tmp_path, capsys):
    data = _dataset(photos, tmp_path)
    assert (
        main(
            [
                "data",
                "check",
                data,
                "--model",
                str(tiny_vlm_dir),
                "--max-length",
                "96",
                "--image-root",
                str(tmp_path / "images"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    n = len(photos)
    assert "problems: none" in out and f"samples: {n} kept of {n} read ({n} with images" in out
    config = {
        "stage": "align",
        "output_dir": str(tmp_path / "stage0"),
        "student": {"path": str(tiny_vlm_dir)},
        "data": {
            "train": [data],
            "image_root": str(tmp_path / "images"),
            "max_length": 96,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {
            "learning_rate": 1e-2,
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "save_steps": 100,
            "disable_tqdm": True,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
        },
    }
    (tmp_path / "stage0.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "stage0.yaml")]) == 0
    metrics = json.loads((tmp_path / "stage0" / "metrics.json").read_text())
    assert metrics["steps"] == 2
