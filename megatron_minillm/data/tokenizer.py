"""Tokenizers behind one small interface, and the teacher/student compatibility check.

A tokenizer comes from a Hugging Face tokenizer directory, a megatron_minillm checkpoint directory
(it keeps the HF tokenizer files next to config.json) or a raw sentencepiece ``.model`` file.
``encode`` never adds special tokens: the templates and ``append_eos`` decide where they go.
Distillation compares teacher and student distributions token id by token id, so the trainer
calls :func:`check_tokenizers_compatible` before anything else.
"""

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path

# Any of these makes a directory a Hugging Face tokenizer directory.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class TokenizerError(ValueError):
    """A path that holds no usable tokenizer."""


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers (or padded vocabularies) that distillation cannot pair, or a
    dataset tokenized with another vocabulary than the model's."""


class Tokenizer(ABC):
    """What the data tools, the trainer and the evaluator need from a tokenizer."""

    path: str
    eos_id: int
    bos_id: int | None
    pad_id: int  # the tokenizer's pad token, else EOS (as LMOps pads with EOS)
    vocab_size: int  # number of token ids, added tokens included
    has_chat_template: bool = False

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def tokens(self) -> list[str | None]:
        """The string of every token id (None for an id the vocabulary does not map)."""

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        raise TokenizerError(f"{self.path}: this tokenizer has no chat template")

    def fingerprint(self) -> str:
        """SHA-256 of the token strings in id order: the same vocabulary gives the same value however it
        is loaded (HF directory, checkpoint), any other vocabulary another; datasets record it."""
        return hashlib.sha256(json.dumps(self.tokens()).encode()).hexdigest()


class HFTokenizer(Tokenizer):
    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise TokenizerError(f"{self.path}: cannot load the Hugging Face tokenizer: {err}") from err
        if self._tok.eos_token_id is None:
            raise TokenizerError(f"{self.path}: the tokenizer has no EOS token; responses need one to end")
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self._tok)
        self.has_chat_template = bool(self._tok.chat_template)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def tokens(self) -> list[str | None]:
        return self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if not self.has_chat_template:
            return super().apply_chat_template(messages)
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece

        self.path = str(model_file)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{self.path}: not a sentencepiece model: {err}") from err
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"{self.path}: the sentencepiece model has no EOS piece")
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # sentencepiece never writes control pieces (bos/eos/pad) as text.
        return self._sp.decode(list(ids))

    def tokens(self) -> list[str | None]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from an HF tokenizer or checkpoint directory, or a sentencepiece ``.model`` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir():
        if any((path / name).is_file() for name in HF_TOKENIZER_FILES):
            return HFTokenizer(path)
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path / "tokenizer.model")
    what = "no such file or directory" if not path.exists() else "found no tokenizer there"
    raise TokenizerError(
        f"{path}: {what}; give a Hugging Face tokenizer directory "
        f"({' or '.join(HF_TOKENIZER_FILES)}), a megatron_minillm checkpoint directory "
        "or a sentencepiece .model file"
    )


def check_tokenizers_compatible(
    teacher: Tokenizer, student: Tokenizer, padded_vocab_teacher: int, padded_vocab_student: int, tp: int
) -> None:
    """Raise :class:`TokenizerMismatchError` unless token id i means the same token for both models.

    Checks, in order: the token strings id by id (naming the first id that differs), the vocabulary
    sizes, the EOS/BOS/pad ids, and the padded vocabularies: equal (teacher and student logits are
    compared column by column, TP-sharded the same way), divisible by ``tp``, holding the vocabulary.
    """
    names = f"teacher ({teacher.path}) and student ({student.path})"
    teacher_tokens, student_tokens = teacher.tokens(), student.tokens()
    for i, (a, b) in enumerate(zip(teacher_tokens, student_tokens)):
        if a != b:
            raise TokenizerMismatchError(
                f"token id {i} is {a!r} in the teacher ({teacher.path}) and {b!r} in the student ({student.path})"
            )
    if teacher.vocab_size != student.vocab_size:
        longer, extra = (
            ("teacher", teacher_tokens) if teacher.vocab_size > student.vocab_size else ("student", student_tokens)
        )
        common = min(teacher.vocab_size, student.vocab_size)
        raise TokenizerMismatchError(
            f"vocabulary sizes differ: {names} have {teacher.vocab_size} and "
            f"{student.vocab_size} tokens; the {longer} has extra tokens from id "
            f"{common} ({extra[common]!r}, ...)"
        )
    for name in ("eos_id", "bos_id", "pad_id"):
        a, b = getattr(teacher, name), getattr(student, name)
        if a != b:
            raise TokenizerMismatchError(
                f"special token {name} differs: {a} in the teacher ({teacher.path}), "
                f"{b} in the student ({student.path})"
            )
    if padded_vocab_teacher != padded_vocab_student:
        raise TokenizerMismatchError(
            f"padded vocabulary sizes differ: {padded_vocab_teacher} (teacher) and "
            f"{padded_vocab_student} (student); convert both with the same "
            "--make-vocab-size-divisible-by"
        )
    if padded_vocab_teacher % tp:
        raise TokenizerMismatchError(f"the padded vocabulary ({padded_vocab_teacher}) is not divisible by TP={tp}")
    if padded_vocab_teacher < teacher.vocab_size:
        raise TokenizerMismatchError(
            f"the padded vocabulary ({padded_vocab_teacher}) is smaller than the "
            f"tokenizers' {teacher.vocab_size} tokens"
        )
