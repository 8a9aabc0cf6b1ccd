"""Building LLaVA-style VLMs from config objects, and assembling them from pretrained parts."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from helpers import vlm_batch
from modistill.errors import UserError
from modistill.models.build import build_vlm
from modistill.models.chat import CHATML_TEMPLATE
from modistill.models.load import load_model
from modistill.models.processor import image_token_id, prepare_tokenizer
from modistill.models.spec import ModelSpec, TextSpec, VisionSpec
from modistill.models.tiny import tiny_spec, tiny_tokenizer


@pytest.mark.parametrize("text_type", ["qwen3", "qwen2", "llama", "mistral", "qwen3_moe", "qwen2_moe", "mixtral"])
@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_build_forward_and_image_token_count(tok_dir, text_type, vision):
    model, processor = build_vlm(tiny_spec(tok_dir, text_type=text_type, vision_type=vision))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.model_type == text_type
    batch = vlm_batch(processor, n=2)
    n_image = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
    # 32 px / patch 16 -> 4 patches; CLIP's CLS token is dropped by the "default" strategy.
    assert n_image.tolist() == [4, 4] == [model.config.image_seq_length] * 2
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert out.logits.shape[-1] == len(processor.tokenizer)


def test_save_reload_is_bit_exact(tiny_vlm_dir):
    loaded = load_model(tiny_vlm_dir)
    assert loaded.is_vlm
    again = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir)
    batch = vlm_batch(AutoProcessor.from_pretrained(tiny_vlm_dir))
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, again(**batch).logits)
    assert loaded.model.generation_config.eos_token_id == loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")


def _bare_tokenizer(tmp_path):
    """A base-model tokenizer: no image token, no chat template, no pad (like Qwen2-0.5B's)."""
    full = tiny_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=full.backend_tokenizer, eos_token="<|im_end|>")
    tok.chat_template = None
    return tok


def test_prepare_tokenizer_adds_what_a_vlm_needs(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.add_tokens(["a", "b"])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    size = len(tok)
    prepare_tokenizer(tok)
    assert len(tok) == size + 4  # <image>, <|im_start|>, <|im_end|>, <|pad|>
    assert tok.chat_template == CHATML_TEMPLATE and tok.pad_token == "<|pad|>"
    assert tok.convert_ids_to_tokens(image_token_id(tok)) == "<image>"


def test_assemble_from_pretrained_llm_and_vision_dirs(tmp_path):
    """The path a user with Qwen/Qwen2-0.5B and a SigLIP/CLIP checkpoint takes, on tiny saved dirs."""
    llm_dir, vis_dir = tmp_path / "llm", tmp_path / "vision"
    torch.manual_seed(1)
    tok = _bare_tokenizer(tmp_path)
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=16,
            ),
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99
            ),
        )
    )
    clip.save_pretrained(vis_dir)

    spec = ModelSpec(
        vision=VisionSpec(type="clip", pretrained=str(vis_dir), feature_layer=-2),
        text=TextSpec(pretrained=str(llm_dir)),
    )
    model, processor = build_vlm(spec)
    lm = model.model.language_model
    # Pretrained weights arrived; new tokens got embedding rows; ties kept.
    assert torch.equal(lm.layers[0].self_attn.q_proj.weight, llm.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(
        model.model.vision_tower.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight
    )
    assert lm.embed_tokens.num_embeddings == len(processor.tokenizer) > len(tok)
    assert torch.equal(lm.embed_tokens.weight[: len(tok)], llm.model.embed_tokens.weight)
    assert model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert not any(p.is_meta for p in model.parameters())
    batch = vlm_batch(processor)
    model(**batch)
    out = tmp_path / "vlm"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    reloaded = load_model(out)
    with torch.no_grad():
        assert torch.allclose(reloaded.model(**batch).logits, model(**batch).logits)


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer is required"):
        ModelSpec(text=TextSpec())
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        build_vlm(ModelSpec(tokenizer=str(tmp_path / "none")))


def test_vision_tower_size_mismatch_is_refused(tmp_path, tok_dir):
    vis_dir = tmp_path / "vision"
    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=16,
        )
    ).save_pretrained(vis_dir)
    from transformers import SiglipImageProcessorPil

    SiglipImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(vis_dir)
    spec = tiny_spec(tok_dir)
    spec.vision = VisionSpec(type="siglip", pretrained=str(vis_dir))
    with pytest.raises(UserError, match="expects 32 px"):
        build_vlm(spec)
