"""Text of the scenes world: captions, questions with exact answers, caption noise, corruptions.

The grammar is word-level and closed (a few dozen words), so the oracle can parse model output back
into object mentions. Captions list objects in reading order and never end with a period; answers are
single words or a position phrase ("top left"), exact-matchable.
"""

from __future__ import annotations

import random
from typing import Any

from modistill.scenes.world import (
    CAPTION_TASKS,
    Kind,
    KindStats,
    Scene,
    SceneObject,
    World,
    make_scene,
    position_phrase,
)

CAPTION_PROMPTS = {
    "caption_brief": "Describe the image briefly.",
    "caption": "Describe the image.",
    "caption_detailed": "Describe the image in detail.",
}
QUESTION_TYPES = ("colour", "shape", "count", "position", "exists", "compare")
EMPTY_CAPTION = "no objects"
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}


def pope_question(kind: Kind) -> str:
    """The POPE prompt for a colour-shape kind; training existence questions use the same words."""
    return f"Is there a {kind[0]} {kind[1]} in the image?"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


# ---------------------------------------------------------------------------------------- captions
def mention_phrase(obj: SceneObject, style: str, grid: int) -> str:
    if style == "caption_brief":
        return f"a {obj.colour} {obj.shape}"
    phrase = f"a {obj.size} {obj.colour} {obj.shape}"
    if style == "caption_detailed":
        phrase += f" at the {position_phrase(obj.row, obj.col, grid)}"
    return phrase


def caption_objects(objects: list[SceneObject] | tuple[SceneObject, ...], style: str, grid: int) -> str:
    """Caption of `objects` (already in reading order) in one of the CAPTION_TASKS styles."""
    if style not in CAPTION_TASKS:
        raise ValueError(f"unknown caption style {style!r}")
    phrases = [mention_phrase(o, style, grid) for o in objects]
    if not phrases:
        return EMPTY_CAPTION
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, style: str) -> str:
    return caption_objects(scene.objects, style, scene.grid)


def caption_style_of(prompt: str) -> str | None:
    """The caption style a prompt asks for (None if the prompt is not a caption prompt)."""
    text = prompt.replace("<image>", "").strip().lower()
    for style, p in CAPTION_PROMPTS.items():
        if text == p.lower():
            return style
    return None


def phantom_object(scene: Scene, world: World, rng: random.Random, prefer_partner: float = 0.7) -> SceneObject | None:
    """An object that is NOT in `scene`: an absent kind (preferably the affinity partner of a present
    kind — the plausible hallucination) in an empty cell. None if the grid or the kinds are exhausted."""
    present = scene.kinds()
    absent = [k for k in world.kinds if k not in present]
    taken = {(o.row, o.col) for o in scene.objects}
    free = [(r, c) for r in range(scene.grid) for c in range(scene.grid) if (r, c) not in taken]
    if not absent or not free:
        return None
    partners = sorted({world.partner[k] for k in present if k in world.partner} & set(absent))
    if partners and rng.random() < prefer_partner:
        kind = rng.choice(partners)
    else:
        kind = rng.choices(absent, [world.popularity[k] for k in absent])[0]
    row, col = rng.choice(free)
    return SceneObject(kind[0], kind[1], rng.choice(world.cfg.sizes), row, col)


def noisy_caption(scene: Scene, style: str, world: World, rng: random.Random) -> str | None:
    """The caption of `scene` plus exactly one phantom object in reading order (None if impossible)."""
    phantom = phantom_object(scene, world, rng)
    if phantom is None:
        return None
    fake = make_scene(list(scene.objects) + [phantom], scene.grid, scene.background)
    return caption(fake, style)


def corrupt_caption(scene: Scene, style: str, world: World, rng: random.Random) -> str:
    """A caption with exactly one hallucinated mention: a phantom object added, or one object's colour
    or shape swapped so that its kind is absent from the scene. Used as the "rejected" answer."""
    present = scene.kinds()
    modes = ["add", "swap"] if scene.objects else ["add"]
    for mode in rng.sample(modes, len(modes)):
        if mode == "add":
            text = noisy_caption(scene, style, world, rng)
            if text is not None:
                return text
            continue
        idx = rng.randrange(len(scene.objects))
        obj = scene.objects[idx]
        swaps = [(c, obj.shape) for c in world.cfg.colours] + [(obj.colour, s) for s in world.cfg.shapes]
        swaps = [k for k in swaps if k not in present]
        if swaps:
            colour, shape = rng.choice(swaps)
            objs = list(scene.objects)
            objs[idx] = SceneObject(colour, shape, obj.size, obj.row, obj.col)
            return caption_objects(objs, style, scene.grid)
    raise ValueError("scene admits no corruption (every kind present and the grid full)")


def repeat_caption(scene: Scene, style: str, rng: random.Random) -> str | None:
    """The caption with the error greedy decoders make here: an object said again in place of the next.

    Measured on training images (the shipped teacher's greedy brief captions, 2,000 images): 67 of the
    83 hallucinated mentions repeat a kind already named: often where the next object shares its colour
    ("a blue circle, a blue circle" for a blue circle and a blue triangle), as often where it does not
    ("a green circle, a green circle" for a green circle and a yellow square), sometimes as an extra
    last mention. So object `j` (after the first) takes the kind of object `j - 1`, at a `j` whose colour
    matches it with probability 0.6 where there is one, else at any `j`; or the last object is said
    twice. Either way a kind is said once more than the scene holds it: the oracle finds one
    hallucinated mention. None for an empty scene."""
    objs = list(scene.objects)
    if not objs:
        return None
    # Objects that can take the previous one's kind (not one already of that kind: nothing would change).
    movable = [j for j in range(1, len(objs)) if objs[j].kind != objs[j - 1].kind]
    shared = [j for j in movable if objs[j].colour == objs[j - 1].colour]
    if shared and rng.random() < 0.6:
        j: int | None = rng.choice(shared)
    else:
        j = rng.choice([None, *movable])
    if j is None:
        return caption_objects([*objs, objs[-1]], style, scene.grid)  # the last object twice
    prev, obj = objs[j - 1], objs[j]
    said = [*objs[:j], SceneObject(prev.colour, prev.shape, obj.size, obj.row, obj.col), *objs[j + 1 :]]
    return caption_objects(said, style, scene.grid)


# --------------------------------------------------------------------------------------- questions
def _ref(obj: SceneObject, scene: Scene, with_size: bool = True) -> str | None:
    """A referring expression that picks out `obj` uniquely, or None."""
    same_kind = [o for o in scene.objects if o.kind == obj.kind]
    if len(same_kind) == 1:
        return f"{obj.colour} {obj.shape}"
    if with_size and sum(o.size == obj.size for o in same_kind) == 1:
        return f"{obj.size} {obj.colour} {obj.shape}"
    return None


def exists_question(
    scene: Scene, world: World, rng: random.Random, target: str | None, colour_near_miss: float = 0.0
) -> tuple[str, str]:
    target = target or rng.choice(("yes", "no"))
    present = scene.kinds()
    form = rng.choices(("kind", "colour", "shape"), (0.7, 0.15, 0.15))[0]
    if form == "colour":
        colours = {c for c, _ in present}
        pool = sorted(colours) if target == "yes" else [c for c in world.cfg.colours if c not in colours]
        if pool:
            return f"Is there a {rng.choice(pool)} object in the image?", target
    if form == "shape":
        shapes = {s for _, s in present}
        pool = sorted(shapes) if target == "yes" else [s for s in world.cfg.shapes if s not in shapes]
        if pool:
            return f"Is there a {rng.choice(pool)} in the image?", target
    if target == "yes" and present:
        return pope_question(rng.choice(sorted(present))), "yes"
    absent = [k for k in world.kinds if k not in present]
    if not absent:
        return pope_question(rng.choice(sorted(present))), "yes"
    # Negatives mix hard (co-occurring partner), popular and uniform choices, like POPE's splits, and
    # near misses: an absent kind that shares its colour or its shape with a present object. Without
    # them a model passes most training negatives by the colour alone (a measured shortcut: the first
    # competent teacher answered "yes" to 22 of 23 test negatives whose colour was in the image).
    partners = sorted({world.partner[k] for k in present if k in world.partner} & set(absent))
    near = [k for k in absent if any(k[0] == c or k[1] == s for c, s in present)]
    # Training data may ask for more absent kinds whose colour is in the image: the shortcut a small
    # student takes is "yes iff the colour is there" (docs/demo.md). 0 draws nothing (eval sets unchanged).
    if colour_near_miss > 0:
        same_colour = [k for k in absent if any(k[0] == c for c, _ in present)]
        if same_colour and rng.random() < colour_near_miss:
            return pope_question(rng.choice(same_colour)), "no"
    mode = rng.random()
    if partners and mode < 0.25:
        kind = rng.choice(partners)
    elif near and mode < 0.5:
        kind = rng.choice(near)
    elif mode < 0.75:
        kind = rng.choices(absent, [world.popularity[k] for k in absent])[0]
    else:
        kind = rng.choice(absent)
    return pope_question(kind), "no"


def _compare_question(scene: Scene, rng: random.Random, target: str | None) -> tuple[str, str] | None:
    # Refs never state the size, so size comparisons need the image, not the question text.
    refs = [(o, r) for o in scene.objects if (r := _ref(o, scene, with_size=False))]
    if len(refs) < 2:
        return None
    target = target or rng.choice(("yes", "no"))
    relations = {
        "larger": ("Is the {a} larger than the {b}?", lambda a, b: a.size == "large" and b.size == "small"),
        "left": ("Is the {a} to the left of the {b}?", lambda a, b: a.col < b.col),
        "above": ("Is the {a} above the {b}?", lambda a, b: a.row < b.row),
        "same_size": ("Are the {a} and the {b} the same size?", lambda a, b: a.size == b.size),
    }
    names = list(relations)
    rng.shuffle(names)
    pairs = [(x, y) for x in refs for y in refs if x[0] is not y[0]]
    fallback = None
    for name in names:
        template, holds = relations[name]
        rng.shuffle(pairs)
        for (a, ra), (b, rb) in pairs:
            answer = "yes" if holds(a, b) else "no"
            q = (template.format(a=ra, b=rb), answer)
            if answer == target:
                return q
            fallback = fallback or q
    return fallback


def make_question(
    scene: Scene,
    qtype: str,
    world: World,
    rng: random.Random,
    target: str | None = None,
    colour_near_miss: float = 0.0,
) -> tuple[str, str] | None:
    """(question, exact answer) of type `qtype` about `scene`, or None when the scene allows none.
    `target` ("yes"/"no") asks for that answer in yes/no types when possible; `colour_near_miss`:
    the extra share of "no" existence questions about an absent kind whose colour is in the image."""
    objs = list(scene.objects)
    if qtype == "exists":
        return exists_question(scene, world, rng, target, colour_near_miss)
    if qtype == "compare":
        return _compare_question(scene, rng, target)
    if qtype == "count":
        form = rng.choice(("all", "shape", "colour"))
        if form == "shape":
            shape = rng.choice(world.cfg.shapes)
            return f"How many {PLURALS[shape]} are there?", number_word(sum(o.shape == shape for o in objs))
        if form == "colour":
            colour = rng.choice(world.cfg.colours)
            return f"How many {colour} objects are there?", number_word(sum(o.colour == colour for o in objs))
        return "How many objects are there?", number_word(len(objs))
    if not objs:
        return None
    obj = rng.choice(objs)
    pos = position_phrase(obj.row, obj.col, scene.grid)
    if qtype == "colour":
        if sum(o.shape == obj.shape for o in objs) == 1 and rng.random() < 0.5:
            return f"What colour is the {obj.shape}?", obj.colour
        return f"What colour is the object at the {pos}?", obj.colour
    if qtype == "shape":
        if sum(o.colour == obj.colour for o in objs) == 1 and rng.random() < 0.5:
            return f"What shape is the {obj.colour} object?", obj.shape
        return f"What shape is the object at the {pos}?", obj.shape
    if qtype == "position":
        candidates = [(o, r) for o in objs if (r := _ref(o, scene))]
        if not candidates:
            return None
        o, r = rng.choice(candidates)
        return f"Where is the {r}?", position_phrase(o.row, o.col, scene.grid)
    raise ValueError(f"unknown question type {qtype!r}")


# ------------------------------------------------------------------------------- training samples
def _turn(scene: Scene, task: str, world: World, rng: random.Random, noise: dict[str, int]) -> tuple[str, str] | None:
    if task in CAPTION_TASKS:
        noise["captions"] += 1
        if rng.random() < world.cfg.caption_noise:
            text = noisy_caption(scene, task, world, rng)
            if text is not None:
                noise["noisy"] += 1
                return CAPTION_PROMPTS[task], text
        return CAPTION_PROMPTS[task], caption(scene, task)
    return make_question(scene, task, world, rng, colour_near_miss=world.cfg.train_colour_near_miss)


def training_sample(
    scene: Scene, image: str, sample_id: str, world: World, rng: random.Random, noise: dict[str, int]
) -> dict[str, Any]:
    """One LLaVA-format sample (1 turn, or 2-3 with probability cfg.multi_turn). `noise` counts
    caption turns and noisy ones (keys "captions", "noisy"), updated in place."""
    cfg = world.cfg
    tasks = [t for t, w in cfg.task_mix.items() if w > 0]
    weights = [cfg.task_mix[t] for t in tasks]
    n_turns = rng.choice((2, 3)) if rng.random() < cfg.multi_turn else 1
    conversations: list[dict[str, str]] = []
    used: set[str] = set()
    attempts = 0
    while len(conversations) < 2 * n_turns:
        attempts += 1
        pool = [(t, w) for t, w in zip(tasks, weights) if t not in used] or list(zip(tasks, weights))
        task = rng.choices([t for t, _ in pool], [w for _, w in pool])[0]
        used.add(task)
        turn = _turn(scene, task, world, rng, noise)
        if turn is None:
            if attempts < 20:
                continue
            # A mix of only question types this scene cannot support (e.g. compare, one object).
            noise["captions"] += 1
            turn = CAPTION_PROMPTS["caption"], caption(scene, "caption")
        prompt = ("<image>\n" + turn[0]) if not conversations else turn[0]
        conversations += [{"from": "human", "value": prompt}, {"from": "gpt", "value": turn[1]}]
    return {"id": sample_id, "image": image, "conversations": conversations}


# ----------------------------------------------------------------------------------------- eval sets
def vqa_questions(scene: Scene, world: World, rng: random.Random, index: int) -> list[dict[str, str]]:
    """One question per type the scene allows; yes/no targets alternate with the image index."""
    target = "yes" if index % 2 == 0 else "no"
    rows = []
    for qtype in QUESTION_TYPES:
        qa = make_question(scene, qtype, world, rng, target=target)
        if qa is not None:
            rows.append({"text": qa[0], "answer": qa[1], "type": qtype})
    return rows


def pope_questions(
    scene: Scene, world: World, stats: KindStats, rng: random.Random, per_image: int = 3
) -> list[dict[str, str]]:
    """POPE rows for one image: per split, k present kinds ("yes") and k absent kinds ("no"),
    k = min(per_image, number of present kinds). Negatives: random = uniform absent kinds; popular =
    the most frequent absent kinds in training; adversarial = the absent kinds that co-occur most
    with the image's kinds in training."""
    present = sorted(scene.kinds())
    absent = [k for k in world.kinds if k not in scene.kinds()]
    k = min(per_image, len(present), len(absent))
    if k == 0:
        return []
    positives = rng.sample(present, k)
    negatives = {
        "random": rng.sample(absent, k),
        "popular": stats.most_frequent(absent)[:k],
        "adversarial": stats.most_cooccurring(present, absent)[:k],
    }
    rows = []
    for split, negs in negatives.items():
        for kind in positives:
            rows.append({"text": pope_question(kind), "label": "yes", "split": split, "object": " ".join(kind)})
        for kind in negs:
            rows.append({"text": pope_question(kind), "label": "no", "split": split, "object": " ".join(kind)})
    return rows
