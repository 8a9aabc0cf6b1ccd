"""Where the mimic stages' teacher targets come from: the live teacher, or its offline cache.

Both are `TeacherSource`s: given a batch and the student's response states, they return the
teacher's side of the KD loss for the same rows (`TeacherHidden` live, `TeacherTopK` cached).
"""

from __future__ import annotations

from typing import Protocol

from modistill.losses.teachers import TeacherHidden, TeacherTopK
from modistill.models.load import load_model
from modistill.models.vocab import check_vocab_compatible
from modistill.runtime.config import DataConfig, TeacherConfig
from modistill.runtime.inputs import ResponseStates
from modistill.teacher.cache import TeacherCache, cache_identity
from modistill.teacher.live import LiveTeacher


class TeacherSource(Protocol):
    def targets(self, batch: dict, student: ResponseStates) -> TeacherHidden | TeacherTopK: ...


def open_teacher(
    teacher: TeacherConfig | None,
    cache_dir: str | None,
    processor,
    student_rows: int,
    data: DataConfig,
    temperature: float,
) -> tuple[TeacherSource, object | None]:
    """The teacher source of a mimic stage and the teacher's processor (None: the student's serves).

    A cache wins over a live teacher; it is refused when it was made for other data, another
    tokenizer, vocabulary size or temperature. A live teacher is loaded frozen in its own dtype,
    after its vocabulary is checked against the student's.
    """
    if cache_dir is not None:
        expected = cache_identity(data, processor.tokenizer, student_rows, temperature)
        return TeacherCache(cache_dir, expected=expected), None
    assert teacher is not None  # the stage configs require a teacher or a cache
    loaded = load_model(teacher.path, dtype=teacher.dtype)
    check_vocab_compatible(
        processor.tokenizer,
        loaded.tokenizer,
        student_rows,
        loaded.model.get_output_embeddings().weight.shape[0],
        teacher.vocab,
    )
    return LiveTeacher(loaded.model, student_rows), loaded.processor
