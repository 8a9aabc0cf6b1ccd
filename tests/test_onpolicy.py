"""On-policy mimic distillation: the student samples, the teacher scores, with images and an MoE student."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from conftest import vlm_spec
from modistill.data.conversations import load_conversations
from modistill.errors import UserError
from modistill.models.build import build_vlm
from modistill.models.load import load_model
from modistill.runtime.onpolicy import OnPolicySampler, RowsCollator, is_onpolicy
from modistill.stages import run_stage
from modistill.stages.mimic_sparse import SparseKDLoss, SparseMimicTrainer
from modistill.teacher.live import LiveTeacher
from modistill.upcycle import upcycle
from test_train_stages import _weights, stage_config


def test_onpolicy_decisions_are_seeded_and_follow_the_fraction():
    keys = [(step, micro) for step in range(200) for micro in range(2)]
    assert not any(is_onpolicy(0.0, 1, s, m) for s, m in keys)
    assert all(is_onpolicy(1.0, 1, s, m) for s, m in keys)
    half = [is_onpolicy(0.5, 1, s, m) for s, m in keys]
    assert half == [is_onpolicy(0.5, 1, s, m) for s, m in keys]  # the same decisions on a rerun (or resume)
    assert 0.4 < sum(half) / len(half) < 0.6
    assert half != [is_onpolicy(0.5, 2, s, m) for s, m in keys]  # another seed, other batches


@pytest.fixture(scope="module")
def own_teacher_dir(tmp_path_factory, scenes_world):
    """A teacher whose processor renders differently (patch 8: 4x the image tokens), so it gets its own rendering."""
    model, processor = build_vlm(vlm_spec(scenes_world, text_hidden=48, patch=8, seed=5))
    path = tmp_path_factory.mktemp("own_teacher")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(scenes_world, student_dir, own_teacher_dir, tmp_path_factory):
    student = load_model(student_dir)
    moe = upcycle(student.model, 4, 2, "every-other", seed=3)
    teacher = load_model(own_teacher_dir)
    data = load_conversations(
        [scenes_world / "train.json"], processor=student.processor, max_length=192, teacher_processor=teacher.processor
    )
    collator = RowsCollator(data.collator())
    assert collator.teacher is not None  # the teacher renders its own inputs
    sampler = OnPolicySampler(
        collator.student, collator.teacher, fraction=1.0, temperature=1.0, max_new_tokens=12, seed=0
    )
    batch = collator([data.dataset[i] for i in range(3)])
    return moe, student.processor, teacher.model, collator, sampler, batch, tmp_path_factory.mktemp("trainer")


def test_sampled_answers_become_the_labels_and_the_prompt_is_unchanged(setup):
    moe, processor, _, collator, sampler, batch, _ = setup
    sampled = sampler.sample(moe, batch, "k0")
    again = sampler.sample(moe, batch, "k0")
    assert sampled.texts == again.texts  # seeded by its key
    assert sampler.sample(moe, batch, "k1").texts != sampled.texts
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    new = sampled.batch
    for row, text in enumerate(sampled.texts):
        messages = batch["rows"][row]["messages"]
        prompt = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
        prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        n_prompt = len(collator.student.render_prompt(prompt, batch["rows"][row]["images"]))
        assert (
            tok.encode(prompt_text, add_special_tokens=False)[-2:]
            == batch["input_ids"][row].tolist()[n_prompt - 2 : n_prompt]
        )  # the prompt ends with the assistant header
        ids, labels = new["input_ids"][row].tolist(), new["labels"][row].tolist()
        # Prompt (image tokens included) exactly the dataset rendering's prompt; never supervised.
        assert ids[:n_prompt] == batch["input_ids"][row].tolist()[:n_prompt]
        assert all(label == -100 for label in labels[:n_prompt])
        assert prompt_text.count("<image>") == 1 and ids.count(processor.image_token_id) == batch["input_ids"][
            row
        ].tolist().count(processor.image_token_id)
        # Supervised: exactly the sampled tokens, up to and including the end-of-turn token if emitted.
        supervised = [t for t in labels if t != -100]
        assert supervised == sampled.new_ids[row] and 1 <= len(supervised) <= 12
        assert im_end not in supervised[:-1]
        assert labels[n_prompt : n_prompt + len(supervised)] == supervised == ids[n_prompt : n_prompt + len(supervised)]
        assert text == tok.decode(supervised, skip_special_tokens=True)
        # Padding masked.
        width = int(new["attention_mask"][row].sum())
        assert all(label == -100 for label in labels[width:])
        # The teacher renders the same answer with its own image expansion.
        teacher_supervised = [t for t in new["teacher_labels"][row].tolist() if t != -100]
        assert teacher_supervised == supervised
    assert torch.equal(new["pixel_values"], batch["pixel_values"])
    assert torch.equal(new["teacher_pixel_values"], batch["teacher_pixel_values"])
    assert new["teacher_input_ids"].shape[1] > new["input_ids"].shape[1]  # 4x the image tokens


def test_sampling_never_emits_an_image_token(setup):
    # An image token in an answer would have no features behind it: Llava refuses such a batch.
    moe, processor, _, _, sampler, _, _ = setup
    assert sampler._generation_kwargs(moe, 8)["suppress_tokens"] == [processor.image_token_id]


def _full_logits(model, batch, prefix=""):
    out = model(
        input_ids=batch[prefix + "input_ids"],
        attention_mask=batch[prefix + "attention_mask"],
        pixel_values=batch[prefix + "pixel_values"],
    )
    labels = batch[prefix + "labels"][:, 1:]
    mask = labels != -100
    return out.logits[:, :-1][mask].float(), labels[mask]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_onpolicy_loss_matches_an_independent_kl_and_reaches_experts_and_routers(setup, divergence):
    moe, processor, teacher, _, sampler, batch, out = setup
    loss_config = SparseKDLoss(divergence=divergence, ce_weight=0.5, onpolicy_fraction=1.0)
    trainer = SparseMimicTrainer(
        model=moe,
        args=TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[]),
        processing_class=processor,
        loss_config=loss_config,
        onpolicy=sampler,
        teacher=LiveTeacher(teacher, moe.get_output_embeddings().weight.shape[0]),
    )
    moe.train()
    moe.zero_grad()
    loss, _ = trainer.onpolicy_kd_loss(moe, batch, None, "k0")
    assert moe.training  # train mode restored after sampling
    sampled = sampler.sample(moe, batch, "k0").batch
    with torch.no_grad():
        student_logits, targets = _full_logits(moe, sampled)
        teacher_logits, teacher_targets = _full_logits(teacher, sampled, "teacher_")
        assert torch.equal(targets, teacher_targets)
        s, t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
        per_token = (
            F.kl_div(s, t, log_target=True, reduction="none")
            if divergence == "forward_kl"
            else F.kl_div(t, s, log_target=True, reduction="none")
        ).sum(-1)
        kd = per_token.sum() / len(targets)  # one micro-batch: the mean over sampled tokens
        original_logits, original_targets = _full_logits(moe, batch)
        ce = F.cross_entropy(original_logits, original_targets, reduction="sum") / len(original_targets)
    assert loss.item() == pytest.approx((kd + 0.5 * ce).item(), rel=1e-4)
    loss.backward()
    named = dict(moe.named_parameters())
    experts = [n for n in named if ".mlp.experts." in n]
    routers = [n for n in named if ".mlp.gate." in n]
    assert experts and routers
    assert all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in experts + routers)


def test_stage_1a_and_1b_train_on_policy_with_images(tmp_path, scenes_world, teacher_dir, student_dir):
    cfg = stage_config(
        "mimic_dense",
        tmp_path / "s1a",
        {"path": str(student_dir)},
        scenes_world,
        teacher=teacher_dir,
        loss={"kd_weight": 1.0, "ce_weight": 0.5, "onpolicy_fraction": 1.0, "onpolicy_max_new_tokens": 8},
    )
    assert run_stage(cfg)["steps"] == 2
    logs = [h for h in json.loads((tmp_path / "s1a" / "log_history.json").read_text()) if "loss" in h]
    assert all(h["onpolicy"] == 1.0 and h["kd"] > 0 and h["ce"] > 0 for h in logs)
    assert all(1 <= h["onpolicy/answer_tokens"] <= 8 for h in logs)  # at most onpolicy_max_new_tokens

    cfg = stage_config(
        "mimic_sparse",
        tmp_path / "s1b",
        {"path": str(tmp_path / "s1a")},
        scenes_world,
        teacher=teacher_dir,
        upcycle={"num_experts": 4, "top_k": 2, "seed": 3},
        loss={"onpolicy_fraction": 1.0, "onpolicy_max_new_tokens": 8},
        train={"max_steps": 2},
    )
    run_stage(cfg)
    logs = [h for h in json.loads((tmp_path / "s1b" / "log_history.json").read_text()) if "loss" in h]
    assert all(h["onpolicy"] == 1.0 and h["balance"] > 0 for h in logs)
    before = {
        n: p for n, p in upcycle(load_model(tmp_path / "s1a").model, 4, 2, "every-other", seed=3).named_parameters()
    }
    after = _weights(tmp_path / "s1b")
    for name in after:
        if ".mlp.experts." in name or ".mlp.gate." in name:
            assert not torch.equal(before[name], after[name]), name


def test_fraction_zero_gives_exactly_the_old_numbers(tmp_path, scenes_world, teacher_dir, student_dir):
    def run(out, loss):
        run_stage(
            stage_config(
                "mimic_dense",
                out,
                {"path": str(student_dir)},
                scenes_world,
                teacher=teacher_dir,
                loss={"kd_weight": 1.0, "ce_weight": 0.3, **loss},
            )
        )
        logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
        return [(h["loss"], h["kd"], h["ce"], h["grad_norm"]) for h in logs], _weights(out)

    logs_old, weights_old = run(tmp_path / "old", {})
    logs_zero, weights_zero = run(tmp_path / "zero", {"onpolicy_fraction": 0.0, "onpolicy_temperature": 0.7})
    assert logs_old == logs_zero
    assert all(torch.equal(weights_old[n], weights_zero[n]) for n in weights_old)


def test_onpolicy_with_a_teacher_cache_or_a_bad_fraction_is_a_user_error(tmp_path, scenes_world, student_dir):
    with pytest.raises(UserError, match="onpolicy_fraction"):
        stage_config(
            "mimic_dense",
            tmp_path / "c",
            {"path": str(student_dir)},
            scenes_world,
            teacher_cache=str(tmp_path),
            loss={"onpolicy_fraction": 0.5},
        )
    with pytest.raises(UserError, match="onpolicy_fraction"):
        stage_config(
            "mimic_dense",
            tmp_path / "c",
            {"path": str(student_dir)},
            scenes_world,
            teacher_cache=str(tmp_path),
            loss={"onpolicy_fraction": 1.5},
        )
