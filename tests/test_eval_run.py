"""End to end: a tiny scenes world + a tiny random VLM with the world's tokenizer -> evaluate, CLI, generation."""

import argparse
import json

import pytest
import torch

from modistill.eval.cli import add_chat_arguments, add_eval_arguments, run_chat_command, run_eval_command
from modistill.eval.efficiency import _vmhwm_peak, measure_efficiency, peak_memory
from modistill.eval.generate import generate_answers
from modistill.eval.run import evaluate, load_eval_file
from modistill.info import parameter_counts
from modistill.models.build import build_vlm
from modistill.models.load import load_model
from modistill.models.spec import ModelSpec, TextSpec, VisionSpec
from modistill.scenes.build import build_world
from modistill.scenes.world import WorldConfig

POPE_KEYS = {"n", "accuracy", "precision", "recall", "f1", "yes_ratio", "unparseable"}
CAPTION_KEYS = {"n", "response_hallucination", "mention_hallucination", "coverage", "unparseable"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalworld") / "world"
    build_world(out, WorldConfig(), n_train=20, n_test=10, seed=3, progress=False)
    return out


@pytest.fixture(scope="module")
def vlm_dir(world, tmp_path_factory):
    spec = ModelSpec(
        vision=VisionSpec(
            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, image_size=48, patch_size=16
        ),
        text=TextSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64),
        tokenizer=str(world / "tokenizer"),
    )
    model, processor = build_vlm(spec)
    path = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(vlm_dir):
    return load_model(vlm_dir)


def _files(world):
    return {k: world / "eval" / f"{k}.jsonl" for k in ("vqa", "pope", "captions")}


@pytest.mark.slow
def test_evaluate_all_three_kinds_returns_every_metric(world, loaded, tmp_path):
    out = tmp_path / "res.json"
    res = evaluate(
        loaded,
        list(_files(world).values()),
        out,
        batch_size=8,
        max_new_tokens=6,
        caption_samples=2,
        limit=24,
        efficiency=True,
        progress=False,
    )
    assert {f["kind"] for f in res["files"].values()} == {"vqa", "pope", "captions"}
    assert set(res["metrics"]) == {"vqa", "pope", "captions"}  # unnamed files are named by kind
    vqa = res["metrics"]["vqa"]
    assert vqa["matcher"] == "scenes" and 0 <= vqa["accuracy"] <= 1 and vqa["per_type"]
    assert sum(v["n"] for v in vqa["per_type"].values()) == vqa["n"] == res["files"]["vqa"]["n"]
    pope = res["metrics"]["pope"]
    assert POPE_KEYS <= set(pope["overall"]) and POPE_KEYS <= set(pope["official"])
    assert set(pope["splits"]) == {"random", "popular", "adversarial"}
    cap = res["metrics"]["captions"]
    assert CAPTION_KEYS <= set(cap["greedy"]) and CAPTION_KEYS <= set(cap["sampled"])
    n_images = res["files"]["captions"]["n"]
    assert cap["greedy"]["n"] == n_images and cap["sampled"]["n"] == 2 * n_images
    assert cap["sampled"]["samples_per_image"] == 2 and cap["sampled"]["temperature"] == 1.0
    # per-item predictions, aligned with the rows
    for name, meta in res["files"].items():
        assert len(res["predictions"][name]) == meta["n"]
    rows = [json.loads(line) for line in (world / "eval" / "vqa.jsonl").read_text().splitlines()][:24]
    assert [p["question_id"] for p in res["predictions"]["vqa"]] == [r["question_id"] for r in rows]
    assert all(len(p["samples"]) == 2 for p in res["predictions"]["captions"])
    # efficiency
    eff = res["efficiency"]
    assert eff["parameters"] == parameter_counts(loaded.model)
    for key in ("batch1", "batched"):
        assert eff[key]["decode_tokens_per_s"] > 0 and eff[key]["generate_tokens_per_s"] > 0
    assert eff["batched"]["batch_size"] == 8 and eff["peak_memory"]["delta_bytes"] >= 0
    # the written file is strict JSON (NaN -> null) with the same content
    written = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert written["metrics"]["pope"]["overall"]["n"] == pope["overall"]["n"]
    assert written["predictions"]["captions"][0]["prediction"] == res["predictions"]["captions"][0]["prediction"]


def test_a_limit_per_named_file_cuts_those_files_and_leaves_the_others_whole(world, loaded):
    # The demo's evaluation: the first questions of VQA and POPE, captions of every test image.
    res = evaluate(loaded, _files(world), batch_size=16, max_new_tokens=2, limit={"vqa": 3, "pope": 4}, progress=False)
    n_captions = len((world / "eval" / "captions.jsonl").read_text().splitlines())
    assert {k: v["n"] for k, v in res["files"].items()} == {"vqa": 3, "pope": 4, "captions": n_captions}
    assert n_captions > 4 and res["metrics"]["captions"]["greedy"]["n"] == n_captions
    assert res["settings"]["limit"] == {"vqa": 3, "pope": 4}


@pytest.mark.slow
def test_left_padded_batches_generate_what_single_prompts_do(world, loaded):
    es = load_eval_file(world / "eval" / "vqa.jsonl", limit=12)
    items = [{"image": r["image"], "text": r["text"]} for r in es.rows]
    tok = loaded.processor.tokenizer
    lengths = {len(tok(r["text"])["input_ids"]) for r in es.rows}
    assert len(lengths) > 1  # the batch really is padded
    side = tok.padding_side
    batched = generate_answers(
        loaded.model, loaded.processor, items, batch_size=12, max_new_tokens=8, image_root=es.image_root, progress=False
    )
    single = generate_answers(
        loaded.model, loaded.processor, items, batch_size=1, max_new_tokens=8, image_root=es.image_root, progress=False
    )
    assert batched == single
    assert any(batched) and tok.padding_side == side  # padding side restored


def test_sampling_shapes_and_seed(world, loaded):
    es = load_eval_file(world / "eval" / "captions.jsonl", limit=3)
    items = [{"image": r["image"], "text": r["text"]} for r in es.rows]
    kw = dict(batch_size=2, max_new_tokens=6, do_sample=True, num_samples=3, image_root=es.image_root, progress=False)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = generate_answers(loaded.model, loaded.processor, items, seed=1, **kw)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    b = generate_answers(loaded.model, loaded.processor, items, seed=1, **kw)
    c = generate_answers(loaded.model, loaded.processor, items, seed=2, **kw)
    assert len(a) == 3 and all(len(s) == 3 for s in a)
    assert a == b and a != c


def test_eval_and_chat_commands(world, vlm_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "sub" / "results.json"
    files = _files(world)
    args = parser.parse_args(
        [
            "--model",
            str(vlm_dir),
            "--data",
            str(files["pope"]),
            "--data",
            str(files["captions"]),
            "--out",
            str(out),
            "--limit",
            "6",
            "--max-new-tokens",
            "4",
            "--no-progress",
        ]
    )
    assert run_eval_command(args) == 0
    printed = capsys.readouterr().out
    assert "pope" in printed and "F1" in printed and "response" in printed and f"wrote {out}" in printed
    res = json.loads(out.read_text())
    assert set(res["metrics"]) == {"pope", "captions"} and res["files"]["pope"]["n"] == 6

    chat = argparse.ArgumentParser()
    add_chat_arguments(chat)
    image = world / json.loads(files["vqa"].read_text().splitlines()[0])["image"]
    args = chat.parse_args(
        ["--model", str(vlm_dir), "--image", str(image), "--max-new-tokens", "5", "How many objects are there?"]
    )
    assert run_chat_command(args) == 0
    answer = capsys.readouterr().out.strip()
    loaded = load_model(vlm_dir)
    expected = generate_answers(
        loaded.model,
        loaded.processor,
        [{"image": str(image), "text": "How many objects are there?"}],
        max_new_tokens=5,
        progress=False,
    )
    assert answer == expected[0]


def test_peak_memory_sees_a_known_allocation():
    size = 64 * 2**20  # 64 MiB of float32, touched

    def alloc():
        x = torch.ones(size // 4)
        del x

    m = peak_memory(alloc, torch.device("cpu"))
    assert 0.8 * size <= m["delta_bytes"] <= 3 * size, m


def test_vmhwm_fallback_sees_a_known_allocation():
    try:
        before, peak = _vmhwm_peak(lambda: torch.ones(16 * 2**20).sum())  # 64 MiB
    except OSError:
        pytest.skip("no resettable VmHWM here")
    assert 0.8 * 64 * 2**20 <= peak - before <= 3 * 64 * 2**20


def test_measure_efficiency_counts_exactly_the_new_tokens(loaded):
    eff = measure_efficiency(loaded.model, loaded.processor, new_tokens=5, batch_size=3, repeats=1, memory=False)
    assert eff["new_tokens"] == 5 and eff["batched"]["batch_size"] == 3 and "peak_memory" not in eff
    b = eff["batched"]
    assert b["generate_tokens_per_s"] == pytest.approx(3 * 5 / b["seconds"])
    assert b["decode_tokens_per_s"] > 0 and eff["weights_bytes"] == 4 * parameter_counts(loaded.model)["total"]
