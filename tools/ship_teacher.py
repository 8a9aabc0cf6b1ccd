"""Put a trained demo teacher into the package, where `modistill demo` finds it.

    modistill demo --train-teacher --out runs/teacher-build     # ~25 min on 2 cores (vision + teacher)
    python tools/ship_teacher.py runs/teacher-build            # -> src/modistill/demo/shipped_teacher/

The model card records the run's validation figures when RUN/eval-val/teacher.json exists
(`modistill eval` on RUN/world/val, or the demo's `Demo.evaluate(..., split="val")`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modistill.demo.shipped import SHIPPED_TEACHER, ship_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a `modistill demo --train-teacher` run directory")
    ap.add_argument("--dest", type=Path, default=SHIPPED_TEACHER)
    args = ap.parse_args()
    val_file = args.run / "eval-val" / "teacher.json"
    validation = None
    if val_file.is_file():
        m = json.loads(val_file.read_text())["metrics"]
        validation = {
            "vqa_accuracy": round(m["vqa"]["accuracy"], 3),
            "vqa_per_type": {k: round(v["accuracy"], 3) for k, v in m["vqa"]["per_type"].items()},
            "pope_f1": round(m["pope"]["overall"]["f1"], 3),
            "pope_yes_ratio": round(m["pope"]["overall"]["yes_ratio"], 3),
            "hallucination_greedy": round(m["captions"]["greedy"]["response_hallucination"], 3),
            "hallucination_t1": round(m["captions"]["sampled"]["response_hallucination"], 3),
            "coverage_greedy": round(m["captions"]["greedy"]["coverage"], 3),
        }
    print(ship_teacher(args.run, args.dest, validation))


if __name__ == "__main__":
    main()
