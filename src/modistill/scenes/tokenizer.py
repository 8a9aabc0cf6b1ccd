"""Train the small tokenizer of a scenes world (byte-level BPE, ChatML special tokens).

Byte-level BPE rather than WordLevel: decoding is lossless for *any* text (a model's broken output,
a user's capitalised question), there is no unknown token, and on this closed grammar the merges
turn every word into a single token anyway — sequences are as short as with a word-level vocabulary
(checked in the tests), for a vocabulary of a few hundred rows instead of a few dozen.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import jinja2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modistill.models.chat import CHATML_TEMPLATE, IM_END, IM_START, IMAGE_TOKEN, PAD_TOKEN

# Fixed ids 0-3, whatever the corpus: pad first so that zero-padding is padding.
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN]


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (pass chat-formatted samples so that merges
    see words as they appear after "\\n" and after a space). The trainer stops early when no merge
    is left: size models with `len(tokenizer)`, not `vocab_size`. Saved to `out_dir` if given."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,  # it would glue "," and "." to words and break round trips
        model_max_length=1024,
    )
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


_TEMPLATE = jinja2.Environment().from_string(CHATML_TEMPLATE)


def chat_text(conversations: list[dict[str, str]]) -> str:
    """A LLaVA conversation rendered by the project's chat template (the tokenizer's corpus)."""
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conversations]
    return _TEMPLATE.render(messages=messages, add_generation_prompt=False)
