"""Teacher/student tokenizer compatibility, checked before the first step (and by `data check --teacher`).

Distillation compares distributions over the *same* token ids, so the tokenizers must agree on
every student token id. A teacher may have extra output rows only if they are unused padding
(e.g. Qwen2-7B has 152,064 rows for 151,646 tokens, Qwen2-0.5B 151,936): those are dropped
before the softmax when the config says `teacher.vocab: truncate`.
"""

from __future__ import annotations

from modistill.errors import UserError


def check_vocab_compatible(
    student_tokenizer,
    teacher_tokenizer,
    student_rows: int,
    teacher_rows: int,
    mode: str = "exact",
    names: tuple[str, str] | None = None,
) -> None:
    """Raise a UserError naming the first disagreement; return None when distillation is sound.

    `names` (student, teacher) label the tokenizers in the message; default: their `name_or_path`.
    """
    s_by_id, t_by_id = check_same_token_ids(student_tokenizer, teacher_tokenizer, names)
    extra_tokens = sorted(i for i in t_by_id if i not in s_by_id)
    if extra_tokens:
        raise UserError(
            f"the teacher's tokenizer has {len(extra_tokens)} tokens the student's lacks (first id {extra_tokens[0]}: "
            f"{t_by_id[extra_tokens[0]]!r}); add them to the student's tokenizer and resize its embeddings"
        )
    if teacher_rows < student_rows:
        raise UserError(
            f"the teacher has {teacher_rows} output rows, fewer than the student's {student_rows}; "
            f"resize the student's embeddings to {teacher_rows} or pad the teacher's"
        )
    if teacher_rows > student_rows:
        used = max(t_by_id) + 1 if t_by_id else 0
        if used > student_rows:
            raise UserError(
                f"teacher rows {student_rows}..{used - 1} are real tokens, not padding; they cannot be dropped"
            )
        if mode != "truncate":
            raise UserError(
                f"the teacher has {teacher_rows} output rows, the student {student_rows}; rows {student_rows}.. are "
                f"unused padding: set `teacher.vocab: truncate` to drop them before the softmax"
            )


def check_same_token_ids(
    student_tokenizer, teacher_tokenizer, names: tuple[str, str] | None = None
) -> tuple[dict[int, str], dict[int, str]]:
    """Raise a one-line UserError unless every student token id means the same token to the teacher.

    Needs the tokenizers only (no weights), so commands can refuse before loading models or writing
    anything. Returns both id -> token maps for further checks.
    """
    s_by_id = {i: tok for tok, i in student_tokenizer.get_vocab().items()}
    t_by_id = {i: tok for tok, i in teacher_tokenizer.get_vocab().items()}
    differing = [i for i in sorted(s_by_id) if t_by_id.get(i) != s_by_id[i]]
    if differing:
        s_name, t_name = names or (_name(student_tokenizer), _name(teacher_tokenizer))
        shown = ", ".join(f"{i}: student {s_by_id[i]!r} vs teacher {t_by_id.get(i)!r}" for i in differing[:3])
        raise UserError(
            f"teacher tokenizer {t_name} ({len(t_by_id):,} tokens) and student tokenizer {s_name} "
            f"({len(s_by_id):,} tokens) disagree on {len(differing):,} token ids (first: {shown}); "
            "distillation needs the same vocabulary: use a teacher and student from one tokenizer family"
        )
    return s_by_id, t_by_id


def _name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_tokenizer_sources(student: str, teacher: str, prepare_student: bool = False) -> None:
    """`check_same_token_ids` on the tokenizers of two sources (model dirs, hub ids, `.gguf` files).

    Commands call it first, so a teacher from another family is refused in a second, before any
    model is loaded or output written. `prepare_student`: the student is still to be built, and its
    tokenizer gains what modistill adds to a base tokenizer (the image token, a pad token).
    """
    from modistill.models.processor import load_tokenizer, prepare_tokenizer

    student_tokenizer = load_tokenizer(student)
    if prepare_student:
        prepare_tokenizer(student_tokenizer)
    check_same_token_ids(student_tokenizer, load_tokenizer(teacher), names=(student, teacher))
