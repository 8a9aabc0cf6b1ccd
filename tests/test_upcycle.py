"""Sparse upcycling: the MoE computes the dense function at init, and saves as plain transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import run_cli, vlm_batch
from modistill.errors import UserError
from modistill.models.build import build_vlm, text_config_from_spec
from modistill.models.load import load_model
from modistill.models.spec import TextSpec
from modistill.models.tiny import tiny_spec
from modistill.moe import sparse_blocks
from modistill.upcycle import upcycle


def _dense_lm(text_type: str, layers: int = 3, tie: bool = False):
    spec = TextSpec(
        type=text_type,
        hidden_size=32,
        intermediate_size=64,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(text_config_from_spec(spec, vocab_size=97)).eval()
    # Norm weights start at 1; perturb every parameter so the identity is not an accident of init.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize(
    "text_type,layers,expected_cls",
    [
        ("qwen3", "every-other", "Qwen3MoeForCausalLM"),
        ("qwen2", "every-other", "Qwen2MoeForCausalLM"),
        ("llama", "all", "MixtralForCausalLM"),
        ("mistral", "all", "MixtralForCausalLM"),
    ],
)
def test_upcycled_causal_lm_computes_the_dense_function(text_type, layers, expected_cls):
    dense = _dense_lm(text_type)
    moe = upcycle(dense, num_experts=4, top_k=2, layers=layers, router_std=0.5).eval()
    assert type(moe).__name__ == expected_cls
    ids = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        diff = (dense(ids).logits - moe(ids).logits).abs().max().item()
    assert diff <= 1e-5
    # The routers are not degenerate (std 0.5): tokens really are routed differently, so the
    # identity comes from identical experts and renormalised weights, not from a constant router.
    block = next(iter(sparse_blocks(moe).values()))
    assert block.gate.weight.std().item() == pytest.approx(0.5, rel=0.3)


def test_experts_are_exact_copies_and_layers_follow_the_choice():
    dense = _dense_lm("qwen3", layers=5)
    moe = upcycle(dense, num_experts=3, top_k=1, layers="every-other")
    assert sorted(sparse_blocks(moe)) == [0, 2, 4]
    for idx, block in sparse_blocks(moe).items():
        mlp = dense.model.layers[idx].mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        for e in range(3):
            assert torch.equal(block.experts.gate_up_proj[e], gate_up)
            assert torch.equal(block.experts.down_proj[e], mlp.down_proj.weight)
    assert sorted(sparse_blocks(upcycle(dense, layers="all"))) == [0, 1, 2, 3, 4]
    assert sorted(sparse_blocks(upcycle(dense, layers="1,3"))) == [1, 3]
    # The input model is left untouched.
    assert not sparse_blocks(dense)


def test_tied_embeddings_stay_tied_and_exact():
    dense = _dense_lm("qwen2", tie=True)
    moe = upcycle(dense).eval()
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert (dense(ids).logits - moe(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_upcycled_llava_with_image_computes_the_dense_function(tok_dir, vision):
    model, processor = build_vlm(tiny_spec(tok_dir, vision_type=vision))
    model.eval()
    moe = upcycle(model, router_std=0.5).eval()
    assert type(moe).__name__ == "LlavaForConditionalGeneration"
    assert moe.config.text_config.model_type == "qwen3_moe"
    batch = vlm_batch(processor, n=2)
    with torch.no_grad():
        diff = (model(**batch).logits - moe(**batch).logits).abs().max().item()
    assert diff <= 1e-5
    # Vision tower and projector are carried over unchanged.
    for name, p in model.model.vision_tower.state_dict().items():
        assert torch.equal(p, moe.model.vision_tower.state_dict()[name])
    for name, p in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(p, moe.model.multi_modal_projector.state_dict()[name])


def test_bad_arguments_are_refused():
    dense = _dense_lm("qwen3")
    with pytest.raises(UserError, match="at least 2 experts"):
        upcycle(dense, num_experts=1, top_k=1)
    with pytest.raises(UserError, match="--top-k 5"):
        upcycle(dense, num_experts=4, top_k=5)
    with pytest.raises(UserError, match="out of range"):
        upcycle(dense, layers="0,7")
    with pytest.raises(UserError, match="--layers all"):
        upcycle(_dense_lm("llama"), layers="every-other")


@pytest.mark.slow
def test_cli_output_reloads_without_modistill_and_generates(tiny_vlm_dir, tmp_path):
    out = tmp_path / "moe"
    result = run_cli(
        "upcycle",
        "--model",
        str(tiny_vlm_dir),
        "--out",
        str(out),
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--layers",
        "every-other",
    )
    assert result.returncode == 0, result.stderr
    assert "activated" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    code = textwrap.dedent(f"""
        import sys, torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(out)!r})
        proc = AutoProcessor.from_pretrained({str(out)!r})
        msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "describe"}}]}}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        batch = proc(images=[Image.new("RGB", (32, 32), (9, 99, 9))], text=[text], return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        assert out.shape[1] > batch["input_ids"].shape[1]
        assert "modistill" not in sys.modules
        print(model.config.text_config.model_type, sorted(model.config.text_config.mlp_only_layers))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["qwen3_moe", "[1]"]
    # The reloaded MoE still computes the dense function (the save/load path is exact too).
    dense, moe = load_model(tiny_vlm_dir), load_model(out)
    batch = vlm_batch(dense.processor)
    with torch.no_grad():
        assert (dense.model(**batch).logits - moe.model(**batch).logits).abs().max().item() <= 1e-5


def _write_gpt2(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(path)


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", "no such directory"),
        ("noconfig", "no config.json"),
        ("gpt2", "'gpt2'"),
        ("topk", "--top-k 5"),
        ("experts", "at least 2"),
        ("layers", "out of range"),
        ("nonempty", "--overwrite"),
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(case, expected, tiny_vlm_dir, tmp_path):
    model, out, extra = str(tiny_vlm_dir), tmp_path / "out", []
    if case == "missing":
        model = str(tmp_path / "nope")
    elif case == "noconfig":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "gpt2":
        _write_gpt2(tmp_path / "gpt2")
        model = str(tmp_path / "gpt2")
    elif case == "topk":
        extra = ["--top-k", "5"]
    elif case == "experts":
        extra = ["--num-experts", "1", "--top-k", "1"]
    elif case == "layers":
        extra = ["--layers", "0,9"]
    elif case == "nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    from modistill.cli import main

    code = main(["upcycle", "--model", model, "--out", str(out), *extra])
    assert code == 2
    if case == "nonempty":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    result = run_cli("upcycle", "--model", model, "--out", str(out), *extra) if case == "gpt2" else None
    if result is not None:  # one real process: exit code, a single line, no traceback
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0]


def test_cli_error_message_names_the_problem(tiny_vlm_dir, tmp_path, capsys):
    from modistill.cli import main

    assert main(["upcycle", "--model", str(tiny_vlm_dir), "--out", str(tmp_path / "o"), "--top-k", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --top-k 5")


def test_failed_upcycle_leaves_no_output(tiny_vlm_dir, tmp_path, monkeypatch):
    import modistill.models.load as load_mod

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(load_mod, "save_model", broken_save)
    from modistill.cli import main

    with pytest.raises(OSError):
        main(["upcycle", "--model", str(tiny_vlm_dir), "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []
