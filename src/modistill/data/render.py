"""Chat rendering: messages -> token ids, response labels, expanded image tokens, truncation.

The text goes through the tokenizer's own chat template (content is a string holding `<image>`
tags). Which tokens are supervised is found by rendering prefixes: the text of messages[:i] with
the generation prompt must be a prefix of the text of messages[:i+1]; what lies between is the
assistant's answer, supervised up to and including its end-of-turn token (the first special token
after the answer, e.g. `<|im_end|>`). This needs no `{% generation %}` markers, which real
templates (Qwen2's) lack. Each `<image>` tag then becomes the processor's own expansion (what
`LlavaProcessor` inserts: N copies of the image token), never supervised.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import jinja2
from PIL import Image

from modistill.data.validate import (
    ALL_MASKED,
    IMAGE_TAG_MISMATCH,
    IMAGE_TRUNCATED,
    MALFORMED_SAMPLE,
    NO_ASSISTANT,
    NO_VISION,
    TEMPLATE_REJECTS,
    SampleProblem,
)
from modistill.errors import UserError
from modistill.models.chat import IMAGE_TOKEN

IGNORE_INDEX = -100


class TemplateError(UserError):
    """The chat template cannot be used to find the answer tokens (it rewrites earlier turns)."""


@dataclass
class RenderedSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except answer tokens (and their end-of-turn token)
    images: list[str]  # paths, in the order of their image tokens
    num_image_tokens: int = 0
    truncated: bool = False

    @property
    def num_response_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def response_tokens(self) -> list[int]:
        return [label for label in self.labels if label != IGNORE_INDEX]


def image_expansion(processor: Any) -> tuple[list[int], tuple[int, ...]]:
    """The token ids one image tag becomes, and the pixel shape of one image, for this processor.

    Asks the processor itself (`replace_image_token` on a processed dummy image, as its
    `__call__` does), so the count follows its patch size, `num_additional_image_tokens`,
    `vision_feature_select_strategy` and image size.
    """
    ip = processor.image_processor
    size = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
    side = max([v for v in dict(size).values() if isinstance(v, int)] or [224])
    processed = ip(images=[Image.new("RGB", (side, side))], return_tensors="np")
    try:
        text = processor.replace_image_token(processed, 0)
    except (AttributeError, NotImplementedError):
        raise UserError(
            f"{type(processor).__name__} is not supported: modistill renders for LlavaProcessor-style processors"
        ) from None
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    return ids, tuple(processed["pixel_values"].shape[1:])


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of what a tokenizer does, not where it was loaded from.

    Each stage loads the tokenizer from its own model directory; naming it by content lets the
    demo's teacher and student stages share one cached dataset (one validation pass of the data, not four).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()  # vocabulary, merges, added tokens, normaliser, pre-tokenizer
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


class Renderer:
    """Renders normalised samples for one processor (a `LlavaProcessor`, or a tokenizer for text-only models).

    Samples are dataset rows: conversations `{"messages": [{"role", "content"}], "images": [paths]}`,
    pairs `{"prompt": [...], "chosen": [...], "rejected": [...], "images": [paths]}`.
    Raises `SampleProblem` for a sample that cannot be trained on, `TemplateError` for a template
    that breaks the prefix property.
    """

    def __init__(self, processor: Any, max_length: int | None = None) -> None:
        if max_length is not None and max_length < 2:
            raise UserError(f"max_length must be at least 2, not {max_length}")
        self.processor = processor
        self.max_length = max_length
        self.image_processor = getattr(processor, "image_processor", None)
        self.tokenizer = processor.tokenizer if self.image_processor is not None else processor
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(
                f"tokenizer {self.tokenizer.name_or_path!r} has no chat template; give it one "
                "(modistill.models.processor.prepare_tokenizer adds ChatML)"
            )
        if self.tokenizer.pad_token_id is None:
            raise UserError(f"tokenizer {self.tokenizer.name_or_path!r} has no pad token; set tokenizer.pad_token")
        if self.image_processor is not None:
            self.image_token: str = processor.image_token
            self.image_token_id: int | None = processor.image_token_id
            self.image_expansion, self.pixel_shape = image_expansion(processor)
        else:
            self.image_token, self.image_token_id, self.image_expansion, self.pixel_shape = IMAGE_TOKEN, None, [], ()
        # Strings of special tokens, to find the end-of-turn token after an answer.
        self._specials = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]

    @property
    def tokens_per_image(self) -> int:
        return len(self.image_expansion)

    def signature(self) -> dict[str, Any]:
        """What the renderings depend on (for cache fingerprints)."""
        ip = self.image_processor.to_dict() if self.image_processor is not None else None
        return {
            "tokenizer": tokenizer_identity(self.tokenizer),
            "vocab": len(self.tokenizer),
            "template": self.tokenizer.chat_template,
            "expansion": self.image_expansion,
            "image_processor": json.dumps(ip, sort_keys=True, default=str),
            "max_length": self.max_length,
        }

    # ------------------------------------------------------------ public rendering

    def render_conversation(self, sample: dict[str, Any]) -> RenderedSample:
        """Every assistant turn supervised."""
        return self.render_messages(sample["messages"], list(sample.get("images") or []))

    def render_preference(self, pair: dict[str, Any]) -> tuple[RenderedSample, RenderedSample]:
        """(chosen, rejected): the shared prompt then each continuation; only the continuation supervised."""
        prompt, images = pair["prompt"], list(pair.get("images") or [])
        rendered = []
        for side in ("chosen", "rejected"):
            try:
                rendered.append(self.render_messages(prompt + pair[side], images, supervise_from=len(prompt)))
            except SampleProblem as exc:
                raise SampleProblem(exc.reason, f"{side}: {exc.detail}") from None
        return rendered[0], rendered[1]

    def render_messages(
        self, messages: list[dict[str, str]], images: list[str], supervise_from: int = 0
    ) -> RenderedSample:
        """Token ids and labels of `messages`; assistant turns at index >= `supervise_from` are supervised."""
        if not messages or messages[-1]["role"] != "assistant":
            raise SampleProblem(NO_ASSISTANT, "the conversation does not end with an assistant answer")
        answers = [i for i in range(supervise_from, len(messages)) if messages[i]["role"] == "assistant"]
        if not answers:
            raise SampleProblem(NO_ASSISTANT, "no assistant answer to learn from")
        if answers[0] == 0:
            raise SampleProblem(MALFORMED_SAMPLE, "the conversation starts with an assistant turn; ask something first")
        if images and self.image_token_id is None:
            raise SampleProblem(NO_VISION, f"{len(images)} image(s), but the model has no image processor")
        if self.image_token != IMAGE_TOKEN:  # data marks images with "<image>"; this tokenizer spells it otherwise
            messages = [{**m, "content": m["content"].replace(IMAGE_TOKEN, self.image_token)} for m in messages]
        full = self._text(messages, generation_prompt=False)
        spans = [self._answer_span(messages, i, full) for i in answers]
        # One tokenizer call for the text and every answer boundary (prefixes of the text).
        encoded = self._encode([full] + [full[:c] for span in spans for c in span])
        ids = encoded[0]
        labels = [IGNORE_INDEX] * len(ids)
        for k in range(len(spans)):
            start_ids, end_ids = encoded[1 + 2 * k], encoded[2 + 2 * k]
            # Tokens up to a boundary are normally a prefix of the whole; a token merging across
            # the boundary is kept on the answer's side.
            start = _common_prefix(start_ids, ids)
            end = _common_prefix(end_ids, ids)
            end += end < len(end_ids)
            labels[start:end] = ids[start:end]
        n_tags = ids.count(self.image_token_id) if self.image_token_id is not None else 0
        if n_tags != len(images):
            raise SampleProblem(IMAGE_TAG_MISMATCH, f"{n_tags} <image> tag(s) for {len(images)} image(s)")
        ids, labels, image_end = self._expand_images(ids, labels)
        return self._truncate(
            RenderedSample(ids, labels, images, num_image_tokens=len(images) * self.tokens_per_image), image_end
        )

    def render_prompt(self, messages: list[dict[str, str]], images: list[str]) -> list[int]:
        """Token ids of `messages` followed by the generation prompt (what a model answers from), images expanded.

        The same text `render_messages` finds an answer's start with, so a rendering of these
        messages plus an answer begins with these ids (on-policy sampling relies on it).
        """
        if self.image_token != IMAGE_TOKEN:
            messages = [{**m, "content": m["content"].replace(IMAGE_TOKEN, self.image_token)} for m in messages]
        ids = self._encode([self._text(messages, generation_prompt=True)])[0]
        n_tags = ids.count(self.image_token_id) if self.image_token_id is not None else 0
        if n_tags != len(images):
            raise SampleProblem(IMAGE_TAG_MISMATCH, f"{n_tags} <image> tag(s) for {len(images)} image(s)")
        return self._expand_images(ids, [IGNORE_INDEX] * len(ids))[0]

    # ------------------------------------------------------------ internals

    def _text(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except (jinja2.TemplateError, ValueError, TypeError) as exc:  # raise_exception("roles must alternate"...)
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SampleProblem(TEMPLATE_REJECTS, why) from None

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # As apply_chat_template(tokenize=True) does: the template writes any BOS itself.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _answer_span(self, messages: list[dict[str, str]], i: int, full: str) -> tuple[int, int]:
        """Character span in `full` of answer i: from after the generation prompt to its end-of-turn token."""
        prompt = self._text(messages[:i], generation_prompt=True)
        upto = full if i == len(messages) - 1 else self._text(messages[: i + 1], generation_prompt=False)
        if not upto.startswith(prompt) or not full.startswith(upto):
            raise TemplateError(
                f"the chat template of {self.tokenizer.name_or_path!r} breaks the prefix property (rendering "
                f"{i} messages + generation prompt is not a prefix of rendering {i + 1}, or a later turn rewrites "
                "earlier ones); answer tokens cannot be found. Use a template that renders turns append-only"
            )
        answer = upto[len(prompt) :]
        content = messages[i]["content"]
        pos, length = answer.find(content), len(content)
        if pos < 0:  # templates that trim the content
            pos, length = answer.find(content.strip()), len(content.strip())
        if pos < 0:
            raise TemplateError(
                f"the chat template of {self.tokenizer.name_or_path!r} does not render assistant text verbatim; "
                "answer tokens cannot be found"
            )
        end = pos + length
        found = [answer.find(s, end) for s in self._specials]
        hits = [(p, -len(s)) for p, s in zip(found, self._specials) if p >= 0]
        if hits:  # the end-of-turn token: the first special token after the answer (longest if tied)
            p, neg_len = min(hits)
            end = p - neg_len
        return len(prompt), len(prompt) + end

    def _expand_images(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int], int]:
        """Replace each image token by the processor's expansion; return also where the last image ends."""
        if not self.image_expansion or self.image_token_id not in ids:
            return ids, labels, 0
        out_ids: list[int] = []
        out_labels: list[int] = []
        last_image_end = 0
        for tok, label in zip(ids, labels):
            if tok == self.image_token_id:
                out_ids.extend(self.image_expansion)
                out_labels.extend([IGNORE_INDEX] * len(self.image_expansion))
                last_image_end = len(out_ids)
            else:
                out_ids.append(tok)
                out_labels.append(label)
        return out_ids, out_labels, last_image_end

    def _truncate(self, sample: RenderedSample, image_end: int) -> RenderedSample:
        """Cut the tail to max_length; never through image tokens, never to zero supervised tokens."""
        limit = self.max_length
        if limit is not None and len(sample.input_ids) > limit:
            if image_end > limit:
                raise SampleProblem(
                    IMAGE_TRUNCATED,
                    f"{len(sample.input_ids)} tokens, image tokens end at {image_end} > max_length {limit}",
                )
            sample.input_ids = sample.input_ids[:limit]
            sample.labels = sample.labels[:limit]
            sample.truncated = True
        if sample.num_response_tokens == 0:
            raise SampleProblem(
                ALL_MASKED,
                f"no answer token within max_length {limit}" if sample.truncated else "no answer token",
            )
        return sample


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n
