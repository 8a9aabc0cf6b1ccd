"""Collated batches run through tiny Llava models; teacher renderings; same_rendering."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from helpers import red_image
from modistill.data.collate import ConversationCollator, PixelCache, PreferenceCollator, same_rendering
from modistill.data.conversations import load_conversations
from modistill.data.preferences import load_preferences
from modistill.data.render import IGNORE_INDEX, Renderer
from modistill.errors import UserError
from modistill.models.build import build_vlm
from modistill.models.processor import build_image_processor, build_processor
from modistill.models.tiny import tiny_spec


@pytest.fixture(scope="module")
def siglip(tiny_vlm_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir).eval(), AutoProcessor.from_pretrained(tiny_vlm_dir)


@pytest.fixture(scope="module")
def clip(tok_dir):
    model, proc = build_vlm(tiny_spec(tok_dir, vision_type="clip"))
    return model.eval(), proc


@pytest.fixture(scope="module")
def clip16(tok_dir):
    """A teacher with another tower, normalisation and image-token count (16 per image)."""
    spec = tiny_spec(tok_dir, vision_type="clip", hidden=48, seed=1)
    spec.vision.patch_size = 8
    model, proc = build_vlm(spec)
    return model.eval(), proc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("collate")
    red_image().save(root / "red.png")
    red_image(50).save(root / "big.png")
    rows = [
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "is there a circle?"}, {"from": "gpt", "value": "yes."}],
        },
        {
            "id": "one",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat colour?"},
                {"from": "gpt", "value": "red."},
                {"from": "human", "value": "how many?"},
                {"from": "gpt", "value": "one."},
            ],
        },
        {
            "id": "two",
            "image": ["big.png", "red.png"],
            "conversations": [
                {"from": "human", "value": "<image> and <image>: same colour?"},
                {"from": "gpt", "value": "yes, red."},
            ],
        },
    ]
    (root / "c.json").write_text(json.dumps(rows, indent=1))
    pairs = [
        {
            "id": "p1",
            "image": "red.png",
            "question": "describe the image.",
            "chosen": "a red square.",
            "rejected": "a blue circle on the left.",
        },
        {"id": "p2", "question": "is there a green triangle?", "chosen": "no.", "rejected": "yes."},
    ]
    (root / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


def conversations(data_dir, proc, teacher=None):
    return load_conversations(
        data_dir / "c.json", processor=proc, max_length=128, teacher_processor=teacher, cache_dir=data_dir / "cache"
    )


def forward(model, batch, prefix=""):
    with torch.no_grad():
        kw = {"pixel_values": batch[prefix + "pixel_values"]} if prefix + "pixel_values" in batch else {}
        return model(
            input_ids=batch[prefix + "input_ids"],
            attention_mask=batch[prefix + "attention_mask"],
            labels=batch[prefix + "labels"],
            **kw,
        )


@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_mixed_batch_runs_through_the_model(tower, siglip, clip, data_dir):
    model, proc = {"siglip": siglip, "clip": clip}[tower]
    data = conversations(data_dir, proc)
    batch = data.collator()([data.dataset[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "sample_ids"}
    assert batch["sample_ids"] == ["text", "one", "two"]
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert int((batch["input_ids"] == proc.image_token_id).sum()) == 3 * 4
    out = forward(model, batch)
    assert torch.isfinite(out.loss)
    # The model's own count of image positions agrees with ours, row by row.
    per_row = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert per_row == [0, 4, 8]


def test_padding_is_right_with_masked_labels(siglip, data_dir):
    _, proc = siglip
    data = conversations(data_dir, proc)
    rows = [data.dataset[i] for i in range(3)]
    batch = data.collator()(rows)
    for i, row in enumerate(rows):
        s = data.renderer.render_conversation(row)
        n = len(s.input_ids)
        assert batch["input_ids"][i, :n].tolist() == s.input_ids
        assert batch["labels"][i, :n].tolist() == s.labels
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][i, n:] == proc.tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_text_only_batch_has_no_pixel_values(siglip, data_dir):
    model, proc = siglip
    data = conversations(data_dir, proc)
    batch = data.collator()([data.dataset[0]])
    assert "pixel_values" not in batch
    assert torch.isfinite(forward(model, batch).loss)


def test_teacher_with_other_image_token_count(siglip, clip16, data_dir):
    model, proc = siglip
    teacher_model, teacher_proc = clip16
    data = conversations(data_dir, proc, teacher=teacher_proc)
    assert data.teacher_renderer is not None and data.teacher_renderer.tokens_per_image == 16
    batch = data.collator()([data.dataset[i] for i in range(3)])
    assert {"teacher_input_ids", "teacher_attention_mask", "teacher_labels", "teacher_pixel_values"} <= set(batch)
    assert int((batch["teacher_input_ids"] == teacher_proc.image_token_id).sum()) == 3 * 16
    # Response tokens identical, row by row, under both renderings.
    for i in range(3):
        s, t = batch["labels"][i], batch["teacher_labels"][i]
        assert s[s != IGNORE_INDEX].tolist() == t[t != IGNORE_INDEX].tolist()
    # Different normalisation: the teacher's pixels are its own.
    assert not torch.allclose(batch["pixel_values"], batch["teacher_pixel_values"])
    assert torch.isfinite(forward(model, batch).loss)
    assert torch.isfinite(forward(teacher_model, batch, "teacher_").loss)


def _same_batches(a, b):
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("with_teacher", [False, True])
def test_rows_tokens_and_cached_pixels_give_the_batch_built_from_scratch(
    siglip, clip16, data_dir, packing, with_teacher
):
    _, proc = siglip
    data = conversations(data_dir, proc, teacher=clip16[1] if with_teacher else None)
    rows = [data.dataset[i] for i in (2, 0, 1)]
    scratch = ConversationCollator(data.renderer, data.teacher_renderer, packing=packing)
    fast = data.collator(packing=packing, image_cache_mb=1)
    assert fast.pretokenized and not scratch.pretokenized
    # Twice: the second batch takes every image from the cache.
    _same_batches(scratch(rows), fast(rows))
    _same_batches(scratch(rows[1:]), fast(rows[1:]))
    cache = fast.pixel_caches["teacher_" if with_teacher else ""]
    # big.png and red.png decoded once; red.png's second use in batch 1 and its use in batch 2 are hits.
    assert (cache.misses, cache.hits) == (2, 2)
    if with_teacher:
        assert len(fast.pixel_caches[""].entries) == 2  # each renderer keeps its own pixels


def test_pretokenized_collation_needs_the_loaders_columns(siglip, data_dir):
    _, proc = siglip
    data = conversations(data_dir, proc)
    row = {k: v for k, v in data.dataset[1].items() if k not in ("input_ids", "labels")}
    with pytest.raises(UserError, match="sample one: the row has no input_ids"):
        data.collator()([row])


def test_pixel_cache_drops_the_least_recently_used_past_its_bound():
    one = torch.zeros(64, 64, dtype=torch.float32)  # 16 KiB
    cache = PixelCache(max_mb=40 / 1024)  # room for two
    cache.put("a", one)
    cache.put("b", one.clone())
    assert cache.get("a") is one  # a is now the most recently used
    cache.put("c", one.clone())
    assert set(cache.entries) == {"a", "c"} and cache.bytes == 2 * one.numel() * 4
    cache.put("huge", torch.zeros(200, 200))  # larger than the whole cache: not kept
    assert "huge" not in cache.entries and cache.bytes <= cache.max_bytes
    with pytest.raises(UserError, match="image_cache_mb must be >= 0"):
        PixelCache(-1)


def test_identical_processors_share_one_rendering(siglip, tiny_vlm_dir, data_dir):
    _, proc = siglip
    again = AutoProcessor.from_pretrained(tiny_vlm_dir)
    collator = ConversationCollator(Renderer(proc, 128), Renderer(again, 128))
    batch = collator([conversations(data_dir, proc).dataset[1]])
    assert not any(k.startswith("teacher_") for k in batch)


def test_same_rendering(siglip, clip, tok_dir):
    _, proc = siglip
    tok = proc.tokenizer
    assert same_rendering(proc, proc)
    rebuilt = build_processor(AutoTokenizer.from_pretrained(tok_dir), build_image_processor("siglip", 32), "siglip", 16)
    assert same_rendering(proc, rebuilt)  # saved + loaded vs built in memory
    assert not same_rendering(proc, clip[1])  # other normalisation
    assert not same_rendering(proc, build_processor(tok, build_image_processor("siglip", 64), "siglip", 16))
    assert not same_rendering(proc, build_processor(tok, build_image_processor("siglip", 32), "siglip", 8))
    other_tok = AutoTokenizer.from_pretrained(tok_dir)
    other_tok.add_tokens(["<extra>"])
    assert not same_rendering(proc, build_processor(other_tok, build_image_processor("siglip", 32), "siglip", 16))
    templated = AutoTokenizer.from_pretrained(tok_dir)
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert not same_rendering(proc, build_processor(templated, build_image_processor("siglip", 32), "siglip", 16))


def test_preference_batch(siglip, clip16, data_dir):
    model, proc = siglip
    teacher_model, teacher_proc = clip16
    data = load_preferences(
        data_dir / "p.jsonl",
        processor=proc,
        max_length=128,
        teacher_processor=teacher_proc,
        cache_dir=data_dir / "cache",
    )
    rows = [data.dataset[0], data.dataset[1]]
    batch = data.collator()(rows)
    sides = [f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")]
    assert set(batch) == {
        *sides,
        "pixel_values",
        "sample_ids",
        *("teacher_" + k for k in sides),
        "teacher_pixel_values",
    }
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["pixel_values"].shape[0] == 1 and batch["teacher_pixel_values"].shape[0] == 1  # once per pair
    tok = proc.tokenizer
    for i, (chosen, rejected) in enumerate([("a red square.", "a blue circle on the left."), ("no.", "yes.")]):
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            for prefix in ("", "teacher_"):
                labels = batch[f"{prefix}{side}_labels"][i]
                assert tok.decode(labels[labels != IGNORE_INDEX]) == text + "<|im_end|>"
    # chosen and rejected concatenated into one forward of 2B rows, pixels repeated.
    keys = ("input_ids", "attention_mask", "labels")
    both = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys}
    both["pixel_values"] = torch.cat([batch["pixel_values"]] * 2)
    assert torch.isfinite(forward(model, both).loss)
    teacher_both = {k: torch.cat([batch[f"teacher_chosen_{k}"], batch[f"teacher_rejected_{k}"]]) for k in keys}
    teacher_both["pixel_values"] = torch.cat([batch["teacher_pixel_values"]] * 2)
    assert torch.isfinite(forward(teacher_model, teacher_both).loss)
    # Without a (differing) teacher: no teacher keys.
    assert not any(k.startswith("teacher_") for k in PreferenceCollator(data.renderer)(rows))
