"""Teacher/student compatibility, checked before the first step.

Distillation compares distributions over the *same* token ids, so the tokenizers must agree on
every student token id. A teacher may have extra output rows only if they are unused padding
(e.g. Qwen2-7B has 152,064 rows for 151,646 tokens, Qwen2-0.5B 151,936): those are dropped
before the softmax when the config says `teacher.vocab: truncate`.
"""

from __future__ import annotations

from modistill.errors import UserError


def check_vocab_compatible(
    student_tokenizer, teacher_tokenizer, student_rows: int, teacher_rows: int, mode: str = "exact"
) -> None:
    """Raise a UserError naming the first disagreement; return None when distillation is sound."""
    s_vocab = student_tokenizer.get_vocab()
    t_vocab = teacher_tokenizer.get_vocab()
    s_by_id = {i: tok for tok, i in s_vocab.items()}
    t_by_id = {i: tok for tok, i in t_vocab.items()}
    differing = [i for i in sorted(s_by_id) if t_by_id.get(i) != s_by_id[i]]
    if differing:
        shown = ", ".join(f"{i}: student {s_by_id[i]!r} vs teacher {t_by_id.get(i)!r}" for i in differing[:3])
        raise UserError(
            f"teacher and student tokenizers disagree on {len(differing)} token ids (first: {shown}); "
            f"distillation needs the same vocabulary: use a teacher and student from one tokenizer family"
        )
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
