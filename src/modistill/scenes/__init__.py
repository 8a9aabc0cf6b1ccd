"""The built-in procedural "scenes" world: default data and hallucination benchmark (truth is known).

world.py scene graphs and sampling · render.py images · text.py captions / questions / noise ·
oracle.py parse and score model text · build.py write a world directory · tokenizer.py its tokenizer.
"""

from modistill.scenes.build import add_scenes_arguments, build_world, run_scenes_command
from modistill.scenes.oracle import (
    CaptionScore,
    Mention,
    answer_matches,
    caption_metrics,
    label_preference_pairs,
    parse_caption,
    score_caption,
)
from modistill.scenes.tokenizer import train_tokenizer
from modistill.scenes.world import Scene, SceneObject, World, WorldConfig

__all__ = [
    "CaptionScore",
    "Mention",
    "Scene",
    "SceneObject",
    "World",
    "WorldConfig",
    "add_scenes_arguments",
    "answer_matches",
    "build_world",
    "caption_metrics",
    "label_preference_pairs",
    "parse_caption",
    "run_scenes_command",
    "score_caption",
    "train_tokenizer",
]
