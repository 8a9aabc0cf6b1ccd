"""`modistill cache-teacher CONFIG.yaml`: run a mimic stage's teacher once and store its top-k log-probs.

The cache serves one mimic stage (`stage:` names that stage's YAML): the teacher, the data, the
student whose processor renders it and the KD temperature all come from there, so they cannot
disagree with the run that reads the cache (`teacher_cache: DIR` in that stage).
"""

from __future__ import annotations

from dataclasses import dataclass

from accelerate import PartialState
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modistill.config import load_config
from modistill.data.conversations import load_conversations
from modistill.errors import UserError
from modistill.io import atomic_output_dir
from modistill.models.load import load_model
from modistill.models.vocab import check_vocab_compatible
from modistill.runtime.arguments import first_samples
from modistill.runtime.inputs import output_head
from modistill.stages import load_stage_config
from modistill.teacher.cache import TeacherCacheWriter, cache_identity
from modistill.teacher.fingerprint import model_fingerprint
from modistill.teacher.live import LiveTeacher


@dataclass
class CacheConfig:
    stage: str  # the YAML of the mimic stage (1a or 1b) this cache is made for
    output_dir: str
    top_k: int = 32
    batch_size: int = 8
    shard_size: int = 1024  # samples per shard


def load_cache_config(path, overrides: list[str] | None = None) -> CacheConfig:
    return load_config(CacheConfig, path, overrides)


def run_cache_teacher(cfg: CacheConfig, overwrite: bool = False, progress: bool = True) -> dict:
    stage = load_stage_config(cfg.stage)
    if stage.stage not in ("mimic_dense", "mimic_sparse") or stage.teacher is None or stage.student.path is None:
        raise UserError(f"{cfg.stage}: a teacher cache serves a mimic stage with a `teacher` and a `student.path`")
    # Models: the student only lends its processor and vocabulary size (upcycling keeps both).
    student = load_model(stage.student.path)
    rows = student.model.get_output_embeddings().weight.shape[0]
    processor = student.processor
    del student
    teacher = load_model(stage.teacher.path, dtype=stage.teacher.dtype)
    check_vocab_compatible(
        processor.tokenizer,
        teacher.tokenizer,
        rows,
        teacher.model.get_output_embeddings().weight.shape[0],
        stage.teacher.vocab,
    )
    live = LiveTeacher(teacher.model, rows, device=PartialState().device)

    # Data: exactly the samples training will see, rendered for the teacher if its processor differs.
    data_cfg = stage.data
    data = load_conversations(
        data_cfg.train,
        image_root=data_cfg.image_root,
        processor=processor,
        max_length=data_cfg.max_length,
        on_bad_sample=data_cfg.on_bad_sample,
        report_dir=None,
        teacher_processor=teacher.processor,
        cache_dir=data_cfg.cache_dir,
        allow_outside_root=data_cfg.allow_outside_root,
    )
    dataset = first_samples(data.dataset, data_cfg.max_samples)
    # Packed like the stage packs them (data.packing): the same forward, with less padding.
    collator = data.collator(packing=data_cfg.packing)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collator, shuffle=False)

    temperature = stage.loss.temperature
    identity = cache_identity(
        data_cfg,
        processor.tokenizer,
        rows,
        temperature,
        cfg.top_k,
        teacher=stage.teacher.path,
        teacher_fingerprint=model_fingerprint(stage.teacher.path),
    )
    weight, bias = output_head(live.model)
    inputs = [stage.teacher.path, stage.student.path, data_cfg.image_root, *data_cfg.train]
    with atomic_output_dir(
        cfg.output_dir, overwrite, kind="teacher-cache", inputs=inputs, legacy=("manifest.json",)
    ) as tmp:
        writer = TeacherCacheWriter(tmp, identity, shard_size=cfg.shard_size)
        for batch in tqdm(loader, desc="caching teacher", unit="batch", disable=not progress):
            states = live.forward(batch)
            writer.add_batch(batch["sample_ids"], states.hidden, weight, states.targets, states.counts, bias)
        manifest = writer.close()
    print(
        f"wrote {cfg.output_dir}: {manifest['num_samples']} samples, {manifest['num_tokens']} response tokens, "
        f"{manifest['bytes'] / 1e6:.1f} MB ({manifest['bytes_per_token']} bytes/token, top-{cfg.top_k}, "
        f"T={temperature})"
    )
    return manifest
