"""Scenes text: caption noise, exact answers, task mix, POPE negatives."""

import random
import re
from collections import Counter

import pytest

from modistill.scenes.oracle import score_caption
from modistill.scenes.text import (
    CAPTION_PROMPTS,
    NUMBER_WORDS,
    caption_style_of,
    pope_questions,
    training_sample,
    vqa_questions,
)
from modistill.scenes.world import KindStats, World, WorldConfig, position_phrase


def _samples(cfg, n, seed=0):
    world = World(cfg)
    rng = random.Random(seed)
    scenes = world.sample_split(n, "train", rng)
    noise = {"captions": 0, "noisy": 0}
    samples = [training_sample(s, f"images/{i}.png", str(i), world, rng, noise) for i, s in enumerate(scenes)]
    return world, scenes, samples, noise


def _turns(sample):
    conv = sample["conversations"]
    return [(conv[i]["value"].replace("<image>\n", ""), conv[i + 1]["value"]) for i in range(0, len(conv), 2)]


@pytest.mark.parametrize("knob", [0.0, 0.2, 0.5])
def test_caption_noise_fraction_and_one_absent_object(knob):
    world, scenes, samples, noise = _samples(WorldConfig(caption_noise=knob), 2500)
    n_captions = n_noisy = n_partner = n_partner_possible = 0
    for scene, sample in zip(scenes, samples):
        for prompt, answer in _turns(sample):
            if caption_style_of(prompt) is None:
                continue
            n_captions += 1
            score = score_caption(answer, scene)
            assert score.parseable and score.coverage == 1.0  # noise adds, never removes
            if score.hallucinated:
                n_noisy += 1
                assert len(score.hallucinated_mentions) == 1
                (m,) = score.hallucinated_mentions
                assert (m.colour, m.shape) not in scene.kinds()  # an absent kind, whatever the style
                partners = {world.partner[k] for k in scene.kinds() if k in world.partner} - scene.kinds()
                if partners:
                    n_partner_possible += 1
                    n_partner += (m.colour, m.shape) in partners
    assert n_captions == noise["captions"] and n_noisy == noise["noisy"]
    assert n_noisy / n_captions == pytest.approx(knob, abs=0.03)
    if knob:
        assert n_partner / n_partner_possible > 0.6  # co-occurring phantoms are preferred (70 %)


def test_sample_format_and_task_mix():
    cfg = WorldConfig(caption_noise=0.0)
    _, scenes, samples, _ = _samples(cfg, 2000)
    kinds = Counter()
    n_multi = 0
    for sample in samples:
        conv = sample["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in conv[1:])
        n_multi += len(conv) > 2
        for prompt, answer in _turns(sample):
            assert answer and answer == answer.lower() and not answer.endswith(".")
            kinds[
                "caption" if caption_style_of(prompt) else "exists" if prompt.startswith("Is there") else "other"
            ] += 1
    total = sum(kinds.values())
    assert n_multi / len(samples) == pytest.approx(cfg.multi_turn, abs=0.04)
    mix = cfg.task_mix
    caption_share = sum(mix[t] for t in CAPTION_PROMPTS) / sum(mix.values())
    assert kinds["caption"] / total == pytest.approx(caption_share, abs=0.05)
    assert kinds["exists"] / total == pytest.approx(mix["exists"] / sum(mix.values()), abs=0.05)


def _check_answer(scene, question, answer, qtype):
    """An independent reading of the question against the scene graph."""
    objs = scene.objects
    if qtype == "exists":
        m = re.fullmatch(r"Is there a (\w+)(?: (\w+))? in the image\?", question)
        a, b = m.groups()
        if b is None:
            truth = any(a in (o.colour, o.shape) for o in objs)
        elif b == "object":
            truth = any(o.colour == a for o in objs)
        else:
            truth = any(o.kind == (a, b) for o in objs)
        return answer == ("yes" if truth else "no")
    if qtype == "count":
        n = NUMBER_WORDS.index(answer)
        if question == "How many objects are there?":
            return n == len(objs)
        colour, plural = re.fullmatch(r"How many (?:(\w+) objects|(\w+)) are there\?", question).groups()
        if colour:
            return n == sum(o.colour == colour for o in objs)
        return n == sum(o.shape + ("es" if o.shape.endswith("s") else "s") == plural for o in objs)
    if qtype == "position":
        words = re.fullmatch(r"Where is the (.+)\?", question).group(1).split()
        hits = [o for o in objs if o.kind == tuple(words[-2:]) and (len(words) == 2 or o.size == words[0])]
        return len(hits) == 1 and position_phrase(hits[0].row, hits[0].col, scene.grid) == answer
    if qtype in ("colour", "shape"):
        m = re.search(r"at the (\w+ \w+)\?", question)
        if m:
            hits = [o for o in objs if position_phrase(o.row, o.col, scene.grid) == m.group(1)]
        else:
            word = re.fullmatch(r"What \w+ is the (\w+)(?: object)?\?", question).group(1)
            hits = [o for o in objs if word in (o.colour, o.shape)]
        return len(hits) == 1 and getattr(hits[0], qtype) == answer
    if qtype == "compare":
        m = re.fullmatch(
            r"(?:Is|Are) the (\w+ \w+) (?:and the |larger than the |to the left of the |above the )(\w+ "
            r"\w+)(?: the same size)?\?",
            question,
        )
        a, b = (next(o for o in objs if o.kind == tuple(x.split())) for x in m.groups())
        truth = {
            "larger": a.size == "large" and b.size == "small",
            "left": a.col < b.col,
            "above": a.row < b.row,
            "same": a.size == b.size,
        }[next(k for k in ("larger", "left", "above", "same") if k in question)]
        return answer == ("yes" if truth else "no")
    raise AssertionError(qtype)


def test_vqa_answers_are_true_and_yes_no_balanced():
    world = World(WorldConfig())
    rng = random.Random(0)
    scenes = world.sample_split(600, "test", rng)
    by_type = Counter()
    yes = Counter()
    for i, scene in enumerate(scenes):
        for row in vqa_questions(scene, world, rng, i):
            assert _check_answer(scene, row["text"], row["answer"], row["type"]), (scene, row)
            by_type[row["type"]] += 1
            yes[row["type"]] += row["answer"] == "yes"
    assert set(by_type) == {"colour", "shape", "count", "position", "exists", "compare"}
    assert yes["exists"] / by_type["exists"] == pytest.approx(0.5, abs=0.02)
    assert yes["compare"] / by_type["compare"] == pytest.approx(0.5, abs=0.1)


def test_pope_balance_and_negatives():
    world = World(WorldConfig())
    train = world.sample_split(3000, "train", random.Random(0))
    test = world.sample_split(300, "test", random.Random(1))
    stats = KindStats.from_scenes(train)
    # Statistics recomputed here, independently of KindStats.
    freq = Counter(k for s in train for k in s.kinds())
    cooc = Counter((a, b) for s in train for a in s.kinds() for b in s.kinds() if a != b)
    rng = random.Random(2)
    labels = Counter()
    n_partner_cases = 0
    for scene in test:
        rows = pope_questions(scene, world, stats, rng)
        present = scene.kinds()
        absent = [k for k in world.kinds if k not in present]
        for split in ("random", "popular", "adversarial"):
            mine = [r for r in rows if r["split"] == split]
            kinds = [tuple(re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", r["text"]).groups()) for r in mine]
            negs = [k for k, r in zip(kinds, mine) if r["label"] == "no"]
            pos = [k for k, r in zip(kinds, mine) if r["label"] == "yes"]
            labels[(split, "yes")] += len(pos)
            labels[(split, "no")] += len(negs)
            assert len(pos) == len(negs) == min(3, len(present))
            assert all(k in present for k in pos) and all(k not in present for k in negs)
            others = [k for k in absent if k not in negs]
            if split == "popular":
                assert min(freq[k] for k in negs) >= max((freq[k] for k in others), default=0)
            if split == "adversarial":
                score = {k: sum(cooc[(p, k)] for p in present) for k in absent}
                assert min(score[k] for k in negs) >= max((score[k] for k in others), default=0)
                assert all(score[k] > 0 for k in negs)  # truly co-occurring objects
                # An absent affinity partner of a lone object is its first adversarial negative.
                if len(present) == 1:
                    (k,) = present
                    if k in world.partner:
                        n_partner_cases += 1
                        assert negs[0] == world.partner[k]
    for split in ("random", "popular", "adversarial"):
        assert labels[(split, "yes")] == labels[(split, "no")] > 0
    assert n_partner_cases > 5


def _colour_shared_share(cfg, n=2500):
    """Among training "no" answers to "Is there a <colour> <shape>...?": the share whose colour is in the image."""
    world, scenes, samples, _ = _samples(cfg, n)
    shared = total = 0
    for scene, sample in zip(scenes, samples):
        colours = {o.colour for o in scene.objects}
        for prompt, answer in _turns(sample):
            m = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", prompt)
            if m and answer == "no" and m.group(1) in world.cfg.colours and m.group(2) in world.cfg.shapes:
                total += 1
                shared += m.group(1) in colours
    return shared / total


def test_colour_near_misses_raise_the_share_of_same_colour_negatives():
    base = _colour_shared_share(WorldConfig())
    more = _colour_shared_share(WorldConfig(train_colour_near_miss=0.6))
    # 0.6 drawn first, the remaining 0.4 as before: expected 0.6 + 0.4 * base.
    assert base < 0.45 and more == pytest.approx(0.6 + 0.4 * base, abs=0.05)
    with pytest.raises(ValueError, match="train_colour_near_miss"):
        WorldConfig(train_colour_near_miss=1.5)


def test_colour_near_misses_leave_evaluation_questions_unchanged():
    world_a, world_b = World(WorldConfig()), World(WorldConfig(train_colour_near_miss=0.9))
    scenes = world_a.sample_split(200, "test", random.Random(1))
    ra, rb = random.Random(3), random.Random(3)
    assert [vqa_questions(s, world_a, ra, i) for i, s in enumerate(scenes)] == [
        vqa_questions(s, world_b, rb, i) for i, s in enumerate(scenes)
    ]
