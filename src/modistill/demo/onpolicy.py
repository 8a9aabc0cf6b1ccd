"""On-policy preference pairs for the scenes world: sample the student, label with the oracle.

RLAIF-V builds its pairs from the policy's own answers judged by a stronger labeller. Here the
labeller is exact: the oracle compares each sampled caption with the image's scene graph.
Faithful answers (covering at least half of the objects) are chosen, hallucinated or unparseable
ones rejected; without such a contrast, ground truth vs a corrupted caption stands in. The pairs
are written in the RLAIF-V format, so they are inspectable and reusable like any user data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from modistill.errors import UserError
from modistill.eval.generate import generate_answers
from modistill.io import write_json_atomic
from modistill.scenes.oracle import label_preference_pairs, score_caption
from modistill.scenes.text import CAPTION_PROMPTS
from modistill.scenes.world import Scene, World, WorldConfig


def read_train_scenes(world_dir: Path) -> list[tuple[str, Scene]]:
    path = world_dir / "train_scenes.jsonl"
    if not path.is_file():
        raise UserError(f"{world_dir}: no train_scenes.jsonl; generate the world with `modistill data scenes`")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            rows.append((row["image"], Scene.from_json(row["scene"], where=f"{path}:{line_no}")))
    return rows


def build_onpolicy_pairs(
    loaded,
    world_dir: str | Path,
    out_file: str | Path,
    *,
    n_images: int = 300,
    samples: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    max_pairs_per_image: int = 2,
    max_new_tokens: int = 48,
    progress: bool = True,
) -> dict:
    """Sample `samples` captions per training image from `loaded` (a LoadedModel) and write pairs."""
    world_dir = Path(world_dir)
    world = World(WorldConfig(**json.loads((world_dir / "world.json").read_text())["config"]))
    rng = random.Random(seed)
    scenes = read_train_scenes(world_dir)
    picked = rng.sample(scenes, min(n_images, len(scenes)))
    styles = list(CAPTION_PROMPTS)
    items = [{"image": str(world_dir / image), "text": CAPTION_PROMPTS[rng.choice(styles)]} for image, _ in picked]
    answers = generate_answers(
        loaded.model,
        loaded.processor,
        items,
        batch_size=batch_size,
        do_sample=True,
        temperature=temperature,
        num_samples=samples,
        seed=seed,
        max_new_tokens=max_new_tokens,
        progress=progress,
        desc="sampling the student",
    )
    if samples == 1:
        answers = [[a] for a in answers]
    pairs, sampled_chosen, sampled_rejected, hallucinated, total = [], 0, 0, 0, 0
    for k, ((image, scene), item, responses) in enumerate(zip(picked, items, answers)):
        scores = [score_caption(r, scene) for r in responses]
        hallucinated += sum(not s.parseable or s.hallucinated for s in scores)
        total += len(scores)
        for pair in label_preference_pairs(
            scene,
            item["text"],
            responses,
            rng,
            world=world,
            image=image,
            id_prefix=f"onpolicy-{k}",
            max_pairs=max_pairs_per_image,
        ):
            sampled_chosen += pair["chosen"] in responses
            sampled_rejected += pair["rejected"] in responses
            pairs.append(pair)
    write_json_atomic(out_file, pairs)
    return {
        "images": len(picked),
        "samples_per_image": samples,
        "pairs": len(pairs),
        "sampled_hallucination_rate": hallucinated / max(total, 1),
        "chosen_from_model": sampled_chosen / max(len(pairs), 1),
        "rejected_from_model": sampled_rejected / max(len(pairs), 1),
    }
