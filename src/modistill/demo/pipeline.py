"""`modistill demo`: the whole LLaVA-MoD chain on the built-in scenes world, measured.

    DIR/world/                scenes world: images, train.json, prefs, eval and validation sets, tokenizer
    DIR/vision/               the shared SigLIP tower, pretrained as a scene-graph reader
    DIR/configs/*.yaml        every stage's YAML (re-runnable with `modistill train`)
    DIR/teacher-stage0/       teacher projector alignment
    DIR/teacher/              the final teacher (dense; frozen tower, projector + LLM trained): by
                              default a copy of the one shipped in the package (demo/shipped.py)
    DIR/student/stage0|stage1a|stage1b|stage2/   one checkpoint per student stage
    DIR/student/prefs.json    on-policy preference pairs (1b student sampled, oracle-labelled)
    DIR/eval/<model>.json     held-out evaluation of each model
    DIR/report.md, report.html, results.json, figures/

Every stage goes through the same YAML-driven code a user runs. A finished stage (metrics.json)
or evaluation (eval/*.json) is skipped on re-run and keeps its earlier time (DIR/timings.json);
`--fresh` starts over.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from modistill.config import to_dict
from modistill.demo.plan import FULL, QUICK, TEACHER_SOURCES, DemoPlan, StagePlan
from modistill.demo.report import summary_row, table_markdown, write_report
from modistill.demo.shipped import install_shipped_teacher
from modistill.demo.vision_reader import pretrain_reader
from modistill.errors import UserError
from modistill.eval.run import evaluate
from modistill.io import is_ours, mark, write_json_atomic
from modistill.models.load import MOE_TEXT_TYPES, load_config
from modistill.scenes.build import build_world
from modistill.scenes.world import WorldConfig
from modistill.stages import load_stage_config, runner_of


def _is_moe(model_dir: Path) -> bool:
    config = load_config(model_dir)
    return getattr(config, "text_config", config).model_type in MOE_TEXT_TYPES


class Demo:
    def __init__(self, out: str | Path, plan: DemoPlan, seed: int = 0, progress: bool = True, world_seed: int = 0):
        self.out = Path(out)
        self.plan = plan
        self.seed = seed
        self.world_seed = world_seed
        self.progress = progress
        self.timings: dict[str, float] = {}
        # What an earlier run of this directory timed: a resumed run's report keeps the skipped parts' times.
        timings_file = self.out / "timings.json"
        self._earlier_timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
        self.world = self.out / "world"
        if not progress:  # the libraries' own bars too (dataset preparation, weight loading/saving)
            import datasets
            import transformers

            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()

    # --- small helpers -------------------------------------------------------------------------
    def _timed(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        write_json_atomic(self.out / "timings.json", {**self._earlier_timings, **self.timings})
        return result

    def _say(self, text: str) -> None:
        print(f"\n=== {text}", flush=True)

    def _train_args(self, sp: StagePlan, **extra) -> dict[str, Any]:
        return {
            "learning_rate": sp.learning_rate,
            "max_steps": sp.steps,
            "per_device_train_batch_size": sp.batch_size,
            "logging_steps": max(1, sp.steps // 20),
            "save_steps": max(10, sp.steps // 3),
            "save_total_limit": 1,
            "warmup_steps": 0.05,
            "lr_scheduler_type": "cosine",
            "seed": self.seed,
            "disable_tqdm": not self.progress,
            **extra,
        }

    def _data(self, files: list[Path], **extra) -> dict[str, Any]:
        return {
            "train": [str(f) for f in files],
            "image_root": str(self.world),
            "max_length": 192,
            "cache_dir": str(self.out / ".data-cache"),
            **extra,
        }

    def _write_config(self, out_dir: Path, cfg: dict[str, Any]) -> tuple[str, Path]:
        """DIR/configs/NAME.yaml for the stage writing to `out_dir`: (NAME, path)."""
        name = str(Path(out_dir).relative_to(self.out)).replace("/", "-")
        path = self.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return name, path

    def run_stage(self, out_dir: Path, cfg: dict[str, Any]) -> dict:
        """Write the stage's YAML, then run it exactly as `modistill train DIR/configs/...yaml` would."""
        name, path = self._write_config(out_dir, cfg)
        stage_cfg = load_stage_config(path)
        self._say(f"{name}  ({path.relative_to(self.out)})")
        run = runner_of(stage_cfg)
        if (Path(out_dir) / "metrics.json").is_file():  # finished earlier: the recipe only reloads it
            return run(stage_cfg)
        return self._timed(name, run, stage_cfg)

    def evaluate(self, name: str, model_dir: Path, split: str = "eval", sample_captions: bool = True) -> dict:
        """Evaluate on the held-out test scenes (`split="eval"`) or on validation scenes ("val"), the
        only ones any tuning may look at. `sample_captions=False`: greedy captions only (no T=1 rate)."""
        out = self.out / ("eval" if split == "eval" else f"eval-{split}") / f"{name.replace('/', '_')}.json"
        if out.is_file():
            return json.loads(out.read_text())
        self._say(f"evaluate {name}" + ("" if split == "eval" else f" on {split}"))
        files = {k: self.world / split / f"{k}.jsonl" for k in ("vqa", "pope", "captions")}
        return self._timed(
            f"eval {name}" + ("" if split == "eval" else f" ({split})"),
            evaluate,
            model_dir,
            files,
            out,
            batch_size=64,
            caption_samples=self.plan.caption_samples if sample_captions else 0,
            # Questions: the first eval_limit rows; captions (the hallucination rates): every image.
            limit={"vqa": self.plan.eval_limit, "pope": self.plan.eval_limit},
            seed=self.seed,
            progress=self.progress,
        )

    # --- the chain -----------------------------------------------------------------------------
    def make_world(self) -> None:
        if (self.world / "world.json").is_file():
            return
        self._say("generate the scenes world")
        cfg = WorldConfig(
            caption_noise=self.plan.caption_noise,
            multi_turn=self.plan.multi_turn,
            train_colour_near_miss=self.plan.colour_near_miss,
            seed=self.world_seed,
        )
        self._timed(
            "world",
            build_world,
            self.world,
            cfg,
            n_train=self.plan.n_train,
            n_test=self.plan.n_test,
            seed=self.world_seed,
            overwrite=True,
            progress=self.progress,
        )

    def vision_reader(self) -> Path:
        """The shared, pretrained vision tower (the demo's stand-in for CLIP)."""
        out = self.out / "vision"
        if not (out / "metrics.json").is_file():
            self._say("pretrain the vision tower as a scene-graph reader")
            metrics = self._timed(
                "vision", pretrain_reader, self.world, out, self.plan.reader, seed=self.seed, progress=self.progress
            )
            print(json.dumps(metrics))
        return out

    def teacher(self) -> Path:
        """The shipped teacher (copied into DIR/teacher), or one trained here: `plan.teacher`."""
        if self.plan.teacher not in TEACHER_SOURCES:
            raise UserError(f"plan.teacher must be one of {TEACHER_SOURCES} (got {self.plan.teacher!r})")
        if self.plan.teacher == "shipped":
            if not (self.out / "teacher" / "metrics.json").is_file():
                self._say("the shipped teacher (trained once by `modistill demo --train-teacher`)")
                self._timed("teacher (shipped)", install_shipped_teacher, self.out / "teacher")
            return self.out / "teacher"
        return self.train_teacher()

    def train_teacher(self) -> Path:
        p = self.plan
        build = {
            "vision": {"pretrained": str(self.vision_reader())},
            "text": {
                "type": "qwen3",
                "hidden_size": p.teacher_hidden,
                "num_layers": p.teacher_layers,
                "num_heads": 4,
                "num_kv_heads": 2,
                "intermediate_size": 2 * p.teacher_hidden,
            },
            "tokenizer": str(self.world / "tokenizer"),
            "seed": self.seed,
        }
        train = [self.world / "train.json"]
        self.run_stage(
            self.out / "teacher-stage0",
            {
                "stage": "align",
                "output_dir": str(self.out / "teacher-stage0"),
                "student": {"build": build},
                "data": self._data(train, packing=self.plan.packing, image_cache_mb=self.plan.image_cache_mb),
                "trainable": ["projector"],
                "train": self._train_args(p.teacher_align),
            },
        )
        # Then the LLaVA-1.5 recipe: the pretrained tower stays frozen, projector and LLM learn.
        self.run_stage(
            self.out / "teacher",
            {
                "stage": "sft",
                "output_dir": str(self.out / "teacher"),
                "student": {"path": str(self.out / "teacher-stage0")},
                "data": self._data(train, packing=self.plan.packing, image_cache_mb=self.plan.image_cache_mb),
                "trainable": ["projector", "llm"],
                "train": self._train_args(p.teacher_sft),
            },
        )
        return self.out / "teacher"

    # --- student stages, as building blocks (the ablations recombine them) ----------------------
    def student_data(self, files: list[Path] | None = None, packing: bool | None = None) -> dict[str, Any]:
        packing = self.plan.packing if packing is None else packing
        files = files or [self.world / "train.json"]
        cache = self.plan.image_cache_mb
        return self._data(files, max_samples=self.plan.student_samples, packing=packing, image_cache_mb=cache)

    def student_build(self, teacher: Path, seed: int) -> dict[str, Any]:
        """The student's model spec (`student.build` of its stage 0)."""
        p = self.plan
        return {
            # LLaVA-MoD's student shares the teacher's (frozen) vision encoder.
            "vision": {"pretrained": str(teacher)},
            "text": {
                "type": "qwen3",
                "hidden_size": p.student_hidden,
                "num_layers": p.student_layers,
                "num_heads": 4,
                "num_kv_heads": 2,
                "intermediate_size": 2 * p.student_hidden,
            },
            # The teacher's tokenizer (KD compares the two models' distributions row by row). For a
            # trained teacher it is the world's; the shipped one keeps world 0's on any world.
            "tokenizer": str(teacher),
            "seed": seed,
        }

    def align_student(self, out_dir: Path, teacher: Path, seed: int) -> Path:
        p = self.plan
        self.run_stage(
            out_dir,
            {
                "stage": "align",
                "output_dir": str(out_dir),
                "student": {"build": self.student_build(teacher, seed)},
                "data": self.student_data(),
                "train": self._train_args(p.student_align),
            },
        )
        return out_dir

    def mimic(
        self,
        out_dir: Path,
        base: Path,
        teacher: Path | None,
        sp: StagePlan,
        *,
        kd: float = 1.0,
        ce: float = 0.0,
        upcycle_top_k: int | None = None,
        loss: dict[str, Any] | None = None,
        trainable: list[str] | None = None,
    ) -> Path:
        """Stage 1a (dense KD), 1b (upcycle_top_k set, or an MoE base: KD + CE + balance), or SFT (kd=0).
        `trainable`: parameter groups instead of the stage's defaults (runtime/groups.py)."""
        student: dict[str, Any] = {"path": str(base)}
        cfg: dict[str, Any] = {
            "output_dir": str(out_dir),
            "student": student,
            # On-policy batches are built from sampled answers, not packed rows.
            "data": self.student_data(packing=False if (loss or {}).get("onpolicy_fraction", 0) > 0 else None),
            "train": self._train_args(sp),
        }
        if trainable is not None:
            cfg["trainable"] = trainable
        if kd == 0:
            cfg["stage"] = "sft"
        elif upcycle_top_k is not None or _is_moe(base):
            upcycle = (
                None
                if upcycle_top_k is None
                else {
                    "num_experts": self.plan.num_experts,
                    "top_k": upcycle_top_k,
                    "layers": "every-other",
                    "seed": self.seed,
                }
            )
            student["experts_implementation"] = "eager"  # on CPUs ~15 % faster than grouped_mm
            cfg.update(
                stage="mimic_sparse",
                upcycle=upcycle,
                loss={"kd_weight": kd, "ce_weight": ce, "balance_coef": 0.01, **(loss or {})},
            )
        else:
            cfg.update(stage="mimic_dense", loss={"kd_weight": kd, "ce_weight": ce, **(loss or {})})
        if kd > 0:
            cfg["teacher"] = {"path": str(teacher)}
            if self.plan.teacher_top_k > 0 and not (loss or {}).get("onpolicy_fraction", 0) > 0:
                assert teacher is not None
                cfg["teacher_cache"] = str(self.teacher_cache(out_dir, cfg, teacher))
        self.run_stage(out_dir, cfg)
        return out_dir

    def teacher_cache(self, out_dir: Path, cfg: dict[str, Any], teacher: Path) -> Path:
        """The teacher's top-k log-probs on the student's data, made once (`modistill cache-teacher`)
        for the stage `cfg` and reused by every mimic stage on the same data and teacher."""
        from modistill.stages.cache_teacher import CacheConfig, run_cache_teacher

        cache = self.out / "teacher-cache"
        if (cache / "manifest.json").is_file():
            made_for = json.loads((cache / "manifest.json").read_text()).get("teacher")
            if made_for != str(teacher):
                raise UserError(f"{cache}: made for teacher {made_for}, not {teacher}; delete it to rebuild")
            return cache
        _, stage_yaml = self._write_config(out_dir, cfg)
        self._say(f"cache the teacher's top-{self.plan.teacher_top_k} log-probs (for {stage_yaml.name})")
        config = CacheConfig(
            stage=str(stage_yaml), output_dir=str(cache), top_k=self.plan.teacher_top_k, batch_size=64, shard_size=4096
        )
        self._timed("teacher cache", run_cache_teacher, config, overwrite=True, progress=self.progress)
        return cache

    def onpolicy_pairs(self, out_file: Path, model_dir: Path) -> Path:
        if out_file.is_file():
            return out_file
        self._say(f"on-policy preference pairs: sample {model_dir.name}, label with the oracle")
        from modistill.demo.onpolicy import build_onpolicy_pairs
        from modistill.models.load import load_model

        p = self.plan
        stats = self._timed(
            "preference pairs",
            build_onpolicy_pairs,
            load_model(model_dir),
            self.world,
            out_file,
            n_images=p.pref_images,
            samples=p.pref_samples,
            short_answers=p.pref_short,
            greedy_images=p.pref_greedy,
            repeat_images=p.pref_repeat,
            seed=self.seed,
            progress=self.progress,
        )
        write_json_atomic(out_file.with_name(out_file.stem + "_stats.json"), stats)
        print(json.dumps(stats))
        return out_file

    def preference(self, out_dir: Path, base: Path, teacher: Path, prefs: Path, kind: str | None = None) -> Path:
        p = self.plan
        kind = kind or p.pref_loss
        self.run_stage(
            out_dir,
            {
                "stage": "preference",
                "output_dir": str(out_dir),
                "student": {"path": str(base), "experts_implementation": "eager"},
                "teacher": {"path": str(teacher)},
                "reference": "precompute",
                "data": self._data([prefs]),
                "loss": {
                    "preference": kind,
                    "beta": p.pref_beta,
                    "chosen_ce_weight": p.pref_chosen_ce,
                    "balance_coef": 0.01,
                },
                "train": self._train_args(p.stage2),
            },
        )
        return out_dir

    def student(self, teacher: Path) -> dict[str, Path]:
        p, s = self.plan, self.out / "student"
        dirs = {"stage0": self.align_student(s / "stage0", teacher, self.seed + 1)}
        dirs["stage1a"] = self.mimic(s / "stage1a", dirs["stage0"], teacher, p.stage1a, kd=1.0, ce=0.0)
        dirs["stage1b"] = self.mimic(
            s / "stage1b", dirs["stage1a"], teacher, p.stage1b, kd=1.0, ce=1.0, upcycle_top_k=p.top_k
        )
        prefs = self.onpolicy_pairs(s / "prefs.json", dirs["stage1b"])
        dirs["stage2"] = self.preference(s / "stage2", dirs["stage1b"], teacher, prefs)
        return dirs

    def run(self) -> dict:
        start = time.perf_counter()
        self.make_world()
        teacher = self.teacher()
        dirs = self.student(teacher)
        models = {"teacher": teacher, **{f"student/{k}": v for k, v in dirs.items()}}
        rows = []
        for name, path in models.items():
            # The stage-0 student has trained only its projector: its LLM is untrained, so its sampled
            # captions (48 tokens of noise each) say nothing and cost as much as a trained model's whole
            # evaluation. Its greedy captions stay (hallucination 1.0: the chain's starting point).
            results = self.evaluate(name, path, sample_captions=name != "student/stage0")
            stage_metrics = json.loads((path / "metrics.json").read_text())
            rows.append(summary_row(name, results, stage_metrics))
        # Parts skipped because an earlier run finished them keep that run's time (and count in the total).
        reused = {k: v for k, v in self._earlier_timings.items() if k != "total" and k not in self.timings}
        self.timings = {**reused, **self.timings}
        self.timings["total"] = time.perf_counter() - start + sum(reused.values())
        write_json_atomic(self.out / "timings.json", self.timings)
        report = write_report(
            self.out,
            {
                "title": "modistill demo: LLaVA-MoD on the scenes world",
                "notes": [
                    f"seed {self.seed}, world seed {self.world_seed}; plan {json.dumps(to_dict(self.plan))}",
                    f"caption noise {self.plan.caption_noise}: that share of training captions names an object "
                    "that is not in the image (web-caption noise); hallucination is measured by an oracle "
                    "that knows each test image's scene graph",
                    "vision tower: SigLIP pretrained as a reader of the training scene graphs, frozen and "
                    "shared by teacher and student (the demo's stand-in for CLIP)",
                    "teacher: "
                    + (
                        "the package's shipped one, trained once on world 0 by `modistill demo --train-teacher`"
                        if self.plan.teacher == "shipped"
                        else f"trained in this run ({self.plan.teacher_sft.steps} steps)"
                    ),
                    "student = smaller Qwen3 on the teacher's frozen vision tower, trained on "
                    f"{self.plan.student_samples} of the teacher's {self.plan.n_train} training samples",
                ],
                "rows": rows,
                "stages": {"teacher": teacher, **{k: v for k, v in dirs.items()}},
                "timings": self.timings,
            },
        )
        print("\n" + table_markdown(rows))
        print(f"\nreport: {report['markdown']} (and {report['html'].name}); total {self.timings['total']:.0f} s")
        return {"rows": rows, "timings": self.timings, "report": report}


def run_demo(
    out: str | Path = "runs/demo",
    seed: int = 0,
    quick: bool = False,
    fresh: bool = False,
    progress: bool = True,
    world_seed: int = 0,
    train_teacher: bool = False,
) -> dict:
    out = Path(out)
    marker = out / "demo.json"
    plan = QUICK if quick else FULL
    if train_teacher:
        plan = replace(plan, teacher="train")
    settings = {"seed": seed, "world_seed": world_seed, "quick": quick, "plan": to_dict(plan)}
    ours = (
        out.is_dir()
        and is_ours(out, legacy=("demo.json",), kind="demo")
        and (marker.is_file() or not any(out.iterdir()))
    )
    if fresh and out.exists():
        if not ours:
            raise UserError(f"{out}: not a demo directory; refusing to delete it (choose another --out)")
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()):
        if not ours:
            raise UserError(f"{out}: exists and is not a demo directory; choose another --out")
        if json.loads(marker.read_text()) != settings:
            raise UserError(
                f"{out}: holds a demo run with other settings (seed/--world-seed/--quick/plan); pass --fresh or "
                "another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    mark(out, "demo")
    write_json_atomic(marker, settings)
    return Demo(out, plan, seed, progress, world_seed=world_seed).run()
