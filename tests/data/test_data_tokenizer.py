"""Tokenizer loading (HF directory, checkpoint directory, sentencepiece) and the compatibility check."""

import json
import shutil

import pytest
from tokenizer_zoo import hf_tokenizer_dir, sentencepiece_model

from megatron_minillm.data import (
    Tokenizer,
    TokenizerError,
    TokenizerMismatchError,
    check_tokenizers_compatible,
    load_tokenizer,
)
from megatron_minillm.data.tokenizer import HFTokenizer, SentencePieceTokenizer

TEXT = "Below is an instruction.\n\n### Response:\nThe river Thames flows through London."


def test_hf_directory_and_checkpoint_directory(tmp_path):
    tok = load_tokenizer(hf_tokenizer_dir())
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (600, 0, 0, 1)
    assert tok.tokens()[:3] == ["<|endoftext|>", "<|pad|>", "!"]
    ids = tok.encode(TEXT)
    assert 0 not in ids and tok.decode(ids) == TEXT  # no special token added; byte-level BPE is lossless
    assert tok.decode(ids + [tok.eos_id]) == TEXT
    assert tok.decode([tok.eos_id], skip_special_tokens=False) == "<|endoftext|>"
    # A megatron_minillm checkpoint keeps the HF tokenizer files next to config.json.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_tokenizer_dir(), ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (ckpt / "model").mkdir()
    assert load_tokenizer(ckpt).encode(TEXT) == ids


def test_sentencepiece_model_file_and_directory(tmp_path):
    tok = load_tokenizer(sentencepiece_model())
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (400, 2, 1, 3)
    assert tok.tokens()[:4] == ["<unk>", "<s>", "</s>", "<pad>"]
    ids = tok.encode(TEXT)
    assert ids[0] not in (1, 2) and tok.decode(ids) == TEXT
    assert not tok.has_chat_template
    with pytest.raises(TokenizerError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    shutil.copy(sentencepiece_model(), tmp_path / "tokenizer.model")  # e.g. an old LLaMA directory
    assert load_tokenizer(tmp_path).encode(TEXT) == ids


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=f"^{tmp_path / 'nowhere'}: no such file or directory"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match=f"^{tmp_path}: found no tokenizer there"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(TokenizerError, match="vocab.txt: found no tokenizer there; give a Hugging Face"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model: not a sentencepiece model"):
        load_tokenizer(tmp_path / "bad.model")


class _Fake(Tokenizer):
    def __init__(self, tokens: list[str], eos: int = 0, bos: int | None = None, pad: int = 0, path: str = ""):
        self._tokens, self.path = tokens, path
        self.eos_id, self.bos_id, self.pad_id, self.vocab_size = eos, bos, pad, len(tokens)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def tokens(self) -> list[str | None]:
        return self._tokens


def test_compatibility_check():
    vocab = ["<eos>", "a", "b", "c"]
    teacher = _Fake(vocab, path="T")
    check_tokenizers_compatible(teacher, _Fake(list(vocab), path="S"), 128, 128, tp=2)
    cases = [
        (
            _Fake(["<eos>", "a", "B", "c"], path="S"),
            128,
            128,
            1,
            r"^token id 2 is 'b' in the teacher \(T\) and 'B' in the student \(S\)$",
        ),
        (
            _Fake(vocab + ["d", "e"], path="S"),
            128,
            128,
            1,
            r"vocabulary sizes differ: teacher \(T\) and student \(S\) have 4 and 6 tokens; the student has extra "
            r"tokens from id 4 \('d', \.\.\.\)",
        ),
        (_Fake(vocab, eos=3, path="S"), 128, 128, 1, r"special token eos_id differs: 0 in the teacher \(T\), 3 in"),
        (_Fake(vocab, bos=1, path="S"), 128, 128, 1, "special token bos_id differs: None in the teacher"),
        (_Fake(vocab, pad=2, path="S"), 128, 128, 1, "special token pad_id differs"),
        (_Fake(vocab, path="S"), 128, 256, 1, r"padded vocabulary sizes differ: 128 \(teacher\) and 256 \(student\)"),
        (_Fake(vocab, path="S"), 130, 130, 4, r"the padded vocabulary \(130\) is not divisible by TP=4"),
        (_Fake(vocab, path="S"), 2, 2, 1, r"the padded vocabulary \(2\) is smaller than the tokenizers' 4 tokens"),
    ]
    for student, padded_t, padded_s, tp, message in cases:
        with pytest.raises(TokenizerMismatchError, match=message):
            check_tokenizers_compatible(teacher, student, padded_t, padded_s, tp)


def test_compatibility_of_real_tokenizers():
    hf = load_tokenizer(hf_tokenizer_dir())
    check_tokenizers_compatible(hf, load_tokenizer(hf_tokenizer_dir()), 640, 640, tp=2)
    with pytest.raises(TokenizerMismatchError, match=r"^token id 0 is '<\|endoftext\|>' in the teacher .* and '<unk>'"):
        check_tokenizers_compatible(hf, load_tokenizer(sentencepiece_model()), 640, 640, tp=2)
    extended = load_tokenizer(hf_tokenizer_dir(extra_tokens=("<|tool|>",)))
    with pytest.raises(
        TokenizerMismatchError,
        match=r"600 and 601 tokens; the student has extra tokens from id 600 "
        r"\('<\|tool\|>', \.\.\.\)",
    ):
        check_tokenizers_compatible(hf, extended, 640, 640, tp=2)
