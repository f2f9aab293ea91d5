"""Vocabulary padding and the HF <-> megatron parameter mapping (full tensors, no sharding)."""

import dataclasses

import pytest
import torch
from hf_zoo import hf_config, hf_model

from megatron_minillm.checkpoint.hf_mapping import (
    CheckpointMismatchError,
    hf_to_mcore,
    interleave_qkv,
    mcore_to_hf,
    split_qkv,
    strict_getter,
)
from megatron_minillm.models import architecture_from_dict, padded_vocab_size


@pytest.mark.parametrize(
    "vocab, tp, divisible_by, padded",
    [
        (250, 1, 128, 256),
        (250, 2, 128, 256),
        (257, 2, 128, 512),
        (49152, 4, 128, 49152),
        (250, 4, 1, 252),
        (257, 1, 1, 257),
        (256, 1, 128, 256),
    ],
)
def test_padded_vocab_size(vocab, tp, divisible_by, padded):
    assert padded_vocab_size(vocab, tp, divisible_by) == padded


def test_padded_vocab_size_rejects_zero():
    with pytest.raises(ValueError, match=r"vocab size \(0\)"):
        padded_vocab_size(0, 1)


@pytest.mark.parametrize("name", ["llama", "llama_tied_rope_scaled", "opt", "gpt2"])
def test_hf_mcore_hf_round_trip(name):
    model = hf_model(name)
    arch = architecture_from_dict(hf_config(name).to_dict())
    sd = model.state_dict()
    full = hf_to_mcore(arch, strict_getter(sd, "hf"))
    back = mcore_to_hf(arch, strict_getter(full, "mcore"))

    expected = set(sd) - {n for n, _ in model.named_buffers()}
    if arch.tie_word_embeddings:
        expected.discard("lm_head.weight")
    assert set(back) == expected, (sorted(set(back) - expected), sorted(expected - set(back)))

    # megatron holds the real vocabulary (padding happens only when sharding).
    assert full["embedding.word_embeddings.weight"].shape[0] == 250
    for key, tensor in back.items():
        assert torch.equal(tensor, sd[key]), key

    if name == "opt":
        # HF OPT looks positions up at index position + 2: megatron keeps the whole table (rows 0..1
        # included, so the round trip is exact) and the model shifts position ids by the offset.
        assert full["embedding.position_embeddings.weight"].shape[0] == arch.max_position_embeddings + 2


def _grouped_arch():
    base = architecture_from_dict(hf_config("llama").to_dict())
    return dataclasses.replace(base, num_attention_heads=4, num_query_groups=2, kv_channels=3)


def test_interleave_qkv_layout():
    arch = _grouped_arch()  # 2 query heads per group, 3 rows per head
    q = torch.arange(12).unsqueeze(1).repeat(1, 2)  # heads 0..3 -> rows 0-2, 3-5, 6-8, 9-11
    k = 100 + torch.arange(6).unsqueeze(1).repeat(1, 2)  # KV head g -> rows 3g..3g+2
    v = 200 + torch.arange(6).unsqueeze(1).repeat(1, 2)
    qkv = interleave_qkv(arch, q, k, v)
    expected = (
        list(range(0, 6))
        + [100, 101, 102]
        + [200, 201, 202]  # group 0: heads 0, 1, then k0, v0
        + list(range(6, 12))
        + [103, 104, 105]
        + [203, 204, 205]  # group 1: heads 2, 3, then k1, v1
    )
    assert qkv[:, 0].tolist() == expected and torch.equal(qkv[:, 0], qkv[:, 1])
    q2, k2, v2 = split_qkv(arch, qkv)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_split_qkv_inverts_interleave_on_bias():
    arch = _grouped_arch()
    qkv = torch.randn(24)  # (4 + 2 + 2) heads x 3, a 1-D bias
    assert torch.equal(interleave_qkv(arch, *split_qkv(arch, qkv)), qkv)


def test_strict_getter_names_missing_tensor():
    t = torch.ones(1)
    get = strict_getter({"a": t}, "the HF checkpoint")
    assert get("a") is t
    with pytest.raises(CheckpointMismatchError, match=r"the HF checkpoint has no tensor 'b'"):
        get("b")

    sd = dict(hf_model("llama").state_dict())
    del sd["model.layers.2.mlp.up_proj.weight"]
    arch = architecture_from_dict(hf_config("llama").to_dict())
    with pytest.raises(CheckpointMismatchError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight'"):
        hf_to_mcore(arch, strict_getter(sd, "hf"))
