"""The `modistill` command: one sub-command per job, each a thin layer over library functions.

Errors in user input (`UserError`) print one line and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from modistill.errors import UserError


def _cmd_upcycle(args: argparse.Namespace) -> int:
    from modistill.io import atomic_output_dir, check_output_dir, write_json_atomic
    from modistill.models import load as model_io
    from modistill.upcycle import copy_processor_files, load_dense_model, plan_upcycle, upcycle

    # Refuse bad requests before the (possibly long) load of the weights.
    # --overwrite replaces only an earlier upcycle output, never the source model or a folder holding it.
    out_rules: dict[str, Any] = {"inputs": [args.model], "legacy": ("upcycle.json",), "kind": "upcycled-model"}
    check_output_dir(args.out, args.overwrite, **out_rules)
    config = model_io.load_config(args.model, args.trust_remote_code)
    model_io.check_supported(config, args.model)
    plan_upcycle(config, args.num_experts, args.top_k, args.layers)
    # Weights only: a directory holding just the model is valid input; processor files are copied as they are.
    dense = load_dense_model(args.model, model_io.torch_dtype(args.dtype), args.trust_remote_code)
    moe = upcycle(dense, args.num_experts, args.top_k, args.layers, router_std=args.router_std, seed=args.seed)
    with atomic_output_dir(args.out, args.overwrite, **out_rules) as tmp:
        model_io.save_model(moe, None, tmp)
        processor = copy_processor_files(args.model, tmp, args.trust_remote_code)
        write_json_atomic(
            tmp / "upcycle.json",
            {
                "source": str(args.model),
                "num_experts": args.num_experts,
                "top_k": args.top_k,
                "layers": args.layers,
                "router_std": args.router_std,
                "seed": args.seed,
            },
        )
    from modistill.info import describe, format_info

    print(f"wrote {args.out}")
    print(format_info(describe(moe, processor)))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from modistill.info import describe, format_info
    from modistill.models.load import load_model

    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    info = describe(loaded.model, loaded.processor)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    from modistill.smoke import run_smoke

    run_smoke(args.out, seed=args.seed)
    return 0


def _add_upcycle(sub) -> None:
    p = sub.add_parser("upcycle", help="turn a dense model (Llava or causal LM) into a native transformers MoE")
    p.add_argument("--model", required=True, help="dense model directory (save_pretrained) or hub id")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", default="every-other", help="every-other (0,2,4,...), all, or indices like 0,2,5")
    p.add_argument("--router-std", type=float, default=0.02, help="std of the normal init of the new routers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_cmd_upcycle)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameter counts, experts, image tokens of a model")
    p.add_argument("model", help="model directory or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_cmd_info)


def _add_smoke(sub) -> None:
    p = sub.add_parser("smoke", help="tiny end-to-end check: build teacher+student, upcycle, save, reload, generate")
    p.add_argument("--out", default="runs/smoke")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_smoke)


def _cmd_train(args: argparse.Namespace) -> int:
    from modistill.stages import load_stage_config, run_stage

    cfg = load_stage_config(args.config, args.overrides)
    teacher = getattr(cfg, "teacher", None)
    if teacher is not None:  # a teacher of another tokenizer family: refuse before loading or writing
        from modistill.models.vocab import check_tokenizer_sources

        build = cfg.student.build
        student = cfg.student.path or (build.tokenizer or build.text.pretrained)
        check_tokenizer_sources(student, teacher.path, prepare_student=cfg.student.path is None)
    run_stage(cfg, fresh=args.fresh, resume_with_changes=args.resume_with_changes)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="run a training stage from a YAML config (align, sft, mimic_dense, mimic_sparse, preference)"
    )
    p.add_argument("config", help="stage YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.learning_rate=1e-5")
    p.add_argument("--fresh", action="store_true", help="discard this stage's previous run and start over")
    p.add_argument(
        "--resume-with-changes",
        action="store_true",
        help="resume from the last checkpoint although the config or data changed (e.g. a lower learning rate)",
    )
    p.set_defaults(func=_cmd_train)


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from modistill.stages.cache_teacher import load_cache_config, run_cache_teacher

    run_cache_teacher(load_cache_config(args.config, args.overrides), overwrite=args.overwrite)
    return 0


def _add_cache_teacher(sub) -> None:
    p = sub.add_parser("cache-teacher", help="run the teacher once and store its top-k log-probs per response token")
    p.add_argument("config", help="cache YAML (teacher, student, data, output_dir, top_k)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache directory")
    p.set_defaults(func=_cmd_cache_teacher)


def _add_data(sub) -> None:
    from modistill.data.check import add_check_arguments, run_check_command
    from modistill.scenes.build import add_scenes_arguments, run_scenes_command

    p = sub.add_parser("data", help="datasets: generate the scenes world, check a dataset")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_sub.required = True
    scenes = data_sub.add_parser(
        "scenes", help="generate the built-in scenes world (images, data, eval sets, tokenizer)"
    )
    add_scenes_arguments(scenes)
    scenes.set_defaults(func=run_scenes_command)
    check = data_sub.add_parser("check", help="validate a dataset before a long run")
    add_check_arguments(check)
    check.set_defaults(func=run_check_command)


def _add_eval(sub) -> None:
    from modistill.eval.cli import add_chat_arguments, add_eval_arguments, run_chat_command, run_eval_command

    p = sub.add_parser("eval", help="score a VLM on VQA / POPE / caption-hallucination files")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval_command)
    c = sub.add_parser("chat", help="answer one question about one image (greedy)")
    add_chat_arguments(c)
    c.set_defaults(func=run_chat_command)
    from modistill.eval.speculate_cli import add_speculate_arguments, run_speculate_command

    s = sub.add_parser("speculate", help="decode with a teacher and its distilled student as speculative drafter")
    add_speculate_arguments(s)
    s.set_defaults(func=run_speculate_command)


def _cmd_demo(args: argparse.Namespace) -> int:
    from modistill.demo.pipeline import run_demo
    from modistill.demo.seeds import run_seeds

    if args.seeds is not None:
        run_seeds(
            args.out,
            args.seeds,
            args.world_seed,
            quick=args.quick,
            fresh=args.fresh,
            progress=not args.no_progress,
            train_teacher=args.train_teacher,
        )
        return 0
    run_demo(
        args.out,
        seed=args.seed,
        world_seed=args.world_seed,
        quick=args.quick,
        fresh=args.fresh,
        progress=not args.no_progress,
        train_teacher=args.train_teacher,
    )
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole chain on the built-in scenes world, with a report (~10 min on 2 cores)")
    p.add_argument("--out", default="runs/demo", help="run directory (re-running resumes; finished stages are skipped)")
    p.add_argument("--seed", type=int, default=0, help="training seed (inits, data order, sampling)")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="run seeds 0..N-1 (OUT/seedK) and write OUT/summary.md: mean ± std and the demo's targets",
    )
    p.add_argument(
        "--world-seed",
        type=int,
        default=0,
        help="seed of the world itself (which kinds are popular and co-occur, the scenes, the split); "
        "the demo's figures are tuned on world 0's training scenes, so another world tests them fresh",
    )
    p.add_argument("--quick", action="store_true", help="a ~2 minute smoke run of the chain (not a result)")
    p.add_argument(
        "--train-teacher",
        action="store_true",
        help="train the vision tower and the teacher here (8,000 steps, ~25 min on 2 cores) instead of copying "
        "the shipped teacher; this is the command that built it (--quick always trains its small one)",
    )
    p.add_argument("--fresh", action="store_true", help="discard a previous run in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _cmd_ablate(args: argparse.Namespace) -> int:
    from modistill.demo.ablate import run_ablation

    run_ablation(
        args.out, seeds=args.seeds, quick=args.quick, docs=args.docs, progress=not args.no_progress, only=args.only
    )
    return 0


def _add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="the paper's claims at demo scale, mean ± std over seeds (~45 min for 3)")
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the demo's --quick sizes (a smoke run, not a result)")
    p.add_argument("--docs", default="docs", help="also write ablations.md/json/png here ('' to skip)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--only",
        choices=["paper", "onpolicy"],
        default="paper",
        help="paper: the paper's claims; onpolicy: on-policy distillation (λ = 0, 0.5, 1) and drafters",
    )
    p.set_defaults(func=_cmd_ablate)


# Sub-commands are registered by small functions so that each module keeps its own arguments.
REGISTRARS: list[Callable] = [
    _add_demo,
    _add_ablate,
    _add_upcycle,
    _add_info,
    _add_train,
    _add_cache_teacher,
    _add_data,
    _add_eval,
    _add_smoke,
]


def build_parser() -> argparse.ArgumentParser:
    from modistill import __version__

    parser = argparse.ArgumentParser(prog="modistill", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"modistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
