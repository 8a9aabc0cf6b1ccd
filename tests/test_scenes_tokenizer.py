"""Scenes tokenizer: lossless round trips, single-token specials, ChatML template, word-level lengths."""

import random
import re

import pytest
from transformers import AutoTokenizer

from modistill.models.chat import CHATML_TEMPLATE
from modistill.scenes.text import CAPTION_PROMPTS, QUESTION_TYPES, caption, make_question, training_sample
from modistill.scenes.tokenizer import chat_text, train_tokenizer
from modistill.scenes.world import CAPTION_TASKS, COL_WORDS, ROW_WORDS, World, WorldConfig


@pytest.fixture(scope="module")
def corpus():
    world = World(WorldConfig())
    rng = random.Random(0)
    noise = {"captions": 0, "noisy": 0}
    scenes = world.sample_split(400, "train", rng)
    samples = [training_sample(s, "i.png", str(i), world, rng, noise) for i, s in enumerate(scenes)]
    return world, scenes, samples


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([chat_text(s["conversations"]) for s in corpus[2]], out)
    return AutoTokenizer.from_pretrained(str(out))  # reloaded: what a model will actually use


def test_special_tokens_are_single_ids(tok):
    for t in ("<|im_start|>", "<|im_end|>", "<|pad|>", "<image>"):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [t]
    assert tok.image_token == "<image>" and tok(" <image>\n")["input_ids"].count(tok.image_token_id) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert len({tok.image_token_id, tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_start|>")}) == 4
    assert len(tok) == tok.backend_tokenizer.get_vocab_size() and len(tok) < 1024


def test_chat_template_renders_chatml_and_round_trips(tok):
    messages = [
        {"role": "user", "content": "<image>\nDescribe the image."},
        {"role": "assistant", "content": "a red circle"},
    ]
    assert tok.chat_template == CHATML_TEMPLATE
    text = tok.apply_chat_template(messages, tokenize=False)
    expected = (
        "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\na red circle<|im_end|>\n"
    )
    assert text == expected
    assert (
        chat_text([{"from": "human", "value": messages[0]["content"]}, {"from": "gpt", "value": "a red circle"}])
        == expected
    )
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.image_token_id) == 1 and ids.count(tok.eos_token_id) == 2
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_every_vocabulary_word_round_trips(tok, corpus):
    world = corpus[0]
    cfg = world.cfg
    words = cfg.colours + cfg.shapes + cfg.sizes + list(ROW_WORDS[cfg.grid]) + list(COL_WORDS[cfg.grid])
    words += "a and at the yes no zero one two three Is there in image".split()
    for w in words:
        for text in (w, " " + w, f"a {w} b", f"{w}.", f"{w}?", f"{w},"):
            assert tok.decode(tok(text)["input_ids"]) == text
    # Any text, even outside the grammar, decodes to itself (byte-level BPE: no unknown token).
    for text in ("Ünïcode ✓ 42", "  two  spaces", "a RED Circle!!"):
        assert tok.decode(tok(text)["input_ids"]) == text


def test_sequences_are_as_short_as_word_level(tok, corpus):
    world, scenes, _ = corpus
    rng = random.Random(1)
    for scene in scenes[:100]:
        texts = [caption(scene, style) for style in CAPTION_TASKS] + list(CAPTION_PROMPTS.values())
        texts += [qa[0] for t in QUESTION_TYPES if (qa := make_question(scene, t, world, rng))]
        for text in texts:
            n_words = len(re.findall(r"[A-Za-z]+|[^\sA-Za-z]", text))
            assert len(tok(text)["input_ids"]) == n_words, text
