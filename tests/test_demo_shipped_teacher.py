"""The demo's shipped teacher: it installs atomically, says what is missing, and reads scenes."""

from __future__ import annotations

import json
import shutil

import pytest

from modistill.demo.shipped import FILES, SHIPPED_TEACHER, install_shipped_teacher, ship_teacher
from modistill.errors import UserError
from modistill.eval.run import evaluate
from modistill.scenes.build import build_world
from modistill.scenes.world import WorldConfig


def test_install_copies_every_file_and_keeps_a_finished_copy(tmp_path):
    dest = install_shipped_teacher(tmp_path / "teacher")
    for name in FILES:
        assert (dest / name).read_bytes() == (SHIPPED_TEACHER / name).read_bytes(), name
    assert json.loads((dest / ".modistill").read_text())["kind"] == "run"
    (dest / "metrics.json").write_text('{"edited": true}')  # a finished copy is not overwritten
    install_shipped_teacher(dest)
    assert json.loads((dest / "metrics.json").read_text()) == {"edited": True}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".teacher")]  # no temporary left


def test_install_names_the_missing_file(tmp_path):
    source = tmp_path / "partial"
    shutil.copytree(SHIPPED_TEACHER, source)
    (source / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"partial: the shipped demo teacher lacks model\.safetensors"):
        install_shipped_teacher(tmp_path / "teacher", source)
    assert not (tmp_path / "teacher").exists()


def test_ship_makes_the_run_paths_relative(tmp_path):
    run = tmp_path / "build"
    shutil.copytree(SHIPPED_TEACHER, run / "teacher")
    for name in ("stage.yaml", "data.json", "config.json"):
        path = run / "teacher" / name
        path.write_text(path.read_text().replace("RUN/", f"{run}/"))
    dest = ship_teacher(run, tmp_path / "shipped", validation={"vqa_accuracy": 0.5})
    for name in ("stage.yaml", "data.json", "config.json"):
        text = (dest / name).read_text()
        assert str(tmp_path) not in text and "RUN/" in text, name
    assert '"vqa_accuracy": 0.5' in (dest / "README.md").read_text()
    with pytest.raises(UserError, match="no finished teacher"):
        ship_teacher(tmp_path / "nothing", tmp_path / "x")


@pytest.mark.real
def test_shipped_teacher_reads_held_out_scenes(tmp_path):
    # The demo's world config (seed 0): a checkpoint that no longer loads, or lost its training,
    # scores near chance here (VQA ~0.3, POPE F1 ~0.5-0.67).
    cfg = WorldConfig(caption_noise=0.2, multi_turn=0.2, train_colour_near_miss=0.6, seed=0)
    build_world(tmp_path / "world", cfg, n_train=40, n_test=40, seed=0, progress=False)
    files = {k: tmp_path / "world" / "eval" / f"{k}.jsonl" for k in ("vqa", "pope", "captions")}
    result = evaluate(SHIPPED_TEACHER, files, batch_size=64, limit=120, progress=False)
    m = result["metrics"]
    assert m["vqa"]["accuracy"] >= 0.7, m["vqa"]
    assert m["pope"]["overall"]["f1"] >= 0.9, m["pope"]
    assert m["captions"]["greedy"]["response_hallucination"] <= 0.3, m["captions"]


@pytest.mark.slow
def test_demo_distils_from_the_shipped_teacher(tmp_path):
    from dataclasses import replace

    from modistill.demo.pipeline import Demo
    from modistill.demo.plan import QUICK

    plan = replace(QUICK, teacher="shipped", eval_limit=20)
    result = Demo(tmp_path, plan, progress=False).run()
    teacher = tmp_path / "teacher"
    assert (teacher / "model.safetensors").read_bytes() == (SHIPPED_TEACHER / "model.safetensors").read_bytes()
    assert "vision" not in result["timings"] and not (tmp_path / "teacher-stage0").exists()  # nothing trained
    # The student speaks the teacher's tokenizer (KD compares their distributions token by token).
    stage0 = tmp_path / "student" / "stage0"
    assert (stage0 / "tokenizer.json").read_text() == (teacher / "tokenizer.json").read_text()
    assert [r["model"] for r in result["rows"]] == ["teacher"] + [f"student/stage{s}" for s in ("0", "1a", "1b", "2")]
    # Stages 1a and 1b read one teacher cache, made once on the student's samples.
    manifest = json.loads((tmp_path / "teacher-cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == QUICK.student_samples and manifest["top_k"] == QUICK.teacher_top_k
    assert "teacher cache" in result["timings"]
    for stage in ("stage1a", "stage1b"):
        cfg = (tmp_path / "configs" / f"student-{stage}.yaml").read_text()
        assert f"teacher_cache: {tmp_path / 'teacher-cache'}" in cfg
    # Every test image captioned, the first eval_limit questions asked; the untrained stage-0 LLM greedy only.
    rows = {r["model"]: r for r in result["rows"]}
    for name, row in rows.items():
        assert row["caption_greedy_n"] == plan.n_test > row["vqa_n"] == plan.eval_limit, name
        assert (row["caption_hallucination_sampled"] is None) == (name == "student/stage0"), name
    assert rows["student/stage0"]["caption_hallucination_greedy"] is not None
