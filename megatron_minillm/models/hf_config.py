"""Read a Hugging Face ``config.json`` into one family-neutral architecture description.

Only the dict is read (no ``transformers`` import), so a 13B config costs nothing to inspect.
Supported families: LLaMA-style (llama, mistral, qwen2), OPT, GPT-2.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UnsupportedModelError(ValueError):
    """An architecture or option that megatron_minillm cannot reproduce exactly."""


LLAMA_STYLE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = LLAMA_STYLE + ("opt", "gpt2")


@dataclass(frozen=True)
class Architecture:
    """What megatron needs to rebuild an HF decoder exactly (names follow TransformerConfig)."""

    family: str  # "llama" (LLaMA-style), "opt" or "gpt2"
    model_type: str  # the HF model_type, kept for the reverse conversion
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    normalization: str  # "RMSNorm" | "LayerNorm"
    layernorm_epsilon: float
    activation: str  # "swiglu" | "relu" | "gelu_tanh" | "gelu"
    add_bias_linear: bool
    add_qkv_bias: bool
    position_embedding_type: str  # "rope" | "learned_absolute"
    rotary_base: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling dict (llama3 or linear), None = plain RoPE
    tie_word_embeddings: bool = False
    position_offset: int = 0  # OPT's learned positions start at row 2 (rows 0..1 unused)


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """RoPE base and scaling from either the transformers<5 or the transformers>=5 config layout."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or params or None
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type not in ("llama3", "linear"):
            raise UnsupportedModelError(
                f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
            )
        else:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"} | {"rope_type": rope_type}
    return theta, scaling


def _llama(cfg: dict) -> Architecture:
    heads = cfg["num_attention_heads"]
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"LLaMA-style hidden_act {act!r} is not supported (only silu)")
    for flag in ("mlp_bias", "attention_bias"):
        # megatron has one bias switch for all linears, plus one for QKV (used by qwen2).
        if cfg.get(flag, False):
            raise UnsupportedModelError(f"LLaMA-style {flag}=True is not supported")
    max_pos = cfg["max_position_embeddings"]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window:
        # Full causal attention equals sliding-window attention up to the window length.
        max_pos = min(max_pos, window)
    theta, scaling = _rope(cfg)
    return Architecture(
        family="llama",
        model_type=cfg["model_type"],
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=max_pos,
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        add_bias_linear=False,
        add_qkv_bias=cfg["model_type"] == "qwen2",
        position_embedding_type="rope",
        rotary_base=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _activation(name: str) -> str:
    if name == "relu":
        return "relu"
    if name in _GELU_TANH:
        return "gelu_tanh"
    if name == "gelu":
        return "gelu"
    raise UnsupportedModelError(f"activation {name!r} is not supported (relu, gelu, {_GELU_TANH})")


def _opt(cfg: dict) -> Architecture:
    if not cfg.get("do_layer_norm_before", True):
        raise UnsupportedModelError(
            "OPT with do_layer_norm_before=False (post-LayerNorm, e.g. opt-350m) is unsupported"
        )
    proj = cfg.get("word_embed_proj_dim", cfg["hidden_size"])
    if proj != cfg["hidden_size"]:
        raise UnsupportedModelError(
            f"OPT with word_embed_proj_dim={proj} != hidden_size={cfg['hidden_size']} is unsupported"
        )
    if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
        raise UnsupportedModelError("OPT without biases or LayerNorm affine weights is unsupported")
    heads = cfg["num_attention_heads"]
    return Architecture(
        family="opt",
        model_type="opt",
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=cfg["hidden_size"] // heads,
        ffn_hidden_size=cfg["ffn_dim"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],  # HF's table has 2 rows more
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,
        activation=_activation(cfg.get("activation_function", "relu")),
        add_bias_linear=True,
        add_qkv_bias=True,
        position_embedding_type="learned_absolute",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        position_offset=2,
    )


def _gpt2(cfg: dict) -> Architecture:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag, False):
            raise UnsupportedModelError(f"GPT-2 with {flag}=True is unsupported")
    if not cfg.get("scale_attn_weights", True):
        raise UnsupportedModelError("GPT-2 with scale_attn_weights=False is unsupported")
    hidden, heads = cfg["n_embd"], cfg["n_head"]
    return Architecture(
        family="gpt2",
        model_type="gpt2",
        num_layers=cfg["n_layer"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=hidden // heads,
        ffn_hidden_size=cfg.get("n_inner") or 4 * hidden,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["n_positions"],
        normalization="LayerNorm",
        layernorm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
        activation=_activation(cfg.get("activation_function", "gelu_new")),
        add_bias_linear=True,
        add_qkv_bias=True,
        position_embedding_type="learned_absolute",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


def architecture_from_dict(cfg: dict[str, Any]) -> Architecture:
    """Map an HF config dict to an :class:`Architecture`, or raise UnsupportedModelError."""
    model_type = cfg.get("model_type")
    if model_type in LLAMA_STYLE:
        return _llama(cfg)
    if model_type == "opt":
        return _opt(cfg)
    if model_type == "gpt2":
        return _gpt2(cfg)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def load_architecture(path: str | Path) -> Architecture:
    """Read ``config.json`` (a file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at {path}")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UnsupportedModelError(f"{path} is not a JSON object ({err}); is it a Hugging Face config.json?") from err
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{path} is not a JSON object; is it a Hugging Face config.json?")
    return architecture_from_dict(config)
