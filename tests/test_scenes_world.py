"""Scenes world: determinism, train/test disjointness, rendering fidelity, co-occurrence structure."""

import random

import numpy as np
import pytest

from modistill.config import from_dict
from modistill.errors import UserError
from modistill.scenes.render import image_rng, render_scene
from modistill.scenes.world import PALETTE, SHAPES, KindStats, Scene, World, WorldConfig


def _canon(scenes):
    return [s.canonical() for s in scenes]


def test_sampling_is_deterministic_by_seed():
    world = World(WorldConfig(seed=3))
    a = world.sample_split(200, "train", random.Random("s1"))
    b = World(WorldConfig(seed=3)).sample_split(200, "train", random.Random("s1"))
    c = world.sample_split(200, "train", random.Random("s2"))
    assert _canon(a) == _canon(b) and [s.background for s in a] == [s.background for s in b]
    assert _canon(a) != _canon(c)
    # The world seed changes the structure (popularity / affinity), hence the samples.
    assert World(WorldConfig(seed=4)).popularity != world.popularity


def test_train_and_test_scene_graphs_are_disjoint():
    world = World(WorldConfig())
    train = world.sample_split(3000, "train", random.Random(0))
    test = world.sample_split(400, "test", random.Random(1))
    assert not set(_canon(train)) & set(_canon(test))
    # Single-object graphs are few (216): the hash split still leaves both splits some of them.
    assert any(len(s.objects) == 1 for s in test) and any(len(s.objects) == 1 for s in train)
    # The canonical form ignores the background but not any attribute of an object.
    s = test[0]
    assert Scene(s.objects, s.grid, (1, 2, 3)).canonical() == s.canonical()
    o = s.objects[0]
    moved = Scene(
        (type(o)(o.colour, o.shape, "large" if o.size == "small" else "small", o.row, o.col),) + s.objects[1:],
        s.grid,
        s.background,
    )
    assert moved.canonical() != s.canonical()


def _nearest(pixel, candidates):
    return min(candidates, key=lambda name: sum((int(p) - c) ** 2 for p, c in zip(pixel, candidates[name])))


@pytest.mark.parametrize(
    "cfg",
    [
        WorldConfig(),
        WorldConfig(
            image_size=64, grid=4, colours=list(PALETTE)[:6], shapes=list(SHAPES), max_objects=8, pixel_noise=10.0
        ),
        WorldConfig(
            image_size=40, grid=5, colours=["red", "blue", "white", "black"], shapes=["cross", "diamond"], max_objects=6
        ),
    ],
)
def test_rendered_cell_centres_hold_the_scene_graph(cfg):
    world = World(cfg)
    rng = random.Random(0)
    for i in range(150):
        scene = world.sample_scene(rng)
        img = np.asarray(render_scene(scene, cfg, image_rng(0, "train", i)))
        assert img.shape == (cfg.image_size, cfg.image_size, 3)
        candidates = {c: PALETTE[c] for c in cfg.colours} | {"background": scene.background}
        occupied = {(o.row, o.col): o.colour for o in scene.objects}
        for r in range(cfg.grid):
            for c in range(cfg.grid):
                pixel = img[r * cfg.cell + cfg.cell // 2, c * cfg.cell + cfg.cell // 2]
                assert _nearest(pixel, candidates) == occupied.get((r, c), "background"), (i, scene, r, c)


def test_backgrounds_are_muted_and_far_from_object_colours():
    cfg = WorldConfig(colours=list(PALETTE))
    world = World(cfg)
    rng = random.Random(0)
    backgrounds = {world.sample_background(rng) for _ in range(300)}
    assert len(backgrounds) > 100  # varied
    for bg in backgrounds:
        assert max(bg) - min(bg) <= 44  # a tinted grey, not a saturated colour
        assert all(sum((a - b) ** 2 for a, b in zip(bg, PALETTE[c])) > 90**2 for c in cfg.colours)


def test_affinity_pairs_co_occur_more_than_chance():
    world = World(WorldConfig(seed=1))
    scenes = world.sample_split(4000, "train", random.Random(0))
    stats = KindStats.from_scenes(scenes)
    n = len(scenes)
    assert len(world.partner) == 2 * world.cfg.affinity_pairs
    for a, b in world.partner.items():
        p_b = stats.frequency[b] / n
        p_b_given_a = stats.cooccurrence[(a, b)] / stats.frequency[a]
        assert p_b_given_a > 1.5 * p_b, (a, b, p_b_given_a, p_b)
    # Popularity is skewed: the most frequent kind is several times the least frequent one.
    freq = sorted(stats.frequency.values())
    assert freq[-1] > 3 * freq[0]


def test_bad_world_config_is_a_user_error():
    with pytest.raises(UserError, match="colours"):
        from_dict(WorldConfig, {"colours": ["red", "mauve"]})
    with pytest.raises(UserError, match="image_size"):
        from_dict(WorldConfig, {"image_size": 50, "grid": 3})
    with pytest.raises(UserError, match="task_mix"):
        from_dict(WorldConfig, {"task_mix": {"poetry": 1.0}})
    with pytest.raises(UserError, match="scene graph"):
        Scene.from_json({"grid": 3, "objects": [{"colour": "red"}]})
    obj = {"colour": "red", "shape": "circle", "size": "small", "row": 0, "col": 0}
    with pytest.raises(UserError, match="share a cell"):
        Scene.from_json({"grid": 3, "objects": [obj, obj]})
    with pytest.raises(UserError, match="unknown colour"):
        Scene.from_json({"grid": 3, "objects": [{**obj, "colour": "mauve"}]})
