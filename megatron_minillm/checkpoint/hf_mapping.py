"""HF <-> megatron parameter mapping for LLaMA-style, OPT and GPT-2 models, and TP sharding.

Three layers of names/shapes:
  * HF names and layouts (``model.layers.3.self_attn.q_proj.weight``, GPT-2 Conv1D [in, out]);
  * *full* megatron tensors under megatron names with *global* layer numbers
    (``decoder.layers.3.self_attention.linear_qkv.weight``), unsharded, vocab not padded;
  * this rank's shard of a model parameter (local layer number, TP slice, padded vocab).
The maps are per layer so that converters can stream a 13B model one layer at a time.
"""

import re
from collections.abc import Callable, Container, Iterable, Mapping

import torch
import torch.distributed as dist

from megatron_minillm.models.hf_config import Architecture
from megatron_minillm.parallel.vocab import tp_shard, tp_size

Tensor = torch.Tensor
Getter = Callable[[str], Tensor]  # name -> tensor; lets callers read tensors lazily from disk

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the architecture (a missing, extra or wrongly shaped tensor)."""


# ----------------------------------------------------------------------------------------------
# Fused QKV and SwiGLU layouts.


def interleave_qkv(arch: Architecture, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """[q; k; v] -> megatron's per-query-group layout [q_g0, k_g0, v_g0, q_g1, ...] along dim 0."""
    groups, d = arch.num_query_groups, arch.kv_channels
    heads_per_group = arch.num_attention_heads // groups
    tail = q.shape[1:]
    q = q.reshape(groups, heads_per_group * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat((q, k, v), dim=1).reshape(-1, *tail)


def split_qkv(arch: Architecture, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`interleave_qkv`."""
    groups, d = arch.num_query_groups, arch.kv_channels
    heads_per_group = arch.num_attention_heads // groups
    tail = qkv.shape[1:]
    per_group = qkv.reshape(groups, (heads_per_group + 2) * d, *tail)
    q, k, v = torch.split(per_group, [heads_per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


# ----------------------------------------------------------------------------------------------
# Per-family names. Each entry: megatron suffix -> HF suffix, inside a layer or at the top level.

_LAYER_NORMS = {
    "llama": {
        "input_layernorm.weight": "input_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    },
    "opt": {
        "input_layernorm.weight": "self_attn_layer_norm.weight",
        "input_layernorm.bias": "self_attn_layer_norm.bias",
        "pre_mlp_layernorm.weight": "final_layer_norm.weight",
        "pre_mlp_layernorm.bias": "final_layer_norm.bias",
    },
    "gpt2": {
        "input_layernorm.weight": "ln_1.weight",
        "input_layernorm.bias": "ln_1.bias",
        "pre_mlp_layernorm.weight": "ln_2.weight",
        "pre_mlp_layernorm.bias": "ln_2.bias",
    },
}
_LAYER_PREFIX = {"llama": "model.layers.{}.", "opt": "model.decoder.layers.{}.", "gpt2": "transformer.h.{}."}
# GPT-2's Conv1D layers other than the fused QKV: (megatron, HF) prefixes.
_GPT2_CONV1D = (
    ("self_attention.linear_proj", "attn.c_proj"),
    ("mlp.linear_fc1", "mlp.c_fc"),
    ("mlp.linear_fc2", "mlp.c_proj"),
)
_TOP = {
    "llama": {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
    },
    "opt": {
        "embedding.word_embeddings.weight": "model.decoder.embed_tokens.weight",
        "embedding.position_embeddings.weight": "model.decoder.embed_positions.weight",
        "decoder.final_layernorm.weight": "model.decoder.final_layer_norm.weight",
        "decoder.final_layernorm.bias": "model.decoder.final_layer_norm.bias",
    },
    "gpt2": {
        "embedding.word_embeddings.weight": "transformer.wte.weight",
        "embedding.position_embeddings.weight": "transformer.wpe.weight",
        "decoder.final_layernorm.weight": "transformer.ln_f.weight",
        "decoder.final_layernorm.bias": "transformer.ln_f.bias",
    },
}


def _layer_hf_to_mcore(arch: Architecture, get: Getter, i: int) -> dict[str, Tensor]:
    hf = _LAYER_PREFIX[arch.family].format(i)
    out = {f"decoder.layers.{i}.{m}": get(hf + h) for m, h in _LAYER_NORMS[arch.family].items()}
    mc = f"decoder.layers.{i}."
    qkv_suffixes = ["weight"] + (["bias"] if arch.add_qkv_bias else [])
    if arch.family == "gpt2":  # Conv1D stores [in, out]: transpose to Linear's [out, in]
        w = get(hf + "attn.c_attn.weight").t()
        out[mc + "self_attention.linear_qkv.weight"] = interleave_qkv(arch, *w.chunk(3, dim=0))
        out[mc + "self_attention.linear_qkv.bias"] = interleave_qkv(arch, *get(hf + "attn.c_attn.bias").chunk(3, dim=0))
        for m, h in _GPT2_CONV1D:
            out[f"{mc}{m}.weight"] = get(f"{hf}{h}.weight").t().contiguous()
            out[f"{mc}{m}.bias"] = get(f"{hf}{h}.bias")
        return out
    attn = hf + "self_attn."
    for s in qkv_suffixes:
        out[f"{mc}self_attention.linear_qkv.{s}"] = interleave_qkv(
            arch, get(f"{attn}q_proj.{s}"), get(f"{attn}k_proj.{s}"), get(f"{attn}v_proj.{s}")
        )
    if arch.family == "llama":
        out[mc + "self_attention.linear_proj.weight"] = get(attn + "o_proj.weight")
        out[mc + "mlp.linear_fc1.weight"] = torch.cat(
            (get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")), dim=0
        )
        out[mc + "mlp.linear_fc2.weight"] = get(hf + "mlp.down_proj.weight")
        return out
    for s in ("weight", "bias"):  # OPT
        out[f"{mc}self_attention.linear_proj.{s}"] = get(f"{attn}out_proj.{s}")
        out[f"{mc}mlp.linear_fc1.{s}"] = get(f"{hf}fc1.{s}")
        out[f"{mc}mlp.linear_fc2.{s}"] = get(f"{hf}fc2.{s}")
    return out


def _layer_mcore_to_hf(arch: Architecture, get: Getter, i: int) -> dict[str, Tensor]:
    hf = _LAYER_PREFIX[arch.family].format(i)
    mc = f"decoder.layers.{i}."
    out = {hf + h: get(mc + m) for m, h in _LAYER_NORMS[arch.family].items()}
    if arch.family == "gpt2":
        q, k, v = split_qkv(arch, get(mc + "self_attention.linear_qkv.weight"))
        out[hf + "attn.c_attn.weight"] = torch.cat((q, k, v), dim=0).t().contiguous()
        out[hf + "attn.c_attn.bias"] = torch.cat(split_qkv(arch, get(mc + "self_attention.linear_qkv.bias")), dim=0)
        for m, h in _GPT2_CONV1D:
            out[f"{hf}{h}.weight"] = get(f"{mc}{m}.weight").t().contiguous()
            out[f"{hf}{h}.bias"] = get(f"{mc}{m}.bias")
        return out
    attn = hf + "self_attn."
    for s in ["weight"] + (["bias"] if arch.add_qkv_bias else []):
        q, k, v = split_qkv(arch, get(f"{mc}self_attention.linear_qkv.{s}"))
        out.update({f"{attn}q_proj.{s}": q, f"{attn}k_proj.{s}": k, f"{attn}v_proj.{s}": v})
    if arch.family == "llama":
        out[attn + "o_proj.weight"] = get(mc + "self_attention.linear_proj.weight")
        gate, up = get(mc + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
        out[hf + "mlp.down_proj.weight"] = get(mc + "mlp.linear_fc2.weight")
        return out
    for s in ("weight", "bias"):  # OPT
        out[f"{attn}out_proj.{s}"] = get(f"{mc}self_attention.linear_proj.{s}")
        out[f"{hf}fc1.{s}"] = get(f"{mc}mlp.linear_fc1.{s}")
        out[f"{hf}fc2.{s}"] = get(f"{mc}mlp.linear_fc2.{s}")
    return out


def _top_pairs(arch: Architecture) -> list[tuple[str, str]]:
    """(megatron name, HF name) of the weights outside the transformer layers."""
    pairs = list(_TOP[arch.family].items())
    if not arch.tie_word_embeddings:
        pairs.append(("output_layer.weight", "lm_head.weight"))
    return pairs


def hf_name(arch: Architecture, mcore_name: str) -> str:
    """The HF name of a top-level (non-layer) megatron weight."""
    return dict(_top_pairs(arch))[mcore_name]


def _top_hf_to_mcore(arch: Architecture, get: Getter, wanted: Container[str] | None) -> dict[str, Tensor]:
    return {m: get(h) for m, h in _top_pairs(arch) if wanted is None or m in wanted}


def _top_mcore_to_hf(arch: Architecture, get: Getter, wanted: Container[str] | None) -> dict[str, Tensor]:
    return {h: get(m) for m, h in _top_pairs(arch) if wanted is None or m in wanted}


def hf_to_mcore(
    arch: Architecture, get: Getter, layers: Iterable[int] | None = None, top: Container[str] | None = None
) -> dict[str, Tensor]:
    """Full megatron tensors for global ``layers`` (default: all) and the top-level weights named
    in ``top`` (megatron names; default: all of them)."""
    out = _top_hf_to_mcore(arch, get, top)
    for i in range(arch.num_layers) if layers is None else layers:
        out.update(_layer_hf_to_mcore(arch, get, i))
    return out


def mcore_to_hf(
    arch: Architecture, get: Getter, layers: Iterable[int] | None = None, top: Container[str] | None = None
) -> dict[str, Tensor]:
    """HF tensors for global ``layers`` (default: all) and the top-level weights named in ``top``
    (megatron names; default: all of them)."""
    out = _top_mcore_to_hf(arch, get, top)
    for i in range(arch.num_layers) if layers is None else layers:
        out.update(_layer_mcore_to_hf(arch, get, i))
    return out


def strict_getter(tensors: Mapping[str, Tensor], what: str) -> Getter:
    """A getter that names the missing tensor in a clear error."""

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise CheckpointMismatchError(f"{what} has no tensor {name!r}")
        return tensors[name]

    return get


# ----------------------------------------------------------------------------------------------
# Full tensor <-> this rank's shard.


def _layer_offset(model: torch.nn.Module) -> int:
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


# transformer-engine layer specs fuse each pre-norm into the linear that follows it.
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def global_name(model: torch.nn.Module, local_name: str) -> str:
    """``decoder.layers.<local>.x`` on this stage -> ``decoder.layers.<global>.x`` (local-spec names)."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    suffix = _TE_FUSED_NORMS.get(match.group(2), match.group(2))
    return f"decoder.layers.{int(match.group(1)) + _layer_offset(model)}.{suffix}"


def shard_tensor(
    full: Tensor, param: Tensor, name: str, gated_fc1: bool, tp_group: dist.ProcessGroup | None = None
) -> Tensor:
    """Slice a full megatron tensor to ``param``'s shard over ``tp_group`` (the model's TP group; None:
    megatron's global one), padding vocab rows with zeros."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        padded = param.shape[0] * tp_size(tp_group)
        if full.shape[0] > padded:
            raise CheckpointMismatchError(
                f"{name}: {full.shape[0]} vocab rows do not fit the model's padded vocab {padded}"
            )
        full = torch.cat((full, full.new_zeros(padded - full.shape[0], *full.shape[1:])), dim=0)
    if getattr(param, "tensor_model_parallel", False):
        dim = param.partition_dim
        if gated_fc1 and ".mlp.linear_fc1." in name:  # [gate; up]: each rank holds [gate_r; up_r]
            full = torch.cat([tp_shard(part, dim, tp_group) for part in full.chunk(2, dim=dim)], dim)
        else:
            full = tp_shard(full, dim, tp_group)
    if full.shape != param.shape:
        raise CheckpointMismatchError(
            f"{name}: checkpoint shape {tuple(full.shape)} does not match the model's shard {tuple(param.shape)}"
        )
    return full


def local_full_names(model: torch.nn.Module) -> dict[str, str]:
    """Map each local parameter name of ``model`` to the full-tensor name it is sliced from."""
    out = {}
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, _ in model.named_parameters():
        full = global_name(model, name)
        if tied and full == "output_layer.weight":  # last PP stage's copy of the tied embedding
            full = "embedding.word_embeddings.weight"
        out[name] = full
    return out


@torch.no_grad()
def load_full_tensors(model: torch.nn.Module, full: Mapping[str, Tensor], strict: bool = True) -> set[str]:
    """Copy full megatron tensors into the parameter shards of ``model`` they feed; return the
    local names filled. Shards are cut for the model's own TP group (``model.pg_collection``).
    ``strict``: every parameter must be fed (the missing tensor is named); a streaming caller passes
    one layer at a time with ``strict=False``."""
    gated = model.config.gated_linear_unit
    tp_group = model.pg_collection.tp
    params = dict(model.named_parameters())
    filled = set()
    for name, full_name in local_full_names(model).items():
        if full_name in full:
            params[name].copy_(shard_tensor(full[full_name], params[name], full_name, gated, tp_group))
            filled.add(name)
        elif strict:
            raise CheckpointMismatchError(f"no tensor {full_name!r} for the model's parameter {name!r}")
    return filled


def layers_on_this_stage(model: torch.nn.Module) -> range:
    """Global indices of the transformer layers this pipeline stage holds."""
    offset = _layer_offset(model)
    return range(offset, offset + len(model.decoder.layers))
