"""Chat templates: the one modistill gives tokenizers that have none (ChatML), and a wrapper that makes
any base LLM's template accept the multimodal message format.

A text LLM's template (SmolLM2, Qwen2/2.5, Llama-3) concatenates `message['content']` as a string,
so `processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
"text": "..."}]}])` raises TypeError inside it. `accept_content_parts` prepends a small Jinja prelude
that rebinds `messages` to copies whose list content is flattened to a string (an image part becomes
the image token where it stands, text parts their text), then runs the base template unchanged.
Why a prelude and not a rewrite of the base template's `message['content']` expressions: templates
spell the access many ways (`message.content`, `messages[0]['content']`, `loop_messages[i]`, macros)
and a textual rewrite misses some; rebinding the input covers them all and keeps the base template's
roles, system prompt, BOS and end-of-turn tokens byte for byte. String content (LLaVA data with
`<image>` tags, what training renders) passes through untouched, so both formats give the same text.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"

# Content may be a string holding "<image>" tags (LLaVA data) or a list of typed parts
# ({"type": "image"} / {"type": "text", "text": ...}), as processors' apply_chat_template passes it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONTENT_PARTS_MARK = "{#- modistill: content parts flattened to text -#}"

# Tags only, no text between them and no whitespace control, so the prelude emits nothing and cannot
# eat the base template's own leading whitespace; it ends with an (empty) expression rather than a block
# tag because `trim_blocks` (on in transformers' environment) would drop a newline that follows a block.
# `dict(m, content=...)` keeps every other key of a message (tool_calls, name, ...).
_PRELUDE = (
    "{% set _mdst = namespace(messages=[]) %}"
    "{% for _m in messages %}"
    "{% if _m['content'] is defined and _m['content'] is not string and _m['content'] is iterable"
    " and _m['content'] is not mapping %}"
    "{% set _txt = namespace(s='') %}"
    "{% for _p in _m['content'] %}"
    "{% if _p is string %}{% set _txt.s = _txt.s + _p %}"
    "{% elif _p['type'] == 'image' %}{% set _txt.s = _txt.s + IMAGE_TOKEN_TEXT %}"
    "{% elif _p['type'] == 'text' %}{% set _txt.s = _txt.s + _p['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% set _mdst.messages = _mdst.messages + [dict(_m, content=_txt.s)] %}"
    "{% else %}{% set _mdst.messages = _mdst.messages + [_m] %}{% endif %}"
    "{% endfor %}"
    "{% set messages = _mdst.messages %}"
    "{{ '' }}"
)


def accept_content_parts(template: str | dict[str, str], image_token: str = IMAGE_TOKEN) -> str | dict[str, str]:
    """`template` made to accept content lists with image/text parts (idempotent; named templates each)."""
    if isinstance(template, dict):
        return {name: str(accept_content_parts(t, image_token)) for name, t in template.items()}
    if CONTENT_PARTS_MARK in template or template == CHATML_TEMPLATE:
        return template  # already done, or modistill's own template (which reads parts itself)
    prelude = _PRELUDE.replace("IMAGE_TOKEN_TEXT", _jinja_string(image_token))
    return CONTENT_PARTS_MARK + prelude + template


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
