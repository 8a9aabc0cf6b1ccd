"""The paper's recipe (configs/llava-mod-2b, configs/llava-mod-0.5b): parse, check against the paper's
stage table (docs/method.md), and build each stage's student with the pretrained parts swapped for tiny saved ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from modistill.models.tiny import tiny_tokenizer
from modistill.moe import sparse_blocks
from modistill.runtime.groups import set_trainable
from modistill.runtime.student import load_student
from modistill.stages import load_stage_config
from modistill.stages.cache_teacher import load_cache_config
from modistill.upcycle import upcycle

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    """Stand-ins for Qwen/Qwen1.5-1.8B (a base LM: no image token, no chat template) and CLIP ViT-L/14-336."""
    root = tmp_path_factory.mktemp("parts")
    full = tiny_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=full.backend_tokenizer, eos_token="<|im_end|>")
    torch.manual_seed(0)
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    CLIPModel(
        CLIPConfig(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                image_size=32,
                patch_size=16,
            ),
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99
            ),
        )
    ).save_pretrained(root / "clip")
    return root


@pytest.mark.parametrize("variant", ["llava-mod-2b", "llava-mod-0.5b"])
def test_recipe_matches_the_method_table(variant):
    d = CONFIGS / variant
    s0, s1a = load_stage_config(d / "stage0_align.yaml"), load_stage_config(d / "stage1a_dense.yaml")
    s1b, s2 = load_stage_config(d / "stage1b_sparse.yaml"), load_stage_config(d / "stage2_preference.yaml")
    assert [c.stage for c in (s0, s1a, s1b, s2)] == ["align", "mimic_dense", "mimic_sparse", "preference"]
    assert [c.train.learning_rate for c in (s0, s1a, s1b, s2)] == [1e-3, 2e-5, 2e-5, 2e-6]
    for c in (s0, s1a, s1b, s2):
        assert c.train.num_train_epochs == 1 and c.train.lr_scheduler_type == "cosine"
        assert c.train.warmup_steps == 0.03 and c.train.weight_decay == 0.0 and c.train.bf16
        assert c.data.max_length == 2048
    assert s0.trainable == ["projector"]
    assert s0.student.build.vision.feature_layer == -2 and s0.student.build.vision.type == "clip"
    assert s1a.loss.kd_weight == 1.0 and s1a.loss.ce_weight == 0.0 and s1a.loss.divergence == "forward_kl"
    assert s1a.teacher.vocab == "truncate"
    up = s1b.upcycle
    assert (up.num_experts, up.top_k, up.layers) == (4, 2, "every-other")
    assert s1b.loss.ce_weight == 1.0 and s1b.loss.balance_coef == 0.01
    assert sorted(s1b.trainable) == ["dense_mlp", "experts", "projector", "routers"]
    assert s2.loss.preference == "kto_pair" and s2.loss.beta == 0.1 and s2.reference == "precompute"
    cache = load_cache_config(d / "cache_teacher.yaml")
    assert cache.top_k == 32 and load_stage_config(CONFIGS.parent / cache.stage).stage == "mimic_sparse"


@pytest.mark.parametrize("variant", ["llava-mod-2b", "llava-mod-0.5b"])
def test_recipe_builds_with_tiny_parts(variant, tiny_parts, tmp_path):
    d = CONFIGS / variant
    s0 = load_stage_config(
        d / "stage0_align.yaml",
        [
            f"student.build.vision.pretrained={tiny_parts / 'clip'}",
            f"student.build.text.pretrained={tiny_parts / 'llm'}",
        ],
    )
    student, processor = load_student(s0.student)
    assert student.config.vision_feature_layer == -2
    assert student.config.vision_feature_select_strategy == "default"  # CLIP: CLS dropped
    assert processor.tokenizer.chat_template is not None
    counts = set_trainable(student, s0.trainable)
    assert set(counts) == {"projector"}
    student.save_pretrained(tmp_path / "stage0")
    processor.save_pretrained(tmp_path / "stage0")

    s1a = load_stage_config(d / "stage1a_dense.yaml", [f"student.path={tmp_path / 'stage0'}"])
    dense, _ = load_student(s1a.student)
    counts = set_trainable(dense, s1a.trainable)
    assert "vision" not in counts and {"projector", "attention", "embeddings", "dense_mlp"} <= set(counts)

    s1b = load_stage_config(d / "stage1b_sparse.yaml", [f"student.path={tmp_path / 'stage0'}"])
    moe = upcycle(load_student(s1b.student)[0], s1b.upcycle.num_experts, s1b.upcycle.top_k, s1b.upcycle.layers)
    assert moe.config.text_config.model_type == "qwen2_moe"
    assert sorted(sparse_blocks(moe)) == [0, 2]
    counts = set_trainable(moe, s1b.trainable)
    assert set(counts) == {"projector", "dense_mlp", "experts", "routers"}
    frozen = {n for n, p in moe.named_parameters() if not p.requires_grad}
    assert any("self_attn" in n for n in frozen) and any("embed_tokens" in n for n in frozen)
