"""Scene graphs of the procedural "scenes" world, and how they are sampled.

A scene is a few objects (colour x shape x size) on a G x G grid, at most one object per cell, on a
muted background. The world has structure a model can learn and then over-apply:
- a seeded *popularity* (some colour-shape kinds are much more frequent than others), which gives
  POPE's "popular" negatives a meaning;
- seeded *affinity pairs* (e.g. red circles tend to appear with blue squares), which gives POPE's
  "adversarial" negatives a meaning and a noisy-caption teacher something plausible to hallucinate.

Train and test scenes are disjoint by construction: the canonical form of every scene graph is
hashed (salted with the world seed) into a train or a test bucket, and each split only keeps scenes
of its own bucket. Backgrounds and pixel noise are not part of the scene graph.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from modistill.errors import UserError

# Saturated object colours (RGB). Backgrounds are muted greys kept far from all of them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 205, 215),
    "pink": (245, 120, 185),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")

# Position words by grid size: a position is always "<row word> <column word>", e.g. "top left".
ROW_WORDS: dict[int, tuple[str, ...]] = {
    2: ("top", "bottom"),
    3: ("top", "middle", "bottom"),
    4: ("top", "upper", "lower", "bottom"),
    5: ("top", "upper", "middle", "lower", "bottom"),
}
COL_WORDS: dict[int, tuple[str, ...]] = {
    2: ("left", "right"),
    3: ("left", "center", "right"),
    4: ("left", "midleft", "midright", "right"),
    5: ("left", "midleft", "center", "midright", "right"),
}

TASKS = (
    "caption_brief",
    "caption",
    "caption_detailed",
    "exists",
    "colour",
    "shape",
    "count",
    "position",
    "compare",
)
CAPTION_TASKS = ("caption_brief", "caption", "caption_detailed")


def _default_task_mix() -> dict[str, float]:
    # In early calibration runs yes/no stayed at chance unless questions were >= 50-60 % of the data, existence
    # questions prominently among them. Compare and position questions need two lookups (an object, then its
    # size or cell); at 5-6 % of the data a 3-layer teacher answered them at chance, so they get more.
    # Captions 25 %, existence 25 %, other questions 50 %.
    return {
        "caption_brief": 0.08,
        "caption": 0.09,
        "caption_detailed": 0.08,
        "exists": 0.25,
        "colour": 0.09,
        "shape": 0.09,
        "count": 0.10,
        "position": 0.10,
        "compare": 0.12,
    }


@dataclass
class WorldConfig:
    """Everything that defines the world and how its samples look (YAML-mirrored)."""

    image_size: int = 48  # pixels; cell = image_size / grid (16 px = one vision patch of 16)
    grid: int = 3
    colours: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    sizes: list[str] = field(default_factory=lambda: ["small", "large"])
    min_objects: int = 1
    max_objects: int = 3
    pixel_noise: float = 6.0  # std of Gaussian pixel noise, 0-255 scale
    colour_jitter: int = 12  # max per-channel shift of an object's colour
    position_jitter: int = 1  # max shift (px) of an object inside its cell
    popularity_skew: float = 0.8  # kind weight = 1 / rank**skew (0 = uniform)
    affinity_pairs: int = 4  # number of disjoint co-occurring kind pairs
    affinity_strength: float = 0.6  # P(next object is the partner of a kind already placed)
    caption_noise: float = 0.2  # fraction of training captions mentioning one absent object
    task_mix: dict[str, float] = field(default_factory=_default_task_mix)
    multi_turn: float = 0.2  # fraction of training samples with 2-3 turns
    # Share of the training "no" existence questions first drawn from absent kinds whose colour is in
    # the image (against a colour-only shortcut); evaluation sets never use it.
    train_colour_near_miss: float = 0.0
    test_fraction: float = 0.1  # share of scene graphs reserved for the test split
    # Brief captions name object kinds (colour + shape), like CHAIR / Object-HalBench count object
    # categories; detailed ones would also count a wrong size or cell as a hallucinated object.
    eval_caption_style: str = "caption_brief"
    seed: int = 0  # seed of the world's structure (popularity, affinity, split buckets)

    def __post_init__(self) -> None:
        if self.grid not in ROW_WORDS:
            raise ValueError(f"grid must be one of {sorted(ROW_WORDS)}, got {self.grid}")
        if self.image_size <= 0 or self.image_size % self.grid:
            raise ValueError(f"image_size ({self.image_size}) must be a positive multiple of grid ({self.grid})")
        for name, values, known in (
            ("colours", self.colours, PALETTE),
            ("shapes", self.shapes, SHAPES),
            ("sizes", self.sizes, SIZES),
        ):
            unknown = [v for v in values if v not in known]
            if unknown or not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct values from {', '.join(known)}; got {values}")
        if not 0 <= self.min_objects <= self.max_objects <= self.grid**2:
            raise ValueError(
                f"need 0 <= min_objects <= max_objects <= grid**2, got {self.min_objects}, {self.max_objects}"
            )
        if self.max_objects < 1:
            raise ValueError("max_objects must be at least 1")
        for name in ("affinity_strength", "caption_noise", "multi_turn", "train_colour_near_miss"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        unknown = [k for k in self.task_mix if k not in TASKS]
        if unknown:
            raise ValueError(f"task_mix: unknown task {unknown[0]!r}; valid: {', '.join(TASKS)}")
        if any(w < 0 for w in self.task_mix.values()) or sum(self.task_mix.values()) <= 0:
            raise ValueError("task_mix weights must be >= 0 with a positive sum")
        if self.eval_caption_style not in CAPTION_TASKS:
            raise ValueError(f"eval_caption_style must be one of {', '.join(CAPTION_TASKS)}")
        if self.affinity_pairs < 0 or 2 * self.affinity_pairs > len(self.colours) * len(self.shapes):
            raise ValueError("affinity_pairs must be >= 0 and at most half the number of colour-shape kinds")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid


Kind = tuple[str, str]  # (colour, shape): the "object category" POPE asks about


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def kind(self) -> Kind:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """A scene graph; objects are kept in reading order (row, then column)."""

    objects: tuple[SceneObject, ...]
    grid: int
    background: tuple[int, int, int]

    def canonical(self) -> str:
        """The scene graph as a string, independent of background and rendering noise."""
        return f"g{self.grid}|" + ";".join(f"{o.row},{o.col},{o.colour},{o.shape},{o.size}" for o in self.objects)

    def kinds(self) -> set[Kind]:
        return {o.kind for o in self.objects}

    def to_json(self) -> dict[str, Any]:
        return {
            "grid": self.grid,
            "background": list(self.background),
            "objects": [dataclasses.asdict(o) for o in self.objects],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "scene") -> Scene:
        try:
            grid = int(data["grid"])
            objects = [
                SceneObject(str(o["colour"]), str(o["shape"]), str(o["size"]), int(o["row"]), int(o["col"]))
                for o in data["objects"]
            ]
            background = tuple(int(v) for v in data.get("background", (128, 128, 128)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"{where}: not a scene graph ({exc!r}); expected grid, objects[colour, shape, size, row, col]"
            ) from None
        if grid not in ROW_WORDS or any(not (0 <= o.row < grid and 0 <= o.col < grid) for o in objects):
            raise UserError(f"{where}: grid {grid} unsupported or an object lies outside it")
        bad = [o for o in objects if o.colour not in PALETTE or o.shape not in SHAPES or o.size not in SIZES]
        if bad:
            raise UserError(
                f"{where}: unknown colour, shape or size in {bad[0]}; known: {', '.join(PALETTE)} / "
                f"{', '.join(SHAPES)} / {', '.join(SIZES)}"
            )
        try:
            return make_scene(objects, grid, background)  # type: ignore[arg-type]
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None


def make_scene(objects: Iterable[SceneObject], grid: int, background: tuple[int, int, int]) -> Scene:
    objs = tuple(sorted(objects, key=lambda o: (o.row, o.col)))
    cells = [(o.row, o.col) for o in objs]
    if len(set(cells)) != len(cells):
        raise ValueError("two objects share a cell")
    return Scene(objs, grid, tuple(background))  # type: ignore[arg-type]


def position_phrase(row: int, col: int, grid: int) -> str:
    return f"{ROW_WORDS[grid][row]} {COL_WORDS[grid][col]}"


class World:
    """The seeded structure of a world (popularity, affinity, split buckets) and its sampler."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        rng = random.Random(f"world-{cfg.seed}")
        self.kinds: list[Kind] = [(c, s) for c in cfg.colours for s in cfg.shapes]
        ranked = list(self.kinds)
        rng.shuffle(ranked)
        self.popularity: dict[Kind, float] = {k: 1.0 / (r + 1) ** cfg.popularity_skew for r, k in enumerate(ranked)}
        # Disjoint pairs; prefer pairs that differ in both colour and shape so a partner is
        # never trivially confusable with its anchor.
        pool = list(self.kinds)
        rng.shuffle(pool)
        self.partner: dict[Kind, Kind] = {}
        for _ in range(cfg.affinity_pairs):
            a = pool.pop(0)
            choices = [k for k in pool if k[0] != a[0] and k[1] != a[1]] or pool
            b = rng.choice(choices)
            pool.remove(b)
            self.partner[a] = b
            self.partner[b] = a
        self._kind_list = list(self.popularity)
        self._kind_weights = [self.popularity[k] for k in self._kind_list]

    def split_of(self, scene: Scene) -> str:
        """'test' or 'train': a salted hash of the canonical scene graph decides, so splits never share one."""
        digest = hashlib.blake2b(f"{self.cfg.seed}|{scene.canonical()}".encode(), digest_size=8).digest()
        return "test" if int.from_bytes(digest, "big") / 2**64 < self.cfg.test_fraction else "train"

    def sample_kinds(self, n: int, rng: random.Random) -> list[Kind]:
        kinds: list[Kind] = []
        for _ in range(n):
            partners = [self.partner[k] for k in kinds if k in self.partner and self.partner[k] not in kinds]
            if partners and rng.random() < self.cfg.affinity_strength:
                kinds.append(rng.choice(partners))
            else:
                kinds.append(rng.choices(self._kind_list, self._kind_weights)[0])
        return kinds

    def sample_background(self, rng: random.Random) -> tuple[int, int, int]:
        # Muted: a grey level with a small tint, rejected when close to any object colour.
        while True:
            base = rng.randint(85, 175)
            bg = tuple(min(255, max(0, base + rng.randint(-22, 22))) for _ in range(3))
            if all(_dist2(bg, PALETTE[c]) > 90**2 for c in self.cfg.colours):
                return bg  # type: ignore[return-value]

    def sample_scene(self, rng: random.Random) -> Scene:
        cfg = self.cfg
        n = rng.randint(cfg.min_objects, cfg.max_objects)
        kinds = self.sample_kinds(n, rng)
        cells = rng.sample(range(cfg.grid * cfg.grid), n)
        objects = [
            SceneObject(colour, shape, rng.choice(cfg.sizes), cell // cfg.grid, cell % cfg.grid)
            for (colour, shape), cell in zip(kinds, cells)
        ]
        return make_scene(objects, cfg.grid, self.sample_background(rng))

    def sample_split(self, n: int, split: str, rng: random.Random) -> list[Scene]:
        """`n` scenes whose graphs belong to `split` ("train" or "test"); rejection sampling."""
        if split not in ("train", "test"):
            raise ValueError(split)
        scenes: list[Scene] = []
        tries = 0
        while len(scenes) < n:
            tries += 1
            if tries > 1000 * (n + 10):
                raise UserError(
                    f"could not sample {n} {split} scenes: the world is too small (raise max_objects or grid, "
                    "or change test_fraction)"
                )
            scene = self.sample_scene(rng)
            if self.split_of(scene) == split:
                scenes.append(scene)
        return scenes


def _dist2(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return sum((x - y) ** 2 for x, y in zip(a, b))


@dataclass
class KindStats:
    """How often each kind appears in training scene graphs, and how often two kinds co-occur."""

    frequency: Counter = field(default_factory=Counter)
    cooccurrence: Counter = field(default_factory=Counter)  # key: (kind_a, kind_b), both orders

    @classmethod
    def from_scenes(cls, scenes: Iterable[Scene]) -> KindStats:
        stats = cls()
        for scene in scenes:
            kinds = scene.kinds()
            stats.frequency.update(kinds)
            for a in kinds:
                for b in kinds:
                    if a != b:
                        stats.cooccurrence[(a, b)] += 1
        return stats

    def most_frequent(self, kinds: Iterable[Kind]) -> list[Kind]:
        """`kinds` ordered by training frequency, most frequent first (ties by name)."""
        return sorted(kinds, key=lambda k: (-self.frequency[k], k))

    def most_cooccurring(self, present: Iterable[Kind], candidates: Iterable[Kind]) -> list[Kind]:
        """`candidates` ordered by how often they co-occur with the `present` kinds in training."""
        present = list(present)
        return sorted(
            candidates, key=lambda c: (-sum(self.cooccurrence[(p, c)] for p in present), -self.frequency[c], c)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "frequency": {" ".join(k): v for k, v in self.most_frequent_items()},
            "top_cooccurrence": [
                {"a": " ".join(a), "b": " ".join(b), "count": n}
                for (a, b), n in self.cooccurrence.most_common(20)
                if a < b
            ],
        }

    def most_frequent_items(self) -> list[tuple[Kind, int]]:
        return sorted(self.frequency.items(), key=lambda kv: (-kv[1], kv[0]))
