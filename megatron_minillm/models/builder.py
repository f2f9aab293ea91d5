"""Build a megatron-core ``GPTModel`` that reproduces an HF architecture, on this rank's TP/PP slice.

Teacher and student are two calls with two architectures in the same process. Each is split over the
groups of its ``pg_collection`` (megatron's ``ProcessGroupCollection``: a model may have its own TP x
PP layout on the same ranks), or over megatron's global groups of ``parallel_state`` without one. The
model keeps the collection (``model.pg_collection``, megatron's global groups when none was given):
losses, the sampler and the checkpoint loaders read the groups from there.
"""

import math
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.utils import get_pg_rank

from megatron_minillm.models.attention import SDPADotProductAttention
from megatron_minillm.models.hf_config import Architecture
from megatron_minillm.parallel import LayoutError
from megatron_minillm.parallel.vocab import padded_vocab_size
from megatron_minillm.platform import device, is_cuda

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_ACTIVATIONS = {
    "swiglu": F.silu,
    "relu": F.relu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
}


def use_transformer_engine() -> bool:
    """TE layer specs only where TE imports and a GPU runs them."""
    if not is_cuda():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def check_layout(arch: Architecture, tp: int, pp: int) -> None:
    """Raise one clear error for each way ``arch`` cannot be split over TP x PP."""
    if arch.num_attention_heads % tp:
        raise LayoutError(f"TP={tp} does not divide the {arch.num_attention_heads} attention heads")
    if arch.num_query_groups % tp:
        raise LayoutError(f"TP={tp} does not divide the {arch.num_query_groups} key/value heads (query groups)")
    if arch.ffn_hidden_size % tp:
        raise LayoutError(f"TP={tp} does not divide the FFN size {arch.ffn_hidden_size}")
    if arch.num_layers % pp:
        raise LayoutError(f"PP={pp} does not divide the {arch.num_layers} layers")


# What GPTModel (megatron-core 0.16.1) reads of a ProcessGroupCollection: tp and pp split the model,
# cp its sequence (a group of one rank: no context parallelism here), embd ties the first stage's
# embedding to the last stage's output layer (None where nothing is tied across stages).
MODEL_PROCESS_GROUPS = ("tp", "pp", "cp", "embd")


def model_parallel_groups(
    pg_collection: ProcessGroupCollection | None = None,
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """The TP and PP groups a model is split over: ``pg_collection``'s, else megatron's global ones."""
    if pg_collection is None:
        return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_pipeline_model_parallel_group()
    missing = [name for name in MODEL_PROCESS_GROUPS if not hasattr(pg_collection, name)]
    if missing:
        raise ValueError(
            f"pg_collection has no {', '.join(missing)} group: a GPTModel needs tp, pp, cp (one rank) and embd "
            "(None unless the embeddings are tied across pipeline stages)"
        )
    return pg_collection.tp, pg_collection.pp


def transformer_config(
    arch: Architecture,
    dtype: str = "fp32",
    *,
    pg_collection: ProcessGroupCollection | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """The megatron TransformerConfig for ``arch`` at the TP x PP layout of ``pg_collection``'s groups
    (None: megatron's global groups), dropout off. ``sequence_parallel=True`` is kept at TP > 1 only."""
    tp, pp = (dist.get_world_size(group) for group in model_parallel_groups(pg_collection))
    check_layout(arch, tp, pp)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        ffn_hidden_size=arch.ffn_hidden_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        normalization=arch.normalization,
        layernorm_epsilon=arch.layernorm_epsilon,
        gated_linear_unit=arch.activation == "swiglu",
        activation_func=_ACTIVATIONS[arch.activation],
        add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # The fused kernels need apex/TE builds; the unfused path is the same maths.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        params_dtype=DTYPES[dtype],
        pipeline_dtype=DTYPES[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        # Initialise the full weight then split it, so init does not depend on TP.
        use_cpu_initialization=True,
    )
    kwargs.update(overrides)
    if tp == 1:
        # Nothing to split the sequence over; megatron refuses it, Megatron-LM turns it off.
        kwargs["sequence_parallel"] = False
    return TransformerConfig(**kwargs)


class TorchNorm:
    """torch's LayerNorm / RMSNorm, as megatron's ``WrappedTorchNorm`` builds them, but also under
    sequence parallelism.

    megatron's refuses ``sequence_parallel`` because it does not tag its parameters: under SP each TP
    rank normalises 1/TP of the sequence, so its weight/bias gradients are partial sums, and
    ``finalize_model_grads`` sums them over TP only for parameters tagged ``sequence_parallel``
    (as apex's and TE's norms tag theirs).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("torch's norms have no zero-centred gamma, persistent or memory-efficient kernels")
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r} is not one of {sorted(norms)}")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _sequence_parallel_norm(norm: Any) -> Any:
    """Ours for megatron's torch norm; apex's and TE's norms handle sequence parallelism themselves."""
    return TorchNorm if norm is WrappedTorchNorm else norm


def layer_spec(arch: Architecture) -> ModuleSpec:
    """One transformer layer: TE's where it runs, else megatron's local one with SDPA attention."""
    if use_transformer_engine():
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=arch.normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    layer = spec.submodules
    layer.input_layernorm = _sequence_parallel_norm(layer.input_layernorm)
    layer.pre_mlp_layernorm = _sequence_parallel_norm(layer.pre_mlp_layernorm)
    return spec


def block_spec(arch: Architecture, config: TransformerConfig, pp_group: dist.ProcessGroup) -> ModuleSpec:
    """The decoder of this pipeline stage: its layers and the final norm. Spelled out (megatron
    derives it from a layer spec) because megatron picks that norm from a module global, which
    would be the torch norm that refuses sequence parallelism where neither TE nor apex imports."""
    layers = get_num_layers_to_build(config, pp_rank=get_pg_rank(pp_group))
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer_spec(arch)] * layers,
            layer_norm=_sequence_parallel_norm(LayerNormImpl),
        ),
    )


def _mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """megatron sets a weight's TP attributes (``tensor_model_parallel``, ``partition_dim``) only while
    initialising it on CPU; a model built to be loaded (``perform_initialization=False``) needs them
    too: weight sharding and the grad-norm's duplicate filter read them."""
    for module in model.modules():
        if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def _scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """RoPE frequency scaling with the config's own factors (megatron hard-codes llama3's 1, 4, 8192)."""
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def _shift_positions(offset: int, _module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    kwargs["position_ids"] = kwargs["position_ids"] + offset
    return args, kwargs


def build_model(
    arch: Architecture,
    dtype: str = "fp32",
    make_vocab_size_divisible_by: int = 128,
    padded_vocab: int | None = None,
    config: TransformerConfig | None = None,
    *,
    pg_collection: ProcessGroupCollection | None = None,
    **config_overrides: Any,
) -> GPTModel:
    """Build this rank's stage of ``arch`` (its layers and, on first/last stage, embeddings/head).

    ``padded_vocab`` (a checkpoint's) overrides the padding rule ``make_vocab_size_divisible_by x TP``.
    ``pg_collection`` (megatron's ``ProcessGroupCollection`` with at least ``MODEL_PROCESS_GROUPS``)
    gives the model its own TP x PP layout; None builds it on megatron's global groups, as before.
    """
    tp_group, pp_group = model_parallel_groups(pg_collection)
    tp, pp = dist.get_world_size(tp_group), dist.get_world_size(pp_group)
    config = config or transformer_config(arch, dtype, pg_collection=pg_collection, **config_overrides)
    if (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) != (tp, pp):
        raise LayoutError(
            f"the config is for TP={config.tensor_model_parallel_size} x PP={config.pipeline_model_parallel_size}, "
            f"the process groups are TP={tp} x PP={pp}"
        )
    if pg_collection is not None and pp > 1 and arch.tie_word_embeddings and pg_collection.embd is None:
        raise LayoutError(
            "tied embeddings over PP > 1 stages need pg_collection.embd (the first and last stage of each pipeline)"
        )
    padded_vocab = padded_vocab or padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by)
    if padded_vocab % tp or padded_vocab < arch.vocab_size:
        raise LayoutError(
            f"padded vocabulary {padded_vocab} (vocab {arch.vocab_size}) cannot be split over TP={tp}; "
            "re-convert with a --make-vocab-size-divisible-by that TP divides"
        )
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(arch, config, pp_group),
        vocab_size=padded_vocab,
        max_sequence_length=arch.max_position_embeddings + arch.position_offset,
        pre_process=is_pp_first_stage(pp_group),
        post_process=is_pp_last_stage(pp_group),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type=arch.position_embedding_type,
        rotary_base=arch.rotary_base,
        pg_collection=pg_collection,
    )
    if arch.rope_scaling is not None:
        rope = model.rotary_pos_emb
        rope.inv_freq = _scaled_inv_freq(rope.inv_freq, arch.rope_scaling)
    if arch.position_offset and model.pre_process:
        # OPT keeps its learned positions at rows offset.. (rows 0..1 are unused): keeping the whole
        # table makes conversion bit-exact, and callers still pass positions starting at 0.
        model.embedding.register_forward_pre_hook(partial(_shift_positions, arch.position_offset), with_kwargs=True)
    _mark_tensor_parallel_weights(model)
    # Initialised on the host (TP-independent, see transformer_config), moved to this rank's device
    # once, before megatron's DDP allocates its gradient buffers there. A low-precision dtype is what
    # megatron's Float16Module does to its module: norms too, so every matmul sees one dtype (RoPE's
    # inv_freq is a plain attribute megatron creates on the current device, and stays fp32).
    return model.to(device=device(), dtype=config.params_dtype)
