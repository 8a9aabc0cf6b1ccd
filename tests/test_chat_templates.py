"""Real LLMs' chat templates take multimodal messages, and every prompt path gives the same tokens.

The templates in tests/fixtures/chat_templates are the published ones (SmolLM2-135M-Instruct as read
from its GGUF, Qwen2-Instruct, Qwen2.5-Instruct, Llama-3-Instruct). Each is given to the tiny local
tokenizer: the tokens differ from the real models', but the template logic is exactly theirs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from modistill.data.render import IGNORE_INDEX, Renderer
from modistill.eval.generate import encode_batch, render_prompt
from modistill.models.chat import CONTENT_PARTS_MARK, accept_content_parts
from modistill.models.processor import build_image_processor, build_processor, prepare_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
NAMES = ["smollm2_135m_instruct", "qwen2_instruct", "qwen2_5_instruct", "llama3_instruct"]
# Tokens a real Llama-3 tokenizer has as specials; it also adds BOS on encode (templates write it too).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QUESTION = "What is shown in this picture?"


def base_template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def tokenizer_with(tok_dir, name: str):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if name.startswith("llama3"):
        tok.add_special_tokens(
            {"bos_token": "<|begin_of_text|>", "extra_special_tokens": LLAMA3_SPECIALS[1:]},
            replace_extra_special_tokens=False,
        )
        tok.add_bos_token = True
    tok.chat_template = base_template(name)
    return tok


def processor_with(tok_dir, name: str):
    tok = prepare_tokenizer(tokenizer_with(tok_dir, name))
    return build_processor(tok, build_image_processor("siglip", 32), "siglip", 16)


class _OnCpu(torch.nn.Linear):
    """Just what encode_batch reads from a model: a parameter dtype and a device."""

    device = torch.device("cpu")


@pytest.mark.parametrize("name", NAMES)
def test_base_template_rejects_content_lists_and_the_wrapped_one_takes_them(name, tok_dir):
    base = tokenizer_with(tok_dir, name)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    try:  # a TypeError (string + list), or Llama-3's `| trim` writing the list's Python repr
        broken = base.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    except TypeError:
        broken = None
    assert broken is None or "{'type': 'image'}" in broken
    processor = processor_with(tok_dir, name)
    as_string = [{"role": "user", "content": "<image>" + QUESTION}]
    wrapped = processor.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    assert wrapped == processor.tokenizer.apply_chat_template(as_string, tokenize=False, add_generation_prompt=True)
    # Roles, default system prompt, BOS and end-of-turn tokens: byte for byte the base template's.
    assert wrapped == base.apply_chat_template(as_string, tokenize=False, add_generation_prompt=True)
    assert wrapped.count("<image>") == 1 and QUESTION in wrapped


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn_system_and_parts_render_as_the_base_template(name, tok_dir):
    base = tokenizer_with(tok_dir, name)
    processor = processor_with(tok_dir, name)
    strings = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "<image>\nHow many?"},
        {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "And <image> here?"},
    ]
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nHow many?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And "}, {"type": "image"}, {"type": "text", "text": " here?"}],
        },
    ]
    expected = base.apply_chat_template(strings, tokenize=False, add_generation_prompt=True)
    assert processor.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == expected


@pytest.mark.parametrize("name", NAMES)
def test_training_eval_and_user_prompts_are_token_identical(name, tok_dir):
    processor = processor_with(tok_dir, name)
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    # 1. Training: the prompt tokens are those before the first supervised (answer) token.
    sample = {
        "messages": [
            {"role": "user", "content": "<image>" + QUESTION},
            {"role": "assistant", "content": "A red square."},
        ],
        "images": ["unused.png"],
    }
    rendered = Renderer(processor).render_conversation(sample)
    first_answer = next(i for i, label in enumerate(rendered.labels) if label != IGNORE_INDEX)
    training = rendered.input_ids[:first_answer]
    # 2. `modistill chat` / `modistill eval`: render_prompt + encode_batch.
    evaluation = encode_batch(processor, [image], [render_prompt(processor, QUESTION)], _OnCpu(1, 1))
    # 3. A user (lmms-eval llava_hf, VLMEvalKit, llava-hf scripts): apply_chat_template with the image in it.
    user = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert evaluation["input_ids"][0].tolist() == training
    assert user["input_ids"][0].tolist() == training
    assert torch.equal(user["pixel_values"], evaluation["pixel_values"])
    if name.startswith("llama3"):  # exactly one BOS although this tokenizer adds one on plain encode
        bos = processor.tokenizer.bos_token_id
        assert processor.tokenizer("x")["input_ids"][0] == bos and training.count(bos) == 1


def test_wrapping_is_idempotent_keeps_other_keys_and_leading_whitespace(tok_dir):
    qwen25 = base_template("qwen2_5_instruct")
    once = accept_content_parts(qwen25)
    assert once.startswith(CONTENT_PARTS_MARK) and accept_content_parts(once) == once
    named = accept_content_parts({"default": qwen25, "tool_use": qwen25})
    assert named == {"default": once, "tool_use": once}
    tok = AutoTokenizer.from_pretrained(tok_dir)
    # An assistant turn with tool calls and no content keeps its tool_calls through the flattening.
    call = {"function": {"name": "count", "arguments": {"shape": "circle"}}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Count."}]},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    strings = [{"role": "user", "content": "Count."}, messages[1]]
    text = tok.apply_chat_template(messages, chat_template=once, tokenize=False)
    assert text == tok.apply_chat_template(strings, chat_template=qwen25, tokenize=False) and '"count"' in text
    # trim_blocks must not eat a newline the base template starts with.
    leading = "\n{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = tok.apply_chat_template(parts, chat_template=accept_content_parts(leading), tokenize=False)
    assert text == "\n[<image>hi]"
