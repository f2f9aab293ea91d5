"""HF config.json -> Architecture, its clear refusals, and the TP x PP layout check."""

import dataclasses
import re

import pytest
import transformers
from hf_zoo import hf_config

from megatron_minillm.models import UnsupportedModelError, architecture_from_dict, load_architecture
from megatron_minillm.models.builder import check_layout
from megatron_minillm.parallel import LayoutError


def _arch(name: str, **changes):
    return architecture_from_dict(hf_config(name).to_dict() | changes)


@pytest.mark.parametrize(
    "name, family, groups, tied, offset, activation, norm",
    [
        ("llama", "llama", 2, False, 0, "swiglu", "RMSNorm"),
        ("llama_tied_rope_scaled", "llama", 4, True, 0, "swiglu", "RMSNorm"),
        ("opt", "opt", 4, True, 2, "relu", "LayerNorm"),
        ("gpt2", "gpt2", 4, True, 0, "gelu_tanh", "LayerNorm"),
    ],
)
def test_zoo_architectures(name, family, groups, tied, offset, activation, norm):
    arch = _arch(name)
    assert arch.family == family
    assert arch.num_attention_heads == 4 and arch.num_query_groups == groups
    assert arch.kv_channels == 16  # hidden 64 / 4 heads
    assert arch.tie_word_embeddings is tied
    assert arch.position_offset == offset
    assert arch.activation == activation
    assert arch.normalization == norm
    assert arch.vocab_size == 250 and arch.max_position_embeddings == 64
    expected_pos = "rope" if family == "llama" else "learned_absolute"
    assert arch.position_embedding_type == expected_pos


def test_zoo_rope():
    assert _arch("llama").rope_scaling is None
    scaled = _arch("llama_tied_rope_scaled")
    assert scaled.rotary_base == 50000.0
    assert scaled.rope_scaling["rope_type"] == "llama3"
    assert scaled.rope_scaling["factor"] == 8.0
    assert scaled.rope_scaling["original_max_position_embeddings"] == 16
    assert "rope_theta" not in scaled.rope_scaling


def _llama_dict_without_rope() -> dict:
    cfg = hf_config("llama").to_dict()
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        cfg.pop(key, None)
    return cfg


def test_transformers_4_rope_layout():
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    arch = architecture_from_dict(_llama_dict_without_rope() | {"rope_theta": 500000.0, "rope_scaling": llama3})
    assert arch.rotary_base == 500000.0
    assert arch.rope_scaling == llama3


def test_transformers_4_legacy_type_key():
    scaling = {"type": "linear", "factor": 2.0}
    arch = architecture_from_dict(_llama_dict_without_rope() | {"rope_scaling": scaling})
    assert arch.rotary_base == 10000.0
    assert arch.rope_scaling["rope_type"] == "linear" and arch.rope_scaling["factor"] == 2.0


def test_transformers_5_rope_layout():
    params = {"rope_type": "default", "rope_theta": 500000.0}
    arch = architecture_from_dict(_llama_dict_without_rope() | {"rope_parameters": params})
    assert arch.rotary_base == 500000.0
    assert arch.rope_scaling is None


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError) as err:
        architecture_from_dict({"model_type": "bloom"})
    msg = str(err.value)
    assert "'bloom'" in msg
    for supported in ("llama", "mistral", "qwen2", "opt", "gpt2"):
        assert supported in msg


@pytest.mark.parametrize(
    "name, changes, named",
    [
        ("opt", {"do_layer_norm_before": False}, "do_layer_norm_before=False"),
        ("opt", {"word_embed_proj_dim": 32}, "word_embed_proj_dim=32"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
    ],
)
def test_unsupported_options(name, changes, named):
    with pytest.raises(UnsupportedModelError) as err:
        _arch(name, **changes)
    assert named in str(err.value)


def test_sliding_window_caps_positions():
    cfg = transformers.MistralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=250,
        max_position_embeddings=64,
        sliding_window=16,
    ).to_dict()
    assert architecture_from_dict(cfg).max_position_embeddings == 16
    assert architecture_from_dict(cfg | {"sliding_window": None}).max_position_embeddings == 64
    assert architecture_from_dict(cfg | {"sliding_window": 128}).max_position_embeddings == 64


def test_load_architecture(tmp_path):
    hf_config("gpt2").save_pretrained(tmp_path)
    expected = _arch("gpt2")
    assert load_architecture(tmp_path) == expected
    assert load_architecture(tmp_path / "config.json") == expected
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_architecture(missing)


def test_check_layout():
    llama = _arch("llama")  # 4 heads, 2 KV heads, FFN 96, 4 layers
    check_layout(llama, tp=2, pp=2)
    check_layout(llama, tp=1, pp=4)
    with pytest.raises(LayoutError, match=r"TP=3 does not divide the 4 attention heads"):
        check_layout(llama, tp=3, pp=1)
    with pytest.raises(LayoutError, match=r"TP=4 does not divide the 2 key/value heads"):
        check_layout(llama, tp=4, pp=1)
    with pytest.raises(LayoutError, match=r"PP=3 does not divide the 4 layers"):
        check_layout(llama, tp=1, pp=3)
    with pytest.raises(LayoutError, match=r"FFN size 97"):
        check_layout(dataclasses.replace(llama, ffn_hidden_size=97), tp=2, pp=1)
