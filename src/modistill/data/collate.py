"""Collators: dataset rows -> padded tensors + pixel values, for the student and (if it differs) the teacher.

Right padding with the tokenizer's pad id, labels -100 on padding, `attention_mask` 1 on tokens.
With packing, samples are concatenated (in order) into rows of at most `max_length` tokens and
`position_ids` restart at 0 for each sample: transformers reads that as packed sequences and keeps
attention within each sample (`masking_utils.find_packed_sequence_indices`), so a packed batch gives
each sample the logits it has alone, with less padding.
`pixel_values` stacks every image of the batch in the order its image tokens appear (absent when
the batch has no image), which is what `LlavaForConditionalGeneration` pairs with the image tokens.
Rows from `load_conversations` carry their tokens (rendered once, when the data was validated); a
`PixelCache` keeps processed images for the next epoch. Both only skip repeated work: a batch is
the same tensors as one rendered and processed from scratch.
A teacher whose processor renders differently (another image size, normalisation, token count or
tokenizer) gets its own `teacher_*` tensors; with an identical processor one rendering serves both.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import torch
from PIL import Image

from modistill.data.image_safety import UnsafeImage
from modistill.data.images import open_rgb
from modistill.data.render import IGNORE_INDEX, RenderedSample, Renderer, image_expansion
from modistill.data.validate import SampleProblem
from modistill.errors import UserError


def same_rendering(proc_a: Any, proc_b: Any) -> bool:
    """True when two processors turn every sample into the same tokens and pixels.

    Same class, same tokenizer (vocabulary, merges, added tokens, chat template, pad id), same image
    processor settings (size, crop, normalisation, resampling) and the same image-token expansion.
    """
    if proc_a is proc_b:
        return True
    if type(proc_a) is not type(proc_b):
        return False
    ip_a, ip_b = getattr(proc_a, "image_processor", None), getattr(proc_b, "image_processor", None)
    tok_a = proc_a.tokenizer if ip_a is not None else proc_a
    tok_b = proc_b.tokenizer if ip_b is not None else proc_b
    if not _same_tokenizer(tok_a, tok_b) or (ip_a is None) != (ip_b is None):
        return False
    if ip_a is None:
        return True
    if type(ip_a) is not type(ip_b) or _settings(ip_a) != _settings(ip_b):
        return False
    return image_expansion(proc_a) == image_expansion(proc_b)


def _settings(image_processor: Any) -> Any:
    # JSON round trip: tuples and lists compare equal, numpy scalars become numbers or strings.
    return json.loads(json.dumps(image_processor.to_dict(), sort_keys=True, default=str))


def _same_tokenizer(a: Any, b: Any) -> bool:
    if type(a) is not type(b) or a.chat_template != b.chat_template or a.pad_token_id != b.pad_token_id:
        return False
    back_a, back_b = getattr(a, "backend_tokenizer", None), getattr(b, "backend_tokenizer", None)
    if back_a is not None and back_b is not None:
        return back_a.to_str() == back_b.to_str()  # the whole tokenizer: model, added tokens, normaliser...
    return a.get_vocab() == b.get_vocab()


def pad_batch(seqs: list[RenderedSample], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels, right-padded to `length` (default: the longest)."""
    length = length or max(len(s.input_ids) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(seqs):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(s.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_batch(seqs: list[RenderedSample], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels / position_ids [R, T]: `seqs` packed in order into R rows.

    A row takes samples while they fit in `capacity` tokens (next fit, so the row-major order of the
    response tokens is the order of `seqs`, as the KD targets and the teacher cache expect). Row tails
    are padding whose positions continue the row's last sample: they start no sequence of their own.
    """
    rows: list[list[RenderedSample]] = [[]]
    used = 0
    for s in seqs:
        if rows[-1] and used + len(s.input_ids) > capacity:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += len(s.input_ids)
    length = max(sum(len(s.input_ids) for s in row) for row in rows)
    batch = pad_batch([_concat(row) for row in rows], pad_id, length)
    position_ids = torch.zeros_like(batch["input_ids"])
    for r, row in enumerate(rows):
        positions = [p for s in row for p in range(len(s.input_ids))]
        tail = range(positions[-1] + 1, positions[-1] + 1 + length - len(positions))
        position_ids[r] = torch.tensor(positions + list(tail), dtype=torch.long)
    batch["position_ids"] = position_ids
    return batch


def _concat(row: list[RenderedSample]) -> RenderedSample:
    return RenderedSample(
        input_ids=[t for s in row for t in s.input_ids],
        # A sample's first token is a prompt token (never supervised), so no label crosses samples.
        labels=[t for s in row for t in [IGNORE_INDEX, *s.labels[1:]]],
        images=[p for s in row for p in s.images],
    )


class _ImageLoader:
    """Decodes each path once per batch (a pair's images serve chosen, rejected, student and teacher)."""

    def __init__(self) -> None:
        self.cache: dict[str, Image.Image] = {}

    def __call__(self, path: str, row: dict[str, Any]) -> Image.Image:
        if path not in self.cache:
            try:
                self.cache[path] = open_rgb(path)  # regular files within the pixel bound only, upright RGB
            except (OSError, SyntaxError, ValueError, UnsafeImage, Image.DecompressionBombError) as exc:
                raise UserError(f"{_where(row)}: cannot load image {path} ({exc})") from None
        return self.cache[path]


def pixel_values(renderer: Renderer, images: list[Image.Image]) -> torch.Tensor:
    assert renderer.image_processor is not None  # only samples with images reach here (validated)
    pixels = renderer.image_processor(images=images, return_tensors="pt")["pixel_values"]
    if tuple(pixels.shape[1:]) != renderer.pixel_shape:
        raise UserError(
            f"the image processor gave pixels of shape {tuple(pixels.shape[1:])}, expected {renderer.pixel_shape}: "
            "modistill supports image processors that resize every image to one size"
        )
    return pixels


def _where(row: dict[str, Any]) -> str:
    return f"{row.get('source', '?')}: sample {row.get('id', '?')}"


def _render(fn: Any, row: dict[str, Any]) -> Any:
    try:
        return fn(row)
    except SampleProblem as exc:  # the data validated; a renderer with other settings than the loader's
        raise UserError(f"{_where(row)}: {exc} (collate with the renderer the data was loaded with)") from None


class PixelCache:
    """Processed pixels [C, H, W] per image path, the least recently used dropped past `max_mb` MiB.

    For runs of several epochs on small images (the demo: 27 KiB per 48x48 image, each seen 2-3
    times), where decoding and processing every image again is a tenth of a step on the CPU.
    """

    def __init__(self, max_mb: float) -> None:
        if max_mb < 0:
            raise UserError(f"data.image_cache_mb must be >= 0 (0 = off), not {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, path: str) -> torch.Tensor | None:
        pixels = self.entries.get(path)
        if pixels is not None:
            self.entries.move_to_end(path)
        return pixels

    def put(self, path: str, pixels: torch.Tensor) -> None:
        size = pixels.numel() * pixels.element_size()
        if size > self.max_bytes or path in self.entries:
            return
        self.entries[path] = pixels
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()


def _images_of(
    renderer: Renderer, rows: list[dict[str, Any]], load: _ImageLoader, cache: PixelCache | None = None
) -> dict[str, torch.Tensor]:
    wanted = [(path, row) for row in rows for path in row.get("images") or []]
    if not wanted:
        return {}
    if cache is None:
        return {"pixel_values": pixel_values(renderer, [load(path, row) for path, row in wanted])}
    found: dict[str, torch.Tensor] = {}
    for path, _ in wanted:
        if (hit := cache.get(path)) is not None:
            found[path] = hit
    missing = {path: row for path, row in wanted if path not in found}  # each path once, in order
    cache.hits += len(wanted) - len(missing)
    cache.misses += len(missing)
    if missing:
        # The image processor treats each image on its own, so processing only the misses gives the
        # same pixels as processing the whole batch.
        fresh = pixel_values(renderer, [load(path, row) for path, row in missing.items()])
        for path, pixels in zip(missing, fresh):
            own = pixels.clone()  # its own storage: the batch tensor is not kept alive
            found[path] = own
            cache.put(path, own)
    return {"pixel_values": torch.stack([found[path] for path, _ in wanted])}


def _pretokenized(row: dict[str, Any], prefix: str) -> RenderedSample:
    try:
        return RenderedSample(input_ids=row[prefix + "input_ids"], labels=row[prefix + "labels"], images=row["images"])
    except KeyError:
        raise UserError(
            f"{_where(row)}: the row has no {prefix}input_ids; pretokenized collation needs rows from "
            "load_conversations (or collate with pretokenized=False)"
        ) from None


class ConversationCollator:
    """Rows `{"id", "source", "images", "messages"}` -> a training batch.

    Keys: input_ids, attention_mask, labels [B, T] (long); pixel_values [n_images, C, H, W] if any
    image; sample_ids (list of str). With a teacher that renders differently: teacher_input_ids,
    teacher_attention_mask, teacher_labels [B, T'] and teacher_pixel_values. With `packing`: R <= B
    rows of at most the renderer's max_length tokens, and position_ids (teacher_position_ids) [R, T].
    `pretokenized`: take each row's tokens from its `input_ids`/`labels` (`teacher_*`) columns, which
    `load_conversations` rendered with these same renderers. `image_cache_mb` > 0 keeps processed
    images (`PixelCache`, one per renderer) for later batches.
    """

    def __init__(
        self,
        student_renderer: Renderer,
        teacher_renderer: Renderer | None = None,
        packing: bool = False,
        pretokenized: bool = False,
        image_cache_mb: float = 0,
    ) -> None:
        self.student = student_renderer
        self.teacher = teacher_renderer
        self.packing = packing
        self.pretokenized = pretokenized
        if teacher_renderer is not None and same_rendering(student_renderer.processor, teacher_renderer.processor):
            self.teacher = None
        self.pixel_caches = {p: PixelCache(image_cache_mb) for p in ("", "teacher_")} if image_cache_mb else {}

    def _batch(self, seqs: list[RenderedSample], renderer: Renderer) -> dict[str, torch.Tensor]:
        pad_id = renderer.tokenizer.pad_token_id
        if not self.packing:
            return pad_batch(seqs, pad_id)
        return pack_batch(seqs, pad_id, renderer.max_length or max(len(s.input_ids) for s in seqs))

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        load = _ImageLoader()
        batch: dict[str, Any] = {}
        for prefix, renderer in (("", self.student), ("teacher_", self.teacher)):
            if renderer is None:
                continue
            if self.pretokenized:
                seqs = [_pretokenized(row, prefix) for row in rows]
            else:
                seqs = [_render(renderer.render_conversation, row) for row in rows]
            images = _images_of(renderer, rows, load, self.pixel_caches.get(prefix))
            parts = {**self._batch(seqs, renderer), **images}
            batch.update({prefix + k: v for k, v in parts.items()})
        batch["sample_ids"] = [str(row["id"]) for row in rows]
        return batch


class PreferenceCollator:
    """Rows `{"id", "source", "images", "prompt", "chosen", "rejected"}` -> a preference batch.

    Keys: chosen_input_ids, chosen_attention_mask, chosen_labels, rejected_input_ids,
    rejected_attention_mask, rejected_labels [B, T] — chosen and rejected padded to one length T so
    they can be concatenated into one forward of 2B rows; pixel_values [n_images, C, H, W] holds
    each pair's images once (repeat it for such a forward); sample_ids. With a teacher that renders
    differently: the same keys prefixed `teacher_` (teacher_chosen_input_ids, ..., teacher_pixel_values).
    """

    def __init__(self, student_renderer: Renderer, teacher_renderer: Renderer | None = None) -> None:
        self.student = student_renderer
        self.teacher = teacher_renderer
        if teacher_renderer is not None and same_rendering(student_renderer.processor, teacher_renderer.processor):
            self.teacher = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        load = _ImageLoader()
        batch: dict[str, Any] = {}
        for prefix, renderer in (("", self.student), ("teacher_", self.teacher)):
            if renderer is None:
                continue
            pairs = [_render(renderer.render_preference, row) for row in rows]
            length = max(len(s.input_ids) for pair in pairs for s in pair)
            pad_id = renderer.tokenizer.pad_token_id
            for side, seqs in (("chosen_", [p[0] for p in pairs]), ("rejected_", [p[1] for p in pairs])):
                batch.update({prefix + side + k: v for k, v in pad_batch(seqs, pad_id, length).items()})
            batch.update({prefix + k: v for k, v in _images_of(renderer, rows, load).items()})
        batch["sample_ids"] = [str(row["id"]) for row in rows]
        return batch
