"""Teachers: vocabulary checks, the offline cache, a teacher with its own processor, stored reference log-probs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import vlm_spec
from modistill.config import dump_yaml
from modistill.errors import UserError
from modistill.models.build import build_vlm
from modistill.models.load import load_model
from modistill.models.tiny import tiny_tokenizer
from modistill.models.vocab import check_vocab_compatible
from modistill.stages import run_stage
from modistill.stages.cache_teacher import CacheConfig, run_cache_teacher
from test_train_stages import _weights, stage_config


def _logs(out):
    return [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def test_vocab_checks(scenes_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(scenes_world / "tokenizer")
    n = len(tok)
    check_vocab_compatible(tok, tok, n, n)
    with pytest.raises(UserError, match="teacher.vocab: truncate"):
        check_vocab_compatible(tok, tok, n, n + 64)
    check_vocab_compatible(tok, tok, n, n + 64, mode="truncate")  # padding rows may be dropped when stated
    with pytest.raises(UserError, match="fewer than the student"):
        check_vocab_compatible(tok, tok, n, n - 1)
    other = tiny_tokenizer()  # another tokenizer of similar size: ids mean different tokens
    with pytest.raises(UserError, match=r"disagree on \d+ token ids \(first: \d+: student"):
        check_vocab_compatible(tok, other, n, n)


@pytest.mark.slow
def test_cached_teacher_with_k_equal_vocab_gives_the_live_teacher_run(tmp_path, scenes_world, teacher_dir, student_dir):
    vocab = load_model(student_dir).model.get_output_embeddings().weight.shape[0]
    loss = {"kd_weight": 1.0, "ce_weight": 0.2}
    live = stage_config(
        "mimic_dense",
        tmp_path / "live",
        {"path": str(student_dir)},
        scenes_world,
        teacher=teacher_dir,
        loss=loss,
        data={"cache_dir": str(tmp_path / "dc")},
    )
    # The cache serves the live run's stage: teacher, data and temperature come from its YAML.
    (tmp_path / "live.yaml").write_text(dump_yaml(live))
    cache_cfg = CacheConfig(
        stage=str(tmp_path / "live.yaml"), output_dir=str(tmp_path / "cache"), top_k=vocab, batch_size=8, shard_size=20
    )
    manifest = run_cache_teacher(cache_cfg)
    assert manifest["num_samples"] == 48 and len(manifest["shards"]) == 3
    assert manifest["bytes_per_token"] == pytest.approx(8 * vocab + 4, rel=0.02)

    cached = stage_config(
        "mimic_dense",
        tmp_path / "cached",
        {"path": str(student_dir)},
        scenes_world,
        teacher_cache=str(tmp_path / "cache"),
        loss=loss,
        data={"cache_dir": str(tmp_path / "dc")},
    )
    run_stage(live)
    run_stage(cached)
    for a, b in zip(_logs(tmp_path / "live"), _logs(tmp_path / "cached")):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # Same trajectory: the two runs differ by float rounding only. (Adam's first steps are ~lr * sign(g),
    # so an element whose gradient is ~0 can flip; compare the whole difference against the whole update.)
    w0, w_live, w_cached = _weights(student_dir), _weights(tmp_path / "live"), _weights(tmp_path / "cached")
    diff = torch.sqrt(sum(((w_live[n] - w_cached[n]) ** 2).sum() for n in w0))
    update = torch.sqrt(sum(((w_live[n] - w0[n]) ** 2).sum() for n in w0))
    assert diff <= 1e-3 * update

    # A cache made for other data is refused, naming why.
    other = stage_config(
        "mimic_dense",
        tmp_path / "other",
        {"path": str(student_dir)},
        scenes_world,
        teacher_cache=str(tmp_path / "cache"),
        loss=loss,
        data={"max_length": 80},
    )
    with pytest.raises(UserError, match="training data .* changed"):
        run_stage(other)
    # ... and so is one made at another KD temperature.
    hotter = stage_config(
        "mimic_dense",
        tmp_path / "hotter",
        {"path": str(student_dir)},
        scenes_world,
        teacher_cache=str(tmp_path / "cache"),
        loss={**loss, "temperature": 2.0},
        data={"cache_dir": str(tmp_path / "dc")},
    )
    with pytest.raises(UserError, match="temperature"):
        run_stage(hotter)


@pytest.mark.slow
def test_packed_cache_holds_the_padded_cache_rows(tmp_path, scenes_world, teacher_dir, student_dir):
    """data.packing packs the cache's teacher forwards too: every sample keeps its rows, ids and log-probs."""
    from modistill.teacher.cache import TeacherCache

    caches = {}
    for packing in (False, True):
        stage = stage_config(
            "mimic_dense",
            tmp_path / f"stage-{packing}",
            {"path": str(student_dir)},
            scenes_world,
            teacher=teacher_dir,
            data={"cache_dir": None, "packing": packing},
        )
        (tmp_path / f"stage-{packing}.yaml").write_text(dump_yaml(stage))
        out = tmp_path / f"cache-{packing}"
        run_cache_teacher(CacheConfig(stage=str(tmp_path / f"stage-{packing}.yaml"), output_dir=str(out), top_k=16))
        caches[packing] = TeacherCache(out)
    ids = list(caches[False]._index)
    assert len(ids) == 48 and sorted(ids) == sorted(caches[True]._index)
    padded, packed = caches[False].lookup(ids), caches[True].lookup(ids)
    assert torch.equal(padded[2], packed[2]) and torch.equal(padded[3], packed[3])  # targets, rows per sample
    torch.testing.assert_close(packed[1], padded[1], atol=1e-4, rtol=0)
    assert (packed[0] == padded[0]).float().mean() > 0.99  # near-ties in the top-k may swap places


@pytest.mark.slow
def test_small_k_cache_is_smaller_and_trains(tmp_path, scenes_world, teacher_dir, student_dir):
    stage = stage_config(
        "mimic_dense",
        tmp_path / "live",
        {"path": str(student_dir)},
        scenes_world,
        teacher=teacher_dir,
        data={"cache_dir": None},
    )
    (tmp_path / "stage.yaml").write_text(dump_yaml(stage))
    manifest = run_cache_teacher(
        CacheConfig(stage=str(tmp_path / "stage.yaml"), output_dir=str(tmp_path / "cache"), top_k=8)
    )
    # ids int32 + log-probs fp32 per top-k entry, + the target id; the rest is shard headers.
    assert 8 * 8 + 4 <= manifest["bytes_per_token"] < 8 * 8 + 4 + 16
    cfg = stage_config(
        "mimic_dense",
        tmp_path / "run",
        {"path": str(student_dir)},
        scenes_world,
        teacher_cache=str(tmp_path / "cache"),
        loss={"kd_weight": 1.0},
        data={"cache_dir": None},
    )
    assert run_stage(cfg)["steps"] == 2


def test_kd_with_a_teacher_that_has_more_image_tokens(tmp_path, scenes_world):
    """Teacher patch 8 (36 image tokens) vs student patch 16 (9): KD aligns the response tokens."""
    from modistill.data.conversations import load_conversations
    from modistill.losses.fused import fused_distill_loss
    from modistill.runtime.inputs import model_inputs, response_states
    from modistill.teacher.live import LiveTeacher

    teacher, t_proc = build_vlm(vlm_spec(scenes_world, text_hidden=48, patch=8, seed=5))
    student, s_proc = build_vlm(vlm_spec(scenes_world, text_hidden=32, patch=16, seed=6))
    teacher.eval()
    student.eval()
    data = load_conversations(
        [scenes_world / "train.json"], processor=s_proc, max_length=160, teacher_processor=t_proc, cache_dir=tmp_path
    )
    batch = data.collator()([data.dataset[i] for i in range(6)])
    assert (batch["teacher_input_ids"] == teacher.config.image_token_id).sum() == 4 * (
        batch["input_ids"] == student.config.image_token_id
    ).sum()

    # The trainer's path: live teacher on its own rendering, fused chunked loss.
    inputs, labels = model_inputs(batch)
    states = response_states(student, inputs, labels)
    target = LiveTeacher(teacher, student.get_output_embeddings().weight.shape[0]).targets(batch, states)
    got = fused_distill_loss(
        states.hidden, student.lm_head.weight, teacher=target, labels=states.targets, chunk_size=7
    )["kd"]

    # Independent reference: full logits of both models, response positions picked by hand, F.kl_div.
    with torch.no_grad():
        s_logits = student(**inputs).logits
        t_inputs, t_labels = model_inputs(batch, "teacher_")
        t_logits = teacher(**t_inputs).logits
    s_rows = s_logits[:, :-1][labels[:, 1:] != -100]
    t_rows = t_logits[:, :-1][t_labels[:, 1:] != -100]
    assert torch.equal(labels[:, 1:][labels[:, 1:] != -100], t_labels[:, 1:][t_labels[:, 1:] != -100])
    want = (
        F.kl_div(
            F.log_softmax(s_rows.double(), -1), F.log_softmax(t_rows.double(), -1), log_target=True, reduction="sum"
        )
        / s_rows.shape[0]
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.slow
def test_reference_precompute_equals_live(tmp_path, scenes_world, teacher_dir, student_dir):
    from modistill.upcycle import upcycle

    moe_dir = tmp_path / "moe"
    loaded = load_model(student_dir)
    upcycle(loaded.model, seed=0).save_pretrained(moe_dir)
    loaded.processor.save_pretrained(moe_dir)
    runs = {}
    for mode in ("precompute", "live"):
        cfg = stage_config(
            "preference",
            tmp_path / mode,
            {"path": str(moe_dir)},
            scenes_world,
            teacher=teacher_dir,
            reference=mode,
            loss={"beta": 0.1, "chosen_ce_weight": 0.1},
            train={"learning_rate": 1e-3, "max_steps": 3},
        )
        run_stage(cfg)
        runs[mode] = _logs(tmp_path / mode)
    for a, b in zip(runs["precompute"], runs["live"]):
        for key in ("loss", "pref_loss", "rewards/chosen", "rewards/rejected", "rewards/margin"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert (tmp_path / "precompute" / "reference" / "manifest.json").is_file()

    # Stored reference log-probs made for another teacher are refused.
    manifest = tmp_path / "precompute" / "reference" / "manifest.json"
    stored = json.loads(manifest.read_text())
    stored["teacher_fingerprint"] = "0" * 16
    manifest.write_text(json.dumps(stored))
    (tmp_path / "precompute" / "metrics.json").unlink()
    cfg = stage_config(
        "preference",
        tmp_path / "precompute",
        {"path": str(moe_dir)},
        scenes_world,
        teacher=teacher_dir,
        loss={"beta": 0.1, "chosen_ce_weight": 0.1},
        train={"learning_rate": 1e-3, "max_steps": 3},
    )
    with pytest.raises(UserError, match="do not match this run \\(teacher_fingerprint"):
        run_stage(cfg)
