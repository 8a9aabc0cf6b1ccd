"""On-policy preference pairs for the scenes world: sample the student, label with the oracle.

RLAIF-V builds its pairs from the policy's own answers judged by a stronger labeller. Here the
labeller is exact: the oracle compares each sampled caption with the image's scene graph.
Faithful answers (covering at least half of the objects) are chosen, hallucinated or unparseable
ones rejected; without such a contrast, ground truth vs a corrupted caption stands in.

Greedy captions go wrong rarely (a few per hundred images, mostly an object repeated in place of the
next one), so a pool of further images is captioned greedily only and each such error becomes a
pair against the ground truth: the errors a greedy decoder makes are the ones these pairs correct.
Repeat pairs go further: on any training image, the true caption against the same caption with that
error written in (`repeat_pairs`). Both are off in the demo's plan: measured, neither lowers greedy
hallucination beyond noise (docs/demo.md).

Like RLAIF-V, which mixes long and short answers, a share of the pairs are existence questions
(the true "yes"/"no" chosen, the other rejected). Caption pairs alone teach caution: measured at
demo scale, a student trained on them only learns to say less, and its POPE yes-ratio drifts. The
pairs are written in the RLAIF-V format, so they are inspectable and reusable like any user data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from modistill.errors import UserError
from modistill.eval.generate import generate_answers
from modistill.io import write_json_atomic
from modistill.scenes.oracle import answer_matches, label_preference_pairs, score_caption
from modistill.scenes.text import CAPTION_PROMPTS, caption, exists_question, repeat_caption
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
    short_answers: int = 0,
    greedy: bool = True,
    greedy_images: int = 0,
    repeat_images: int = 0,
    progress: bool = True,
) -> dict:
    """Sample `samples` captions per training image from `loaded` (a LoadedModel), plus its greedy
    caption unless `greedy` is False, and write oracle-labelled pairs; then `short_answers`
    existence-question pairs on other training images, a pair (ground truth chosen) for each
    hallucinated or unparseable greedy caption of `greedy_images` further training images, and a
    repeated-object pair (`repeat_pairs`) for each of `repeat_images` further training images."""
    world_dir = Path(world_dir)
    world = World(WorldConfig(**json.loads((world_dir / "world.json").read_text())["config"]))
    rng = random.Random(seed)
    scenes = read_train_scenes(world_dir)
    picked = rng.sample(scenes, min(n_images + short_answers + greedy_images + repeat_images, len(scenes)))
    # Disjoint image sets, in this order: sampled captions, short answers, greedy pool, repeats.
    cuts = [0, n_images, n_images + short_answers, n_images + short_answers + greedy_images, len(picked)]
    picked, short, extra, repeats = (picked[a:b] for a, b in zip(cuts, cuts[1:]))
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
    if greedy:
        # The greedy caption too: its errors (measured: mostly a repeated object instead of the next one)
        # differ from sampling noise, and preference pairs only correct the errors they contain.
        greedy_answers = _greedy(loaded, items, batch_size, max_new_tokens, progress, "greedy captions")
        answers = [[g, *a] for g, a in zip(greedy_answers, answers)]
    pairs, sampled_chosen, sampled_rejected, hallucinated, total = [], 0, 0, 0, 0
    for k, ((image, scene), item, responses) in enumerate(zip(picked, items, answers)):
        scores = [score_caption(r, scene) for r in responses]
        sampled = scores[1:] if greedy else scores
        hallucinated += sum(not s.parseable or s.hallucinated for s in sampled)
        total += len(sampled)
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
    short_pairs, short_wrong = existence_pairs(loaded, world_dir, world, short, rng, batch_size, progress)
    greedy_pairs = greedy_error_pairs(loaded, world_dir, world, extra, rng, batch_size, max_new_tokens, progress)
    repeated = repeat_pairs(repeats, rng)
    pairs += short_pairs + greedy_pairs + repeated
    rng.shuffle(pairs)
    write_json_atomic(out_file, pairs)
    return {
        "short_answer_pairs": len(short_pairs),
        "short_answer_error_rate": short_wrong / max(len(short_pairs), 1),
        "greedy_images": len(extra),
        "greedy_error_pairs": len(greedy_pairs),
        "repeat_pairs": len(repeated),
        "images": len(picked),
        "samples_per_image": samples,
        "pairs": len(pairs),
        "sampled_hallucination_rate": hallucinated / max(total, 1),
        "chosen_from_model": sampled_chosen / max(len(pairs), 1),
        "rejected_from_model": sampled_rejected / max(len(pairs), 1),
    }


def _greedy(loaded, items: list[dict], batch_size: int, max_new_tokens: int, progress: bool, desc: str) -> list[str]:
    """The model's greedy answer to each item (none for no items)."""
    if not items:
        return []
    return generate_answers(
        loaded.model,
        loaded.processor,
        items,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        desc=desc,
    )


def existence_pairs(
    loaded,
    world_dir: Path,
    world: World,
    rows: list[tuple[str, Scene]],
    rng: random.Random,
    batch_size: int,
    progress: bool,
) -> tuple[list[dict], int]:
    """One existence question per image (yes/no alternating, near misses among the negatives):
    the true answer chosen, the other rejected. Returns the pairs and how many the model got wrong."""
    questions = [exists_question(scene, world, rng, target=("yes", "no")[i % 2]) for i, (_, scene) in enumerate(rows)]
    items = [{"image": str(world_dir / image), "text": q} for (image, _), (q, _) in zip(rows, questions)]
    answers = _greedy(loaded, items, batch_size, 4, progress, "asking the student")
    pairs, wrong = [], 0
    for k, ((image, _), (question, truth), answer) in enumerate(zip(rows, questions, answers)):
        wrong += not answer_matches(answer, truth, "exists")
        other = "no" if truth == "yes" else "yes"
        pairs.append({"id": f"short-{k}", "image": image, "question": question, "chosen": truth, "rejected": other})
    return pairs, wrong


def greedy_error_pairs(
    loaded,
    world_dir: Path,
    world: World,
    rows: list[tuple[str, Scene]],
    rng: random.Random,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
) -> list[dict]:
    """Caption each image greedily (brief prompt); every caption the oracle finds hallucinated or
    unparseable is rejected against the ground-truth caption. Faithful ones give no pair.

    Brief captions name objects only (colour and shape): their errors are the object hallucinations
    that matter. With the longer prompts most greedy errors are sizes (measured on 2,000 training
    images, seed 0's stage-1b student: 952 wrong captions, against 131 brief ones), which would fill
    the pool with size corrections."""
    prompt = CAPTION_PROMPTS["caption_brief"]
    items = [{"image": str(world_dir / image), "text": prompt} for image, _ in rows]
    answers = _greedy(loaded, items, batch_size, max_new_tokens, progress, "greedy captions (error pool)")
    pairs = []
    for k, ((image, scene), item, answer) in enumerate(zip(rows, items, answers)):
        verdict = score_caption(answer, scene)
        if verdict.parseable and not verdict.hallucinated:
            continue
        pairs += label_preference_pairs(
            scene, item["text"], [answer], rng, world=world, image=image, id_prefix=f"greedy-{k}", max_pairs=1
        )
    return pairs


def repeat_pairs(rows: list[tuple[str, Scene]], rng: random.Random) -> list[dict]:
    """One pair per image: its true caption chosen, the same caption with an object repeated in place
    of the next one rejected (`repeat_caption`), in a caption style drawn at random.

    The greedy errors of the demo's models are nearly all this one mistake, and a greedy decoder
    makes it on a few images in a hundred, so pairs from its own captions hold few of them. Each of
    these pairs differs from its chosen caption in one mention, so the preference loss acts at the
    token where the decoder goes wrong (RLHF-V's corrections are minimal edits for the same reason)."""
    styles = list(CAPTION_PROMPTS)
    pairs = []
    for k, (image, scene) in enumerate(rows):
        style = rng.choice(styles)
        wrong = repeat_caption(scene, style, rng)
        if wrong is None:
            continue
        pairs.append(
            {
                "id": f"repeat-{k}",
                "image": image,
                "question": CAPTION_PROMPTS[style],
                "chosen": caption(scene, style),
                "rejected": wrong,
            }
        )
    return pairs
