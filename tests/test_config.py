"""Typed configs: YAML <-> dataclasses, strict keys and types, overrides; every shipped YAML parses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from modistill.config import apply_overrides, dump_yaml, from_dict, load_config
from modistill.errors import UserError
from modistill.stages import STAGES, load_stage_config
from modistill.stages.cache_teacher import CacheConfig, load_cache_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    steps: int = 1
    flag: bool = False
    files: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None


def test_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nsteps: 3\ninner: {rate: 2}\nfiles: one.json\n")
    cfg = load_config(Outer, path, ["inner.mode=b", "flag=true", "maybe.rate=0.5", "files=[a, b]"])
    assert cfg == Outer(name="x", steps=3, flag=True, files=["a", "b"], inner=Inner(2.0, "b"), maybe=Inner(0.5))
    assert isinstance(cfg.inner.rate, float)
    assert from_dict(Outer, yaml.safe_load(dump_yaml(cfg))) == cfg
    # A single value where a list is expected is a one-element list.
    assert load_config(Outer, path).files == ["one.json"]


def test_scientific_notation_is_a_number(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string, in files and in key=value overrides alike.
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner: {rate: 2e-5}\n")
    assert load_config(Outer, path).inner.rate == 2e-5
    assert load_config(Outer, path, ["inner.rate=1E+2"]).inner.rate == 100.0
    with pytest.raises(UserError, match="expected a number, got str 'e-3'"):
        load_config(Outer, path, ["inner.rate=e-3"])


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: x\nstep: 3\n", "unknown key 'step'"),
        ("name: x\ninner: {rte: 1}\n", "unknown key inner.'rte'"),
        ("name: x\nsteps: three\n", "steps: expected an integer, got str 'three'"),
        ("name: x\nsteps: 1.5\n", "steps: expected an integer"),
        ("name: x\nflag: 1\n", "flag: expected true or false"),
        ("name: x\ninner: {mode: c}\n", "inner.mode: 'c' is not one of 'a', 'b'"),
        ("steps: 2\n", "missing required key 'name'"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key_and_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as exc:
        load_config(Outer, path)
    assert message in str(exc.value)
    assert str(path) in str(exc.value)


def test_bad_override_is_refused(tmp_path):
    with pytest.raises(UserError, match="key.sub=value"):
        apply_overrides({}, ["no_equals_sign"])
    with pytest.raises(UserError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def _stage_files():
    return sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts)


def test_every_shipped_yaml_parses():
    files = _stage_files()
    assert len(files) >= 10
    for path in files:
        if path.name.startswith("cache_teacher"):
            cache = load_cache_config(path)
            assert isinstance(cache, CacheConfig)
            assert load_stage_config(CONFIGS.parent / cache.stage).stage in ("mimic_dense", "mimic_sparse")
        else:
            cfg = load_stage_config(path)
            assert type(cfg).__name__ == STAGES[cfg.stage][1]
    for path in sorted((CONFIGS / "accelerate").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert data["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}


def test_stage_config_requires_a_teacher_for_kd(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("stage: mimic_sparse\noutput_dir: o\nstudent: {path: s}\ndata: {train: [d.json]}\n")
    with pytest.raises(UserError, match="give `teacher`"):
        load_stage_config(path)
    path.write_text(
        "stage: mimic_dense\noutput_dir: o\nstudent: {path: s, build: {tokenizer: t}}\ndata: {train: [d.json]}\n"
        "teacher: {path: t}\n"
    )
    with pytest.raises(UserError, match="exactly one of"):
        load_stage_config(path)


def test_stage_keys_are_checked_against_that_stage(tmp_path):
    path = tmp_path / "s.yaml"
    # balance_coef belongs to stage 1b's loss, not 1a's; an unknown stage is named with the valid ones.
    path.write_text(
        "stage: mimic_dense\noutput_dir: o\nstudent: {path: s}\nteacher: {path: t}\n"
        "data: {train: [d.json]}\nloss: {balance_coef: 0.01}\n"
    )
    with pytest.raises(UserError, match="unknown key loss.'balance_coef'"):
        load_stage_config(path)
    path.write_text("stage: mimic\noutput_dir: o\nstudent: {path: s}\ndata: {train: [d.json]}\n")
    with pytest.raises(UserError, match="must be one of align, sft, mimic_dense"):
        load_stage_config(path)
    path.write_text(
        "stage: mimic_dense\noutput_dir: o\nstudent: {path: s}\nteacher: {path: t}\n"
        "data: {train: [d.json]}\nloss: {kd_weight: 0}\n"
    )
    with pytest.raises(UserError, match="kd_weight must be > 0"):
        load_stage_config(path)
