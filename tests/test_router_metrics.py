"""Router metrics: entropy, dead experts, top-k drift since upcycling — on hand-made logits and in training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import vlm_batch
from modistill.models.load import load_model
from modistill.moe import RouterLogitsCollector
from modistill.router_metrics import (
    ROUTERS_FILE,
    RouterMonitor,
    dead_expert_share,
    load_routers,
    router_entropy,
    token_entropy,
    topk_changed,
)
from modistill.stages import run_stage
from modistill.upcycle import upcycle
from test_train_stages import stage_config


def test_entropy_on_hand_made_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -1e9, -1e9]])
    ent = token_entropy(logits)
    # uniform over 4: log 4; one-hot: 0; (3/4, 1/4): -(3/4 log 3/4 + 1/4 log 1/4).
    assert ent.tolist() == pytest.approx([math.log(4), 0.0, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))], abs=1e-5)
    assert router_entropy(logits) == pytest.approx(float(ent.mean()), abs=1e-6)
    assert router_entropy(logits, torch.tensor([1, 1, 0])) == pytest.approx(math.log(4) / 2, abs=1e-5)


def test_dead_experts_are_those_under_one_percent():
    share = torch.tensor([[0.5, 0.495, 0.005, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert dead_expert_share(share).tolist() == [0.5, 0.0]


def test_topk_changed_compares_sets_not_order():
    now = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    before = torch.tensor([[2.0, 3.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 5.0]])
    assert topk_changed(now, before, 2).tolist() == [False, True, False]
    assert topk_changed(now, before, 1).tolist() == [True, True, True]


def test_monitor_on_an_upcycled_model(student_dir):
    loaded = load_model(student_dir)
    moe = upcycle(loaded.model, 4, 2, "every-other", seed=0)
    monitor, collector = RouterMonitor(moe), RouterLogitsCollector(moe)
    batch = vlm_batch(loaded.processor, n=2, size=48)
    with torch.no_grad():
        moe(**batch)
    logits = collector.pop()
    monitor.observe(logits, batch["attention_mask"])
    logs = monitor.logs()
    assert logs["router/topk_changed"] == 0.0  # nothing changed yet
    assert logs["router/L0/entropy"] == pytest.approx(router_entropy(logits[0], batch["attention_mask"]), rel=1e-5)
    # Reverse the router: the top-2 of 4 becomes the bottom-2, a different set for every token.
    with torch.no_grad():
        moe.model.language_model.layers[0].mlp.gate.weight.neg_()
        moe(**batch)
    monitor.observe(collector.pop(), batch["attention_mask"])
    assert monitor.logs()["router/L0/topk_changed"] == 1.0


def test_stage_1b_logs_router_metrics_and_stage_2_compares_with_upcycling(
    tmp_path, scenes_world, teacher_dir, student_dir
):
    cfg = stage_config(
        "mimic_sparse",
        tmp_path / "s1b",
        {"path": str(student_dir)},
        scenes_world,
        teacher=teacher_dir,
        upcycle={"num_experts": 4, "top_k": 2, "seed": 3},
    )
    run_stage(cfg)
    logs = [h for h in json.loads((tmp_path / "s1b" / "log_history.json").read_text()) if "loss" in h]
    for key in ("router/L0/entropy", "router/L0/dead_experts", "router/L0/topk_changed", "router/entropy"):
        assert all(key in h for h in logs), key
    assert 0 < logs[0]["router/L0/entropy"] <= math.log(4) + 1e-6
    assert logs[0]["router/L0/topk_changed"] == 0.0  # the first step routes as upcycled
    saved = load_routers(tmp_path / "s1b" / ROUTERS_FILE)
    initial = upcycle(load_model(student_dir).model, 4, 2, "every-other", seed=3)
    assert torch.equal(saved[0], initial.model.language_model.layers[0].mlp.gate.weight.detach())
    cfg = stage_config(
        "preference",
        tmp_path / "s2",
        {"path": str(tmp_path / "s1b")},
        scenes_world,
        teacher=teacher_dir,
        loss={"beta": 0.1},
    )
    run_stage(cfg)
    logs2 = [h for h in json.loads((tmp_path / "s2" / "log_history.json").read_text()) if "loss" in h]
    # Compared with the routers at upcycling, stage 2 starts where stage 1b's drift ended (not at 0).
    assert all("router/topk_changed" in h for h in logs2)
    assert logs2[0]["router/L0/topk_changed"] > 0
