"""Do teacher and student share one vocabulary? Distillation compares their distributions token by
token and RePAIR mining feeds the student's token ids to the teacher, so the training check
(``validate``, the plugin), mining and the teacher cache all ask, from tokenizer files and configs
only (no weights) or from loaded tokenizers and lm_head sizes."""

from __future__ import annotations

__all__ = ["check_teacher_before_loading", "check_vocab_compat", "vocab_problems"]

_VOCAB_SAMPLE = ("the", " the", "The", "\n", " of", ".", ",", " and", "0", " 1", "ing", " a")


def vocab_problems(student_tokenizer, teacher_tokenizer) -> list[str]:
    """Differences between two tokenizers: length, and the ids of a sample of common tokens."""
    if len(student_tokenizer) != len(teacher_tokenizer):
        return [f"tokenizer length: student {len(student_tokenizer)}, teacher {len(teacher_tokenizer)}"]
    for text in _VOCAB_SAMPLE:
        ids_s = student_tokenizer.encode(text, add_special_tokens=False)
        ids_t = teacher_tokenizer.encode(text, add_special_tokens=False)
        if ids_s != ids_t:
            return [f"token ids of {text!r}: student {ids_s}, teacher {ids_t}"]
    return []


def check_vocab_compat(student_tokenizer=None, teacher_tokenizer=None,
                       student_vocab: int | None = None, teacher_vocab: int | None = None) -> None:
    """Raise a clear error unless teacher and student share one vocabulary.

    Compares whatever is given: the tokenizers (length, ids of sample tokens) and the vocabulary
    sizes (config ``vocab_size`` before loading, lm_head rows after).
    """
    problems = []
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        problems.append(f"vocabulary size / lm_head rows: student {student_vocab}, teacher {teacher_vocab}")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        problems += vocab_problems(student_tokenizer, teacher_tokenizer)
    if problems:
        raise ValueError(
            "focus_teacher_model: the teacher does not share the student's vocabulary ("
            + "; ".join(problems)
            + "). Distillation compares distributions token by token, so use the unpruned model "
            "the student was pruned from (same tokenizer), or set `focus_distill: none`."
        )


def check_teacher_before_loading(student_path: str, student_tokenizer_path: str | None, teacher_path: str) -> None:
    """Cheap pre-flight check (tokenizers and configs only) before any weights are loaded."""
    from transformers import AutoConfig, AutoTokenizer  # heavy: only when a check runs

    check_vocab_compat(
        AutoTokenizer.from_pretrained(student_tokenizer_path or student_path),
        AutoTokenizer.from_pretrained(teacher_path),
        AutoConfig.from_pretrained(student_path, trust_remote_code=True).vocab_size,
        AutoConfig.from_pretrained(teacher_path, trust_remote_code=True).vocab_size,
    )
