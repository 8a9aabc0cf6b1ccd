"""Linear probes on a demo teacher's image tokens: can each layer's token say which cell it is in?

    python tools/probe_image_tokens.py runs/demo            # the demo's teacher, 1,500 training scenes

If a probe reads a cell's row and column from the tokens at every layer, but the model still answers
"Where is the red circle?" wrongly, the position is in the tokens and the model has not learnt to
carry it to its answer (a training problem, not a missing feature). docs/demo.md reports the result.

The tokens go through the language model on their own (no prompt before them). That is what a
causal LM sees at the image positions apart from the system prompt, so the probe is a close view,
not the exact one. Probes are trained on 70 % of the images and scored on the rest, on occupied
cells only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from modistill.data.images import open_rgb


@torch.no_grad()
def image_token_states(model_dir: Path, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """{layer name: (N * cells, hidden)} for the tower, the projector and each LM layer."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    states: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), 100):
        pixels = processor.image_processor(images=images[i : i + 100], return_tensors="pt")["pixel_values"]
        # vision_feature_layer -1: the last layer before the post-layernorm, as the Llava model reads it.
        tower = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        projected = model.model.multi_modal_projector(tower)
        lm = model.model.language_model(inputs_embeds=projected, output_hidden_states=True).hidden_states[1:]
        layers = {"tower": tower, "projector": projected, **{f"lm layer {j}": x for j, x in enumerate(lm)}}
        for name, h in layers.items():
            states.setdefault(name, []).append(h.reshape(-1, h.shape[-1]).float())
    return {name: torch.cat(parts) for name, parts in states.items()}


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> float:
    """Held-out accuracy of a linear softmax probe x -> y (x standardised per feature)."""
    torch.manual_seed(0)
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-5)
    probe = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(x[train]), y[train]).backward()
        opt.step()
    with torch.no_grad():
        return (probe(x[test]).argmax(-1) == y[test]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a demo run directory (holds world/ and teacher/)")
    parser.add_argument("--model", default="teacher", help="model directory inside the run")
    parser.add_argument("--images", type=int, default=1500, help="training scenes to probe on")
    args = parser.parse_args()

    rows = [json.loads(line) for line in (args.run / "world" / "train_scenes.jsonl").open()][: args.images]
    grid = rows[0]["scene"]["grid"]
    cells = grid * grid
    images = [open_rgb(args.run / "world" / r["image"]) for r in rows]
    states = image_token_states(args.run / args.model, images)

    occupied = torch.zeros(len(rows), cells, dtype=torch.bool)
    for i, r in enumerate(rows):
        for o in r["scene"]["objects"]:
            occupied[i, o["row"] * grid + o["col"]] = True
    occupied = occupied.flatten()
    first_test = int(0.7 * len(rows)) * cells  # split by image, not by cell
    index = torch.arange(len(occupied))
    train, test = occupied & (index < first_test), occupied & (index >= first_test)
    cell = torch.arange(cells).repeat(len(rows))

    print(f"{'layer':12s} {'row':>6s} {'column':>7s}   ({int(test.sum())} held-out occupied cells)")
    for name, x in states.items():
        row = probe_accuracy(x, cell // grid, train, test)
        col = probe_accuracy(x, cell % grid, train, test)
        print(f"{name:12s} {row:6.3f} {col:7.3f}")


if __name__ == "__main__":
    main()
