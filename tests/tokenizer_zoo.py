"""Tiny tokenizers trained at test time on the shipped text (offline, a second or two each).

Built once per test session under the session's temp dir; tests must not modify them.
"""

import functools
import json
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus(max_texts: int = 120) -> list[str]:
    lines = (DATA / "t0_passages_300.jsonl").read_text(encoding="utf-8").splitlines()[:max_texts]
    return [json.loads(line)["text"] for line in lines]


@functools.cache
def hf_tokenizer_dir(vocab_size: int = 600, chat: bool = True, extra_tokens: tuple[str, ...] = ()) -> Path:
    """A byte-level BPE (GPT-2 style) wrapped as a PreTrainedTokenizerFast and saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE if chat else None,
    )
    if extra_tokens:
        wrapped.add_tokens(list(extra_tokens))
    out = Path(tempfile.mkdtemp(prefix="hf-tok-"))
    wrapped.save_pretrained(out)
    return out


@functools.cache
def sentencepiece_model(vocab_size: int = 400) -> Path:
    """A unigram sentencepiece .model with bos/eos/pad pieces and text kept as is (no normalization)."""
    import sentencepiece

    out = Path(tempfile.mkdtemp(prefix="spm-"))
    text = out / "corpus.txt"
    text.write_text("\n".join(t.replace("\n", " ") for t in corpus()), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(out / "spm"),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    return out / "spm.model"


def copy_with_extra_token(src: Path, out: Path, token: str = "<|extra|>") -> Path:
    """A copy of an HF or checkpoint directory whose tokenizer has one more token: a mismatch to refuse."""
    from transformers import AutoTokenizer

    shutil.copytree(src, out)
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens([token])
    tokenizer.save_pretrained(out)
    if (out / "manifest.json").is_file():  # a checkpoint: its manifest must fit the edited files
        from megatron_minillm.checkpoint.integrity import write_manifest

        write_manifest(out)
    return out
