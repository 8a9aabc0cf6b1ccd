"""Write a scenes world to disk: images, LLaVA training data, eval sets, preference pairs, tokenizer.

Layout of `out_dir`:
  images/{train,test}_NNNNNN.png
  train.json              LLaVA conversations
  train_scenes.jsonl      {"image", "scene"} for every training image (statistics, noise audits)
  prefs.json              RLAIF-V pairs {"id","image","question","chosen","rejected"} on training images
  eval/vqa.jsonl          {"question_id","image","text","answer","type"}
  eval/pope.jsonl         {"question_id","image","text","label","split","object"}
  eval/captions.jsonl     {"question_id","image","text","scene"}
  eval/scenes.jsonl       {"image","scene"} for every test image (the oracle's sidecar)
  val/{vqa,pope,captions,scenes}.jsonl   the same on validation images (images/val_*): scenes of the
                          training bucket that train.json does not hold, for tuning without test scenes
  tokenizer/              save_pretrained of the trained tokenizer
  world.json              config, vocabulary, world structure, statistics, counts
The directory is built next to `out_dir` under a temporary name and renamed at the end, so a
crash never leaves a half-written world behind.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from modistill.config import apply_overrides, from_dict, load_yaml, to_dict
from modistill.errors import UserError
from modistill.io import atomic_output_dir
from modistill.scenes.render import image_rng, render_scene
from modistill.scenes.text import (
    CAPTION_PROMPTS,
    caption,
    corrupt_caption,
    pope_questions,
    training_sample,
    vqa_questions,
)
from modistill.scenes.tokenizer import chat_text, train_tokenizer
from modistill.scenes.world import CAPTION_TASKS, COL_WORDS, ROW_WORDS, KindStats, Scene, World, WorldConfig


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _render_all(scenes: list[Scene], split: str, cfg: WorldConfig, seed: int, root: Path, bar: tqdm) -> list[str]:
    paths = []
    for i, scene in enumerate(scenes):
        rel = f"images/{split}_{i:06d}.png"
        render_scene(scene, cfg, image_rng(seed, split, i)).save(root / rel, compress_level=1)
        paths.append(rel)
        bar.update(1)
    return paths


def _write_eval_sets(
    out: Path, scenes: list[Scene], images: list[str], world: World, stats: KindStats, rng: random.Random
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    vqa: list[dict[str, Any]] = []
    pope: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    for i, (scene, image) in enumerate(zip(scenes, images)):
        for row in vqa_questions(scene, world, rng, i):
            vqa.append({"question_id": f"vqa-{len(vqa):06d}", "image": image, **row})
        for row in pope_questions(scene, world, stats, rng):
            pope.append({"question_id": f"pope-{len(pope):06d}", "image": image, **row})
        captions.append(
            {
                "question_id": f"cap-{i:06d}",
                "image": image,
                "text": CAPTION_PROMPTS[world.cfg.eval_caption_style],
                "scene": scene.to_json(),
            }
        )
    _write_jsonl(out / "vqa.jsonl", vqa)
    _write_jsonl(out / "pope.jsonl", pope)
    _write_jsonl(out / "captions.jsonl", captions)
    _write_jsonl(out / "scenes.jsonl", [{"image": im, "scene": s.to_json()} for s, im in zip(scenes, images)])
    return vqa, pope, captions


def build_world(
    out_dir: str | Path,
    cfg: WorldConfig,
    n_train: int,
    n_test: int,
    seed: int,
    *,
    n_prefs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate a world (see module docstring). `cfg.seed` fixes the world's structure (popularity,
    affinity, which scene graphs are test-only); `seed` fixes the sampled scenes, images and texts.
    `n_prefs` preference pairs (default n_train // 10) are built on the first training images."""
    if n_train < 1 or n_test < 1:
        raise UserError(f"n_train and n_test must be >= 1 (got {n_train}, {n_test})")
    n_prefs = max(1, n_train // 10) if n_prefs is None else n_prefs
    if not 0 <= n_prefs <= n_train:
        raise UserError(f"n_prefs must be in [0, n_train={n_train}] (got {n_prefs})")
    out = Path(out_dir)
    # --overwrite replaces only an earlier world (world.json: one written before the marker existed).
    with atomic_output_dir(out, overwrite, kind="scenes-world", legacy=("world.json",)) as tmp:
        summary = _build_into(tmp, cfg, n_train, n_test, seed, n_prefs, progress)
    summary["out_dir"] = str(out)
    return summary


def _build_into(
    root: Path, cfg: WorldConfig, n_train: int, n_test: int, seed: int, n_prefs: int, progress: bool
) -> dict[str, Any]:
    t0 = time.perf_counter()
    (root / "images").mkdir(parents=True)
    (root / "eval").mkdir()
    (root / "val").mkdir()
    world = World(cfg)
    test_scenes = world.sample_split(n_test, "test", random.Random(f"{seed}-test-scenes"))
    train_scenes = world.sample_split(n_train, "train", random.Random(f"{seed}-train-scenes"))
    # Validation: more training-bucket scene graphs, none of them in train.json.
    seen = {s.canonical() for s in train_scenes}
    val_rng = random.Random(f"{seed}-val-scenes")
    val_scenes = [s for s in world.sample_split(3 * n_test, "train", val_rng) if s.canonical() not in seen][:n_test]
    t_sample = time.perf_counter()

    total = n_train + n_test + len(val_scenes)
    with tqdm(total=total, desc="rendering scenes", unit="img", disable=not progress) as bar:
        train_images = _render_all(train_scenes, "train", cfg, seed, root, bar)
        test_images = _render_all(test_scenes, "test", cfg, seed, root, bar)
        val_images = _render_all(val_scenes, "val", cfg, seed, root, bar)
    t_render = time.perf_counter()

    # Training conversations (with caption noise) and their scene sidecar.
    rng = random.Random(f"{seed}-train-text")
    noise = {"captions": 0, "noisy": 0}
    train = [
        training_sample(scene, image, f"scenes-{i:06d}", world, rng, noise)
        for i, (scene, image) in enumerate(zip(train_scenes, train_images))
    ]
    (root / "train.json").write_text(json.dumps(train))
    _write_jsonl(
        root / "train_scenes.jsonl", [{"image": im, "scene": s.to_json()} for s, im in zip(train_scenes, train_images)]
    )

    # Eval sets on test images (and the same on validation images). POPE's popular / adversarial
    # negatives use training statistics.
    stats = KindStats.from_scenes(train_scenes)
    counts_eval = _write_eval_sets(
        root / "eval", test_scenes, test_images, world, stats, random.Random(f"{seed}-eval-text")
    )
    _write_eval_sets(root / "val", val_scenes, val_images, world, stats, random.Random(f"{seed}-val-text"))
    vqa, pope, captions = counts_eval

    # Preference pairs: ground truth (chosen) vs one hallucinated mention (rejected).
    rng = random.Random(f"{seed}-prefs")
    prefs = []
    for i in range(n_prefs):
        scene, image = train_scenes[i], train_images[i]
        style = rng.choice(CAPTION_TASKS)
        prefs.append(
            {
                "id": f"pref-{i:06d}",
                "image": image,
                "question": CAPTION_PROMPTS[style],
                "chosen": caption(scene, style),
                "rejected": corrupt_caption(scene, style, world, rng),
            }
        )
    (root / "prefs.json").write_text(json.dumps(prefs))
    t_text = time.perf_counter()

    # Tokenizer: trained on everything a model will read or write in this world.
    corpus: list[Any] = [chat_text(s["conversations"]) for s in train]
    corpus += [r["text"] for r in vqa + pope + captions] + [r["answer"] for r in vqa]
    corpus += [
        chat_text([{"from": "human", "value": p["question"]}, {"from": "gpt", "value": p["rejected"]}]) for p in prefs
    ]
    tok = train_tokenizer(corpus, root / "tokenizer")
    t_tok = time.perf_counter()

    words = sorted(
        {w for text in corpus for w in re.findall(r"[A-Za-z]+", re.sub(r"<[^>]*>", " ", text))} - {"user", "assistant"}
    )
    counts = {
        "train_samples": len(train),
        "train_turns": sum(len(s["conversations"]) // 2 for s in train),
        "train_captions": noise["captions"],
        "train_noisy_captions": noise["noisy"],
        "test_images": len(test_scenes),
        "vqa": len(vqa),
        "pope": len(pope),
        "captions": len(captions),
        "prefs": len(prefs),
        "tokenizer_vocab": len(tok),
    }
    world_info = {
        "format": "modistill-scenes-1",
        "config": to_dict(cfg),
        "seed": seed,
        "vocabulary": {
            "colours": cfg.colours,
            "shapes": cfg.shapes,
            "sizes": cfg.sizes,
            "rows": list(ROW_WORDS[cfg.grid]),
            "columns": list(COL_WORDS[cfg.grid]),
            "caption_prompts": CAPTION_PROMPTS,
            "words": words,
        },
        "structure": {
            "popularity": {
                " ".join(k): round(v, 4) for k, v in sorted(world.popularity.items(), key=lambda kv: -kv[1])
            },
            "affinity_pairs": sorted({tuple(sorted((" ".join(a), " ".join(b)))) for a, b in world.partner.items()}),
        },
        "train_statistics": stats.to_json(),
        "counts": counts,
        "seconds": {
            "sample_scenes": round(t_sample - t0, 2),
            "render": round(t_render - t_sample, 2),
            "text": round(t_text - t_render, 2),
            "tokenizer": round(t_tok - t_text, 2),
        },
    }
    (root / "world.json").write_text(json.dumps(world_info, indent=1))
    return {**counts, "seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------------------------------- CLI
def add_scenes_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `modistill data scenes`."""
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world's structure and of its samples")
    parser.add_argument("--n-train", type=int, default=10000, help="training images (one sample each)")
    parser.add_argument("--n-test", type=int, default=500, help="held-out test images for the eval sets")
    parser.add_argument("--n-prefs", type=int, default=None, help="preference pairs (default n-train / 10)")
    parser.add_argument(
        "--caption-noise",
        type=float,
        default=None,
        help="share of training captions with one absent object (default 0.2)",
    )
    parser.add_argument("--config", default=None, help="YAML file of WorldConfig fields")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a WorldConfig field (repeatable)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_scenes_command(args: argparse.Namespace) -> int:
    data = load_yaml(args.config) if args.config else {}
    apply_overrides(data, list(args.set))
    if args.caption_noise is not None:
        data["caption_noise"] = args.caption_noise
    data.setdefault("seed", args.seed)
    cfg = from_dict(WorldConfig, data, source=args.config or "command line")
    summary = build_world(
        args.out,
        cfg,
        args.n_train,
        args.n_test,
        args.seed,
        n_prefs=args.n_prefs,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"wrote {summary['out_dir']}: {summary['train_samples']} training samples "
        f"({summary['train_noisy_captions']}/{summary['train_captions']} noisy captions), "
        f"{summary['test_images']} test images ({summary['vqa']} VQA, {summary['pope']} POPE, "
        f"{summary['captions']} caption prompts), "
        f"{summary['prefs']} preference pairs, tokenizer of {summary['tokenizer_vocab']} tokens, in "
        f"{summary['seconds']} s"
    )
    return 0
