"""Make a student from a teacher: an HF directory with a subset of the teacher's layers.

A layer-dropped copy shares the teacher's tokenizer and vocabulary exactly (a distillation
requirement, see ``data.tokenizer.check_tokenizers_compatible``) and starts from useful weights,
the way DistilBERT initialises its student from every other teacher layer. Tensors are streamed
one at a time; nothing holds the whole model.
"""

import json
import re
from pathlib import Path

from megatron_minillm.checkpoint.dist_checkpoint import atomic_directory
from megatron_minillm.checkpoint.hf_io import (
    NON_WEIGHT_SUFFIXES,
    HFWeights,
    ShardedSafetensorsWriter,
    copy_side_files,
    write_index,
)

# HF names of a layer's tensors: LLaMA/Qwen2/Mistral `model.layers.N.`, OPT `model.decoder.layers.N.`,
# GPT-2 `transformer.h.N.` (or `h.N.` without the prefix).
_LAYER = re.compile(r"^((?:.*\.)?(?:layers|h)\.)(\d+)(\..*)$")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``num_layers``, first and last included."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"cannot keep {keep} of {num_layers} layers (need 1 <= keep <= {num_layers})")
    if keep == 1:
        return [0]
    return [round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)]


def make_student(
    hf_dir: str | Path,
    out_dir: str | Path,
    layers: list[int] | int,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> list[int]:
    """Write ``out_dir``: the HF model of ``hf_dir`` with only ``layers`` (teacher indices, in order,
    or a count of evenly spaced ones). Returns the kept teacher indices."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    key = next((k for k in _LAYER_COUNT_KEYS if k in config), None)
    if key is None:
        raise ValueError(f"{hf_dir}/config.json has no layer count ({' or '.join(_LAYER_COUNT_KEYS)})")
    num_layers = config[key]
    if isinstance(layers, int):
        layers = evenly_spaced_layers(num_layers, layers)
    if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers must be increasing indices in [0, {num_layers}), got {layers}")
    renumber = {old: new for new, old in enumerate(layers)}
    weights = HFWeights(hf_dir)
    with atomic_directory(out_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, "model", max_shard_bytes)
        for name in weights.keys():
            if name.endswith(NON_WEIGHT_SUFFIXES):
                continue
            match = _LAYER.match(name)
            if match is None:
                writer.add({name: weights.get(name)})
            elif int(match[2]) in renumber:
                writer.add({f"{match[1]}{renumber[int(match[2])]}{match[3]}": weights.get(name)})
        writer.flush()
        write_index(tmp, writer.weight_map, writer.total_bytes)
        config[key] = len(layers)
        config["minillm_student_of"] = {"teacher": str(hf_dir), "layers": list(layers)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(hf_dir, tmp)
    return layers
