"""`modistill cache-teacher CONFIG.yaml`: run the teacher once, store top-k log-probs per response token."""

from __future__ import annotations

from accelerate import PartialState
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modistill.data.conversations import load_conversations
from modistill.io import atomic_output_dir
from modistill.models.load import load_model
from modistill.teacher.cache import TeacherCacheWriter, cache_identity
from modistill.teacher.compat import check_vocab_compatible
from modistill.teacher.fingerprint import model_fingerprint
from modistill.teacher.live import LiveTeacher
from modistill.train.config import CacheConfig
from modistill.train.run import first_samples
from modistill.train.forward import output_head


def run_cache_teacher(cfg: CacheConfig, overwrite: bool = False) -> dict:
    # Models: the student only lends its processor and vocabulary size.
    student = load_model(cfg.student)
    rows = student.model.get_output_embeddings().weight.shape[0]
    processor = student.processor
    del student
    teacher = load_model(cfg.teacher.path, dtype=cfg.teacher.dtype)
    check_vocab_compatible(processor.tokenizer, teacher.tokenizer, rows,
                           teacher.model.get_output_embeddings().weight.shape[0], cfg.teacher.vocab)
    live = LiveTeacher(teacher.model, rows, device=PartialState().device)

    # Data: exactly the samples training will see, rendered for the teacher if its processor differs.
    data = load_conversations(
        cfg.data.train, image_root=cfg.data.image_root, processor=processor, max_length=cfg.data.max_length,
        on_bad_sample=cfg.data.on_bad_sample, report_dir=None, teacher_processor=teacher.processor,
        cache_dir=cfg.data.cache_dir, allow_outside_root=cfg.data.allow_outside_root,
    )
    dataset = first_samples(data.dataset, cfg.data.max_samples)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=data.collator(), shuffle=False)

    identity = cache_identity(cfg.data, processor.tokenizer, rows, cfg.temperature, cfg.top_k,
                              teacher=cfg.teacher.path, teacher_fingerprint=model_fingerprint(cfg.teacher.path))
    weight, bias = output_head(live.model)
    inputs = [cfg.teacher.path, cfg.student, cfg.data.image_root, *cfg.data.train]
    with atomic_output_dir(cfg.output_dir, overwrite, kind="teacher-cache", inputs=inputs,
                           legacy=("manifest.json",)) as tmp:
        writer = TeacherCacheWriter(tmp, identity, shard_size=cfg.shard_size)
        for batch in tqdm(loader, desc="caching teacher", unit="batch"):
            states = live.forward(batch)
            writer.add_batch(batch["sample_ids"], states.hidden, weight, states.targets, states.counts, bias)
        manifest = writer.close()
    print(f"wrote {cfg.output_dir}: {manifest['num_samples']} samples, {manifest['num_tokens']} response tokens, "
          f"{manifest['bytes'] / 1e6:.1f} MB ({manifest['bytes_per_token']} bytes/token, top-{cfg.top_k})")
    return manifest
