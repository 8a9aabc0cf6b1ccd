"""Damaged weights, pickles, bad numbers and missing paths are one-line errors, not tracebacks (item 6)."""

from __future__ import annotations

import pickle
import shutil
import struct

import pytest

from modistill.cli import main
from modistill.errors import UserError
from modistill.eval.run import load_vlm
from modistill.runtime.config import StudentConfig
from modistill.runtime.student import load_student


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a header length beyond the end of the file
        path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])


@pytest.mark.parametrize(
    "how, why", [("truncated", "truncated: the tensors need"), ("empty", "0 bytes"), ("header", "the header claims")]
)
def test_a_damaged_safetensors_file_is_one_line_in_info_train_and_eval(tmp_path, tiny_vlm_dir, capsys, how, why):
    model = tmp_path / "model"
    shutil.copytree(tiny_vlm_dir, model)
    _damage(model / "model.safetensors", how)
    assert main(["info", str(model)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "model.safetensors: not a valid safetensors file" in lines[0] and why in lines[0]
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_student(StudentConfig(path=str(model)))  # train
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_vlm(str(model))  # eval


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint does when unpickled
        return (print, ("pwned",))


def test_a_pickled_checkpoint_is_refused_with_the_fix(tmp_path, tiny_vlm_dir, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_vlm_dir, model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    assert main(["info", str(model)]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "pytorch_model.bin: refused to unpickle it" in lines[0]
    assert "convert it to safetensors" in lines[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=-1", "train: learning_rate: -1.0: must be >= 0"),
        ("train.per_device_train_batch_size=0", "train: per_device_train_batch_size: 0: must be >= 1"),
        ("train.max_steps=0", "train: max_steps: 0: give a positive number of steps, or -1 (use num_train_epochs)"),
        ("data.max_length=0", "data: max_length: 0: must be >= 1"),
        (
            "train.train_sampling_strategy=by_length",
            "train: train_sampling_strategy: 'by_length': choose one of random, sequential, group_by_length, "
            "batch_rebalance",
        ),
    ],
)
def test_bad_numbers_are_refused_at_config_time(tmp_path, capsys, override, message):
    config = tmp_path / "s.yaml"
    # The student and data do not exist: the error must come before anything is loaded.
    config.write_text("stage: align\noutput_dir: o\nstudent: {path: nowhere}\ndata: {train: [none.json]}\n")
    assert main(["train", str(config), override]) == 2
    lines = _error_lines(capsys)
    assert lines == [f"error: {config}: {message}"]


def test_a_missing_relative_model_path_is_no_such_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert main(["info", "models/nope"]) == 2  # not a hub id: `models/` is right here
    assert _error_lines(capsys) == ["error: models/nope: no such directory"]
