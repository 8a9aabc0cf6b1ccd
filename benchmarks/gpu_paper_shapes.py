"""GPU: stage-1b and stage-2 steps at the paper's shapes (random weights), bf16, 2,048 tokens.

Models (built from configs, random weights, no download):
- vision tower: CLIP ViT-L/14-336 (hidden 1024, 24 layers, 16 heads, MLP 4096; 576 image tokens,
  feature layer -2), shared shape for student and teacher;
- student: Qwen1.5-1.8B-shaped (Qwen2 arch: hidden 2048, 24 layers, 16 heads, MLP 5504, vocabulary
  151,936) upcycled by `modistill.upcycle.upcycle` to 4 experts top-2 on every other layer;
- teacher: Qwen2-7B-shaped (hidden 3584, 28 layers, 28 heads / 4 KV heads, MLP 18944, vocabulary
  152,064; the student's 151,936 rows are used, as `teacher.vocab: truncate` does).

Student weights fp32 (AdamW's master copy) under bf16 autocast (`train.bf16: true`), teacher bf16.
One sample per step: 576 image tokens + 64 prompt tokens + response to 2,048 tokens (stage 2: a
pair, 2 x 2,048). Each row is the trainer's own step (`benchmarks/steps.py`: training_step, clip,
AdamW step). Rows:
- stage 1b (KD + CE + 0.01 balance) with the live teacher / with the cached top-32 teacher
  (teacher freed before the cached row: its memory is what the cache saves);
- stage 2 (paired KTO + balance) with the live reference / the precomputed reference;
- peer: TRL GKDTrainer (lmbda 0, beta 0; Liger when installed) on the text models alone (its
  compute_loss passes no image), beside modistill's stage-1b step on the same text models.

    python benchmarks/gpu_paper_shapes.py [--repeats 3]     # one GPU; sized for <= 8 min (not yet run on one)
    python benchmarks/gpu_paper_shapes.py --tiny            # the same code at 1/32 width on the CPU
"""

from __future__ import annotations

import gc
import importlib.util
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

import benchlib as bl
import steps
from b3_cached_teacher_step import write_cache
from b4_preference_reference import store_reference
from modistill.moe import sparse_blocks
from modistill.runtime.groups import set_trainable
from modistill.stages.mimic_sparse import SparseKDLoss
from modistill.stages.preference import PreferenceLoss, PreferenceTrainer
from modistill.teacher.cache import TeacherCache
from modistill.teacher.live import LiveTeacher
from modistill.teacher.reference import LiveReference, StoredReference
from modistill.upcycle import upcycle

# Dense bf16 peak (TFLOP/s) of the GPUs this is meant for; MFU is left out on others.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}

MOE_TRAINABLE = ["projector", "dense_mlp", "experts", "routers"]  # the paper's stage 1b / 2 groups


@dataclass(frozen=True)
class Shapes:
    vision: dict
    image_size: int
    patch: int
    student: dict
    teacher: dict
    length: int
    prompt: int
    top_k: int = 32


PAPER = Shapes(
    vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    image_size=336,
    patch=14,
    student=dict(
        vocab_size=151_936,
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5504,
    ),
    teacher=dict(
        vocab_size=152_064,
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
    ),
    length=2048,
    prompt=64,
)
# 1/32 of the widths, vocabularies and sequence; 1/8 of the depths; a 4 x 4-patch image.
TINY = Shapes(
    vision=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128),
    image_size=56,
    patch=14,
    student=dict(
        vocab_size=4748,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=172,
    ),
    teacher=dict(
        vocab_size=4752,
        hidden_size=112,
        num_hidden_layers=4,
        num_attention_heads=7,
        num_key_value_heads=1,
        intermediate_size=592,
    ),
    length=64,
    prompt=8,
    top_k=8,
)


def text_config(sizes: dict, vocab: int | None = None) -> Qwen2Config:
    return Qwen2Config(
        **{**sizes, **({"vocab_size": vocab} if vocab else {})},
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )


def image_tokens(s: Shapes) -> int:
    return (s.image_size // s.patch) ** 2


def vlm(s: Shapes, text: dict, device, dtype, seed: int) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**s.vision, image_size=s.image_size, patch_size=s.patch),
        text_config=text_config(text),
        image_token_id=s.student["vocab_size"] - 1,
        image_seq_length=image_tokens(s),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU itself: seconds, not minutes
        return LlavaForConditionalGeneration(config).to(dtype)


def sample_ids(s: Shapes, gen: torch.Generator, prompt_ids: torch.Tensor | None = None) -> dict:
    """One sample: image tokens, prompt, response to s.length; labels on the response only."""
    image = torch.full((1, image_tokens(s)), s.student["vocab_size"] - 1)
    prompt = (
        prompt_ids
        if prompt_ids is not None
        else torch.randint(0, s.student["vocab_size"] - 2, (1, s.prompt), generator=gen)
    )
    response = torch.randint(0, s.student["vocab_size"] - 2, (1, s.length - image.shape[1] - s.prompt), generator=gen)
    ids = torch.cat([image, prompt, response], dim=1)
    labels = ids.clone()
    labels[:, : image.shape[1] + s.prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def batches(s: Shapes, device, seed: int) -> tuple[dict, dict]:
    """(stage-1b sample, stage-2 pair) on the device, pixels in bf16 (the teacher's dtype)."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, s.image_size, s.image_size, generator=gen).to(device, torch.bfloat16)
    one = {**sample_ids(s, gen), "pixel_values": pixels}
    one = {k: v.to(device) for k, v in one.items()} | {"sample_ids": [f"s{seed}"]}
    prompt = torch.randint(0, s.student["vocab_size"] - 2, (1, s.prompt), generator=gen)
    pair = {"sample_ids": [f"p{seed}"], "pixel_values": pixels}
    for side in ("chosen", "rejected"):
        pair |= {f"{side}_{k}": v.to(device) for k, v in sample_ids(s, gen, prompt).items()}
    return one, pair


def active_params(model) -> int:
    """Parameters one token uses: the MoE layers' experts count top_k / num_experts."""
    total = bl.parameter_count(model)
    for block in sparse_blocks(model).values():
        experts = sum(p.numel() for p in block.experts.parameters())
        total -= experts * (1 - block.gate.top_k / block.gate.num_experts)
    return int(total)


def measure(fn, repeats: int, device: torch.device, log=print) -> dict:
    """One warm-up call, then `repeats` timed calls; peak memory of the timed calls (GPU: allocated)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    with bl.RssPeak(interval=0.002) as rss:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak
    median = sorted(seconds)[len(seconds) // 2]
    log(f"  {median:8.3f} s/step   peak {peak / bl.GB:7.2f} GB")
    return {"seconds": [round(x, 4) for x in seconds], "median_s": median, "peak_bytes": int(peak)}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    parser = bl.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="1/32 scale on the CPU (a check that it runs)")
    args = parser.parse_args(argv)
    args.quick = args.quick or args.tiny
    bl.setup_threads()
    started = time.perf_counter()
    s = TINY if args.quick else PAPER
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    repeats = 1 if args.quick else args.repeats
    targs = steps.training_args(use_cpu=not cuda, bf16=True, per_device_train_batch_size=1)
    rows_v = s.student["vocab_size"]
    loss = SparseKDLoss(kd_weight=1.0, ce_weight=1.0, balance_coef=0.01)
    runs: dict[str, dict] = {}
    flops: dict[str, float] = {}
    tokens: dict[str, int] = {}

    student = upcycle(vlm(s, s.student, device, torch.float32, seed=0), 4, 2, "every-other", seed=0)
    teacher = vlm(s, {**s.teacher}, device, torch.bfloat16, seed=1).eval().requires_grad_(False)
    vision = bl.parameter_count(student.model.vision_tower)
    s_lm, t_lm = active_params(student) - vision, bl.parameter_count(teacher) - vision
    one, pair = batches(s, device, seed=2)
    image_fwd = 2 * vision * image_tokens(s)
    n1, n2 = s.length, 2 * s.length
    cache_dir = tempfile.mkdtemp(prefix="modistill-gpu-cache-")
    write_cache(teacher, one, rows_v, s.top_k, cache_dir)
    store = store_reference(teacher, pair, tempfile.mkdtemp(prefix="modistill-gpu-ref-"), loss.chunk_size)
    print(
        f"models on {device}: student {bl.parameter_count(student) / 1e9:.2f}B ({s_lm / 1e9:.2f}B active LM), "
        f"teacher {bl.parameter_count(teacher) / 1e9:.2f}B; {bl.parameter_count(student.model.vision_tower) / 1e6:.0f}M"
        f" vision tower; {time.perf_counter() - started:.0f} s so far"
    )

    def phase(model):
        set_trainable(model, MOE_TRAINABLE)  # stages 1b and 2 train the same groups
        return steps.StepRunner(model, steps.distill_trainer(model, None, targs, kd_weight=0.0, ce_weight=1.0))

    def row(name: str, fn, n_tokens: int, model_flops: float) -> None:
        print(name)
        runs[name], tokens[name], flops[name] = measure(fn, repeats, device), n_tokens, model_flops

    # Live teacher / live reference first, while the teacher is on the device.
    runner = phase(student)
    live = steps.distill_trainer(student, LiveTeacher(teacher, rows_v), targs, **vars_of(loss))
    row("stage 1b, live teacher", runner.bind(live, one), n1, 6 * s_lm * n1 + image_fwd + 2 * t_lm * n1 + image_fwd)
    del runner, live
    free(device)
    runner = phase(student)
    pref = PreferenceLoss()  # paired KTO, beta 0.1, balance 0.01
    live_ref = PreferenceTrainer(
        model=student,
        args=targs,
        loss_config=pref,
        pad_id=0,
        reference=LiveReference(teacher, pref.logps, 0, pref.chunk_size),
    )
    row(
        "stage 2, live reference",
        runner.bind(live_ref, pair),
        n2,
        6 * s_lm * n2 + 2 * image_fwd + 2 * t_lm * n2 + 2 * image_fwd,
    )
    del live_ref, teacher
    free(device)  # from here on the teacher is not resident: what the cache and the store save
    stored = PreferenceTrainer(model=student, args=targs, loss_config=pref, pad_id=0, reference=StoredReference(store))
    row("stage 2, precomputed reference", runner.bind(stored, pair), n2, 6 * s_lm * n2 + 2 * image_fwd)
    del runner, stored
    free(device)
    runner = phase(student)
    cached = steps.distill_trainer(student, TeacherCache(cache_dir), targs, **vars_of(loss))
    row(f"stage 1b, cached top-{s.top_k} teacher", runner.bind(cached, one), n1, 6 * s_lm * n1 + image_fwd)
    del runner, cached, student
    free(device)

    # Peer: TRL GKDTrainer and modistill on the text models alone (same vocabulary for both: GKD needs it).
    text_student = upcycle(text_lm(s.student, device, torch.float32, 0), 4, 2, "every-other", seed=0)
    text_teacher = text_lm({**s.teacher, "vocab_size": rows_v}, device, torch.bfloat16, 1).eval().requires_grad_(False)
    set_trainable(text_student, [g for g in MOE_TRAINABLE if g != "projector"])
    ts_lm, tt_lm = active_params(text_student), bl.parameter_count(text_teacher)
    text = {k: one[k] for k in ("input_ids", "attention_mask", "labels")} | {"sample_ids": one["sample_ids"]}
    liger = importlib.util.find_spec("liger_kernel") is not None
    mod = steps.distill_trainer(text_student, LiveTeacher(text_teacher, rows_v), targs, **vars_of(loss))
    runner = steps.StepRunner(text_student, mod)
    text_flops = 6 * ts_lm * n1 + 2 * tt_lm * n1
    row("text only: modistill stage 1b, live teacher", runner.bind(mod, text), n1, text_flops)
    # Built last: GKDTrainer's accelerator.prepare wraps the teacher's forward (fp32 outputs under amp).
    gkd = steps.gkd_trainer(
        text_student, text_teacher, bf16=True, use_cpu=not cuda, per_device_train_batch_size=1, use_liger_kernel=liger
    )
    row(
        f"text only: TRL GKDTrainer{' + Liger' if liger else ''} (lmbda 0, beta 0)",
        runner.bind(gkd, steps.model_batch(text)),
        n1,
        text_flops,
    )

    return report(args, s, device, runs, flops, tokens, started, liger)


def text_lm(sizes: dict, device, dtype, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2ForCausalLM(text_config(sizes)).to(dtype)


def vars_of(loss: SparseKDLoss) -> dict:
    return {k: getattr(loss, k) for k in ("kd_weight", "ce_weight", "balance_coef")}


def report(args, s: Shapes, device, runs, flops, tokens, started, liger: bool) -> dict:
    name = torch.cuda.get_device_name() if device.type == "cuda" else bl.cpu_model()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if device.type == "cuda" else None
    rows = []
    for row_name, r in runs.items():
        achieved = flops[row_name] / r["median_s"]
        mfu = f"{100 * achieved / peak:.1f} %" if peak else "n/a"
        rows.append(
            [row_name, r["median_s"], tokens[row_name] / r["median_s"], r["peak_bytes"] / bl.GB, achieved / 1e12, mfu]
        )
    mem = "peak GB (GPU allocated)" if device.type == "cuda" else "peak GB (process RSS)"
    table = bl.markdown_table(["step", "s/step", "tokens/s", mem, "model TFLOP/s", "MFU"], rows)
    scale = "paper shapes" if s is PAPER else "--tiny (1/32 width, CPU smoke check: not a measurement)"
    notes = [
        f"{scale}; device {name}; sequence {s.length} ({image_tokens(s)} image tokens), one sample per step "
        f"(stage 2: one pair); student fp32 weights under bf16 autocast, teacher bf16; medians of "
        f"{1 if args.quick else args.repeats} steps after one warm-up step.",
        "Model FLOPs: 6 x active student LM parameters x tokens (top-2 of 4 experts counted), 2 x parameters x "
        "tokens for every forward-only pass (vision tower, teacher); attention-score FLOPs left out, so MFU is a "
        "lower bound." + (f" Peak bf16 dense {peak / 1e12:.0f} TFLOP/s." if peak else ""),
        "Peak memory includes every resident model, gradients and AdamW state; the teacher is freed before the "
        "cached-teacher and precomputed-reference rows.",
        f"TRL GKDTrainer {'with' if liger else 'without'} Liger (liger_kernel "
        f"{'installed' if liger else 'not installed'}),"
        " on the text models (its compute_loss passes no image); the teacher there uses the student's vocabulary.",
    ]
    data = {"shapes": s.__dict__, "device": name, "runs": runs, "model_flops": flops, "tokens": tokens}
    return bl.finish(
        "gpu_paper_shapes" + ("_tiny" if args.quick else ""),
        "GPU - stage-1b and stage-2 steps at the paper's shapes (bf16, 2,048 tokens)",
        [table],
        notes,
        data,
        started,
        args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
