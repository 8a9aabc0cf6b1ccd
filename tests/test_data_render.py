"""Rendering: label masks, image-token expansion (vs LlavaProcessor's own), truncation, templates."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor, AutoTokenizer, LlavaProcessor

from helpers import red_image
from modistill.data.render import IGNORE_INDEX, Renderer, TemplateError
from modistill.data.validate import (
    ALL_MASKED,
    IMAGE_TAG_MISMATCH,
    IMAGE_TRUNCATED,
    NO_ASSISTANT,
    NO_VISION,
    TEMPLATE_REJECTS,
    SampleProblem,
)
from modistill.models.build import build_vlm
from modistill.models.processor import build_image_processor, build_processor
from modistill.models.tiny import tiny_spec


@pytest.fixture(scope="module")
def siglip_proc(tiny_vlm_dir):
    return AutoProcessor.from_pretrained(tiny_vlm_dir)


@pytest.fixture(scope="module")
def clip_proc(tok_dir):
    return build_vlm(tiny_spec(tok_dir, vision_type="clip"))[1]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def supervised_runs(sample):
    """Contiguous runs of supervised tokens (labels equal the input ids there)."""
    runs, cur = [], []
    for tok, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def decoded_runs(tokenizer, sample):
    return [tokenizer.decode(run) for run in supervised_runs(sample)]


def test_single_turn_with_image_supervises_answer_and_end_of_turn(siglip_proc):
    r = Renderer(siglip_proc)
    s = r.render_messages([user("<image>\nwhat colour is it?"), bot("a red square.")], ["x.png"])
    tok = siglip_proc.tokenizer
    assert decoded_runs(tok, s) == ["a red square.<|im_end|>"]
    # Everything before the answer is the prompt, ending with the role header (not supervised).
    first = s.labels.index(next(lab for lab in s.labels if lab != IGNORE_INDEX))
    assert tok.decode(s.input_ids[:first]).endswith("<|im_start|>assistant\n")
    # The trailing newline after <|im_end|> is not supervised.
    assert s.labels[-1] == IGNORE_INDEX and tok.decode(s.input_ids[-1:]) == "\n"
    n_answer = len(tok.encode("a red square.", add_special_tokens=False)) + 1
    assert s.num_response_tokens == n_answer


def test_multi_turn_text_only_supervises_every_answer(siglip_proc):
    r = Renderer(siglip_proc)
    msgs = [
        user("is there a circle?"),
        bot("yes."),
        user("how many objects are there?"),
        bot("2"),
        user("what colour?"),
        bot("blue"),
    ]
    s = r.render_messages(msgs, [])
    assert decoded_runs(siglip_proc.tokenizer, s) == ["yes.<|im_end|>", "2<|im_end|>", "blue<|im_end|>"]
    assert s.num_image_tokens == 0 and siglip_proc.image_token_id not in s.input_ids


def test_system_turn_and_preference_supervise_only_the_continuation(siglip_proc):
    r = Renderer(siglip_proc)
    pair = {
        "prompt": [
            {"role": "system", "content": "be brief."},
            user("<image>describe."),
            bot("a square."),
            user("and?"),
        ],
        "chosen": [bot("a red one.")],
        "rejected": [bot("a green circle.")],
        "images": ["x.png"],
    }
    chosen, rejected = r.render_preference(pair)
    assert decoded_runs(siglip_proc.tokenizer, chosen) == ["a red one.<|im_end|>"]
    assert decoded_runs(siglip_proc.tokenizer, rejected) == ["a green circle.<|im_end|>"]
    # Same prompt tokens up to the answers.
    start = len(chosen.input_ids) - chosen.num_response_tokens - 1
    assert chosen.input_ids[:start] == rejected.input_ids[:start]


@pytest.mark.parametrize("which", ["siglip", "clip", "clip_full", "patch8"])
def test_rendering_equals_llava_processor_expansion(which, siglip_proc, clip_proc, tok_dir):
    """Our ids for a chat with images are exactly what LlavaProcessor gives for the same text."""
    if which == "siglip":
        proc = siglip_proc
    elif which == "clip":
        proc = clip_proc
    elif which == "clip_full":  # keep CLS: one more token per image
        proc = LlavaProcessor(
            image_processor=clip_proc.image_processor,
            tokenizer=clip_proc.tokenizer,
            patch_size=16,
            vision_feature_select_strategy="full",
            num_additional_image_tokens=1,
        )
    else:
        proc = build_processor(AutoTokenizer.from_pretrained(tok_dir), build_image_processor("siglip", 32), "siglip", 8)
    msgs = [user("<image>\nwhat colour?"), bot("red."), user("and this one <image>?"), bot("red too.")]
    r = Renderer(proc)
    ours = r.render_messages(msgs, ["a.png", "b.png"])
    text = proc.tokenizer.apply_chat_template(msgs, tokenize=False)
    theirs = proc(text=[text], images=[red_image(), red_image(48)], return_tensors="pt")["input_ids"][0].tolist()
    assert ours.input_ids == theirs
    expected = {"siglip": 4, "clip": 4, "clip_full": 5, "patch8": 16}[which]
    assert r.tokens_per_image == expected
    assert theirs.count(proc.image_token_id) == 2 * expected == ours.num_image_tokens


def test_tag_count_must_match_images(siglip_proc):
    r = Renderer(siglip_proc)
    with pytest.raises(SampleProblem) as err:
        r.render_messages([user("<image><image> two?"), bot("no.")], ["x.png"])
    assert err.value.reason == IMAGE_TAG_MISMATCH
    with pytest.raises(SampleProblem) as err:
        r.render_messages([user("no tag"), bot("no.")], ["x.png"])
    assert err.value.reason == IMAGE_TAG_MISMATCH


def test_conversation_must_end_with_an_answer(siglip_proc):
    with pytest.raises(SampleProblem) as err:
        Renderer(siglip_proc).render_messages([user("hi"), bot("yes."), user("and?")], [])
    assert err.value.reason == NO_ASSISTANT


# ---------------------------------------------------------------- truncation


def _image_late(n_words=12):
    long_question = " ".join(["describe the image."] * n_words)
    return [user(long_question), bot("yes."), user("<image> what colour?"), bot("red.")]


def test_truncation_through_image_tokens_is_a_problem(siglip_proc):
    full = Renderer(siglip_proc).render_messages(_image_late(), ["x.png"])
    image_pos = [i for i, t in enumerate(full.input_ids) if t == siglip_proc.image_token_id]
    with pytest.raises(SampleProblem) as err:  # cut in the middle of the 4 image tokens
        Renderer(siglip_proc, max_length=image_pos[1] + 1).render_messages(_image_late(), ["x.png"])
    assert err.value.reason == IMAGE_TRUNCATED
    with pytest.raises(SampleProblem) as err:  # cut before the image: the image would be dropped entirely
        Renderer(siglip_proc, max_length=image_pos[0] - 1).render_messages(_image_late(), ["x.png"])
    assert err.value.reason == IMAGE_TRUNCATED


def test_long_answer_truncated_keeps_the_labels_that_fit(siglip_proc):
    answer = " ".join(["there are two objects: one small yellow circle, one large red square."] * 6)
    msgs = [user("<image>\ndescribe the image."), bot(answer)]
    full = Renderer(siglip_proc).render_messages(msgs, ["x.png"])
    first_label = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    limit = first_label + 5
    cut = Renderer(siglip_proc, max_length=limit).render_messages(msgs, ["x.png"])
    assert cut.truncated and len(cut.input_ids) == limit
    assert cut.input_ids == full.input_ids[:limit] and cut.labels == full.labels[:limit]
    assert cut.num_response_tokens == 5 and cut.input_ids.count(siglip_proc.image_token_id) == 4


def test_truncation_leaving_no_answer_token_is_a_problem(siglip_proc):
    msgs = [user("<image>\n" + "describe the image. " * 10), bot("red.")]
    full = Renderer(siglip_proc).render_messages(msgs, ["x.png"])
    first_label = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    with pytest.raises(SampleProblem) as err:
        Renderer(siglip_proc, max_length=first_label).render_messages(msgs, ["x.png"])
    assert err.value.reason == ALL_MASKED
    # One more token keeps exactly the first answer token.
    assert Renderer(siglip_proc, max_length=first_label + 1).render_messages(msgs, ["x.png"]).num_response_tokens == 1


# ---------------------------------------------------------------- other templates


def _tokenizer(tok_dir, template):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = template
    return tok


QWEN2_STYLE = (  # injects a default system turn, as Qwen2's template does; no generation markers
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRIMMING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REWRITES_ASSISTANT = (  # the generation prompt says "assistant", the rendered turn says "bot"
    "{% for m in messages %}<|im_start|>{% if m['role'] == 'assistant' %}bot{% else %}{{ m['role'] }}{% endif %}"
    "\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STRICT_ALTERNATION = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_qwen2_style_template_with_default_system_prompt(tok_dir):
    tok = _tokenizer(tok_dir, QWEN2_STYLE)
    s = Renderer(tok).render_messages([user("is it red?"), bot("yes."), user("blue?"), bot("no.")], [])
    assert tok.decode(s.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert decoded_runs(tok, s) == ["yes.<|im_end|>", "no.<|im_end|>"]


def test_trimming_template(tok_dir):
    tok = _tokenizer(tok_dir, TRIMMING)
    s = Renderer(tok).render_messages([user(" hi "), bot("  red. \n")], [])
    assert decoded_runs(tok, s) == ["red.<|im_end|>"]


def test_template_breaking_the_prefix_property_is_a_clear_error(tok_dir):
    tok = _tokenizer(tok_dir, REWRITES_ASSISTANT)
    with pytest.raises(TemplateError, match="prefix property"):
        Renderer(tok).render_messages([user("hi"), bot("yes.")], [])


def test_template_exception_is_a_sample_problem(tok_dir):
    tok = _tokenizer(tok_dir, STRICT_ALTERNATION)
    assert decoded_runs(tok, Renderer(tok).render_messages([user("a"), bot("b")], [])) == ["b<|im_end|>"]
    with pytest.raises(SampleProblem) as err:
        Renderer(tok).render_messages([user("a"), user("b"), bot("c")], [])
    assert err.value.reason == TEMPLATE_REJECTS and "alternate" in err.value.detail


def test_text_only_model_refuses_images(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    r = Renderer(tok)
    assert decoded_runs(tok, r.render_messages([user("hi"), bot("yes.")], [])) == ["yes.<|im_end|>"]
    with pytest.raises(SampleProblem) as err:
        r.render_messages([user("<image>hi"), bot("yes.")], ["x.png"])
    assert err.value.reason == NO_VISION
