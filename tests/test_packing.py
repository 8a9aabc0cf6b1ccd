"""data.packing: packed batches give every sample the response states it has in a padded batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from modistill.data.collate import pack_batch
from modistill.data.conversations import load_conversations
from modistill.data.render import IGNORE_INDEX, RenderedSample
from modistill.errors import UserError
from modistill.runtime.inputs import model_inputs, response_states
from modistill.stages import stage_from_dict
from modistill.upcycle import upcycle


@pytest.fixture(scope="module")
def world_data(scenes_world, teacher_dir, tmp_path_factory):
    processor = AutoProcessor.from_pretrained(teacher_dir)
    data = load_conversations(
        scenes_world / "train.json",
        image_root=scenes_world,
        processor=processor,
        max_length=96,
        cache_dir=tmp_path_factory.mktemp("cache"),
        verbose=False,
    )
    rows = [data.dataset[i] for i in range(12)]
    assert len({len(r["messages"]) for r in rows}) > 1, "want single- and multi-turn samples in the batch"
    return data, rows


def _states(model, batch):
    inputs, labels = model_inputs(batch)
    with torch.no_grad():
        return response_states(model, inputs, labels)


# float64 for the dense model; the MoE experts' grouped matmul has no float64 kernel.
@pytest.mark.parametrize(
    "moe, dtype, atol", [(False, torch.float64, 1e-9), (True, torch.float32, 1e-5)], ids=["dense", "moe"]
)
def test_packed_batch_gives_the_padded_batch_response_states(world_data, teacher_dir, moe, dtype, atol):
    data, rows = world_data
    model = AutoModelForImageTextToText.from_pretrained(teacher_dir, dtype=dtype).eval()
    if moe:
        model = upcycle(model, num_experts=4, top_k=2, layers="every-other", router_std=0.5).eval()
    padded, packed = data.collator()(rows), data.collator(packing=True)(rows)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several samples share a row
    assert packed["input_ids"].shape[1] <= 96
    a, b = _states(model, padded), _states(model, packed)
    assert torch.equal(a.targets, b.targets) and torch.equal(a.counts, b.counts)
    torch.testing.assert_close(b.hidden, a.hidden, rtol=0, atol=atol)


def test_packed_attention_without_position_ids_would_leak(world_data, teacher_dir):
    """The check above can fail: the same packed rows read as one sequence give other states."""
    data, rows = world_data
    model = AutoModelForImageTextToText.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    packed = data.collator(packing=True)(rows)
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    a, b = _states(model, packed), _states(model, leaky)
    assert not torch.allclose(a.hidden, b.hidden, atol=1e-6)


def _seq(n: int, answer: int) -> RenderedSample:
    ids = list(range(1, n + 1))
    return RenderedSample(input_ids=ids, labels=[IGNORE_INDEX] * (n - answer) + ids[n - answer :], images=[])


def test_pack_batch_rows_order_positions_and_labels():
    seqs = [_seq(5, 2), _seq(4, 1), _seq(7, 3), _seq(2, 1)]
    batch = pack_batch(seqs, pad_id=0, capacity=10)
    # next fit in order: [5, 4] (9 tokens), [7, 2] (9 tokens)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 1, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1]]
    flat = [t for row in batch["labels"].tolist() for t in row if t != IGNORE_INDEX]
    assert flat == [t for s in seqs for t in s.response_tokens()]  # response tokens stay in sample order
    # A row with room left: its padding continues the last sample's positions (no new sequence starts).
    short = pack_batch([_seq(3, 1), _seq(6, 2)], pad_id=0, capacity=6)
    assert short["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert short["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert short["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 3


def test_a_sample_longer_than_the_capacity_gets_its_own_row():
    batch = pack_batch([_seq(3, 1), _seq(12, 2), _seq(2, 1)], pad_id=0, capacity=8)
    assert batch["input_ids"].shape == (3, 12)
    assert (batch["position_ids"] == 0).sum(dim=1).tolist() == [1, 1, 1]


def test_packing_is_refused_where_it_does_not_apply(scenes_world, teacher_dir, student_dir, tmp_path):
    common = {
        "output_dir": str(tmp_path / "out"),
        "student": {"path": str(student_dir)},
        "teacher": {"path": str(teacher_dir)},
    }
    pairs = {**common, "stage": "preference", "data": {"train": [str(scenes_world / "prefs.json")], "packing": True}}
    with pytest.raises(UserError, match="data.packing applies to conversation stages"):
        stage_from_dict(pairs)
    onpolicy = {
        **common,
        "stage": "mimic_dense",
        "data": {"train": [str(scenes_world / "train.json")], "packing": True},
        "loss": {"onpolicy_fraction": 0.5},
    }
    with pytest.raises(UserError, match="data.packing does not apply to on-policy batches"):
        stage_from_dict(onpolicy)


def test_image_cache_is_refused_where_it_does_not_apply(scenes_world, teacher_dir, student_dir, tmp_path):
    common = {"output_dir": str(tmp_path / "out"), "student": {"path": str(student_dir)}}
    data = {"train": [str(scenes_world / "prefs.json")], "image_cache_mb": 64}
    pairs = {**common, "stage": "preference", "teacher": {"path": str(teacher_dir)}, "data": data}
    with pytest.raises(UserError, match="data.image_cache_mb applies to conversation stages"):
        stage_from_dict(pairs)
    negative = {**common, "stage": "align", "data": {"train": [str(scenes_world / "train.json")], "image_cache_mb": -1}}
    with pytest.raises(UserError, match="data.image_cache_mb must be >= 0"):
        stage_from_dict(negative)
