"""Checkpoint conversion against transformers: HF -> native -> any TP x PP, and back to HF bit-exactly.

One 4-rank run converts every zoo family at PP=2 (streamed per stage), loads the native checkpoint
at TP 1/2 x PP 1/2 and compares logits with transformers, then exports back to HF at PP=2.
The exported directories are checked in the test process: identical tensors, no missing keys,
identical greedy generation.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from harness import run_distributed
from hf_zoo import hf_model
from parity import assert_logits_match_hf, micro_batches
from safetensors.torch import load_file, save_file

from megatron_minillm.checkpoint.hf_io import HFWeights
from megatron_minillm.checkpoint.hf_mapping import CheckpointMismatchError
from megatron_minillm.models import architecture_from_dict

FAMILIES = ["llama", "llama_tied_rope_scaled", "qwen2", "opt", "gpt2"]
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for family in FAMILIES:
        hf_model(family).save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


def _round_trip(hf_dirs: dict[str, Path], work: Path) -> None:
    from megatron.core import parallel_state

    from megatron_minillm.checkpoint.convert import convert_hf_to_mcore, convert_mcore_to_hf
    from megatron_minillm.checkpoint.dist_checkpoint import load_checkpoint, load_model
    from megatron_minillm.models import build_model
    from megatron_minillm.parallel import LayoutError, init_distributed

    # Families inside layouts: forming a layout's process groups costs more than a family's checks.
    init_distributed(tp=1, pp=2)
    for family, hf_dir in hf_dirs.items():
        convert_hf_to_mcore(hf_dir, work / f"{family}.mcore")
    parallel_state.destroy_model_parallel()

    batches = micro_batches(1)
    refs = {}
    for family, hf_dir in hf_dirs.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
        refs[family] = [hf(b.tokens).logits.detach() for b in batches]
    for tp, pp in LAYOUTS:
        init_distributed(tp=tp, pp=pp)
        for family in hf_dirs:
            model, arch, _ = load_model(work / f"{family}.mcore")
            what = f"{family} from checkpoint at TP{tp}xPP{pp}"
            assert_logits_match_hf(model, batches, refs[family], arch.vocab_size, atol=1e-4, what=what)
        parallel_state.destroy_model_parallel()

    init_distributed(tp=1, pp=2)
    for family in hf_dirs:
        convert_mcore_to_hf(work / f"{family}.mcore", work / f"{family}.hf")
    parallel_state.destroy_model_parallel()

    # A checkpoint of another shape is refused with the differing fields named, before any I/O;
    # without the architecture, megatron's own shape check is reported as a mismatch too.
    init_distributed(tp=2, pp=1)
    gpt2 = architecture_from_dict(json.loads((hf_dirs["gpt2"] / "config.json").read_text()))
    with pytest.raises(
        CheckpointMismatchError, match="does not fit the model: family: checkpoint 'llama' vs model 'gpt2'"
    ):
        load_checkpoint(build_model(gpt2), work / "llama.mcore", gpt2)
    with pytest.raises(LayoutError, match="padded vocabulary 257 .* cannot be split over TP=2"):
        build_model(gpt2, padded_vocab=257)  # e.g. a checkpoint padded for another TP
    wide = dataclasses.replace(gpt2, hidden_size=128, kv_channels=32)
    with pytest.raises(CheckpointMismatchError, match="cannot load"):
        load_checkpoint(build_model(wide), work / "gpt2.mcore")
    parallel_state.destroy_model_parallel()


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_hf_to_mcore_to_hf_at_every_layout(hf_dirs, tmp_path):
    run_distributed(_round_trip, 4, hf_dirs, tmp_path)
    for family, hf_dir in hf_dirs.items():
        out = tmp_path / f"{family}.hf"
        original, exported = _tensors(hf_dir), _tensors(out)
        assert exported.keys() == original.keys(), family
        for name, tensor in original.items():
            assert torch.equal(exported[name], tensor), f"{family}: {name} changed in the round trip"
        meta = json.loads((tmp_path / f"{family}.mcore" / "minillm_checkpoint.json").read_text())
        assert meta["vocab_size"] == 250 and meta["padded_vocab_size"] == 256 and meta["dtype"] == "fp32"

        model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (family, info)
        reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
        prompt = torch.tensor([[5, 17, 42, 7]])
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(prompt, **kwargs), reference.generate(prompt, **kwargs)), family


def _rewrite_weights(src: Path, dst: Path, change) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_weights_that_do_not_fit_the_config_are_named(hf_dirs, tmp_path):
    from megatron_minillm.checkpoint.convert import check_hf_weights

    src = hf_dirs["llama"]
    arch = architecture_from_dict(json.loads((src / "config.json").read_text()))
    check_hf_weights(arch, HFWeights(src))  # the real thing passes

    missing = _rewrite_weights(src, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        check_hf_weights(arch, HFWeights(missing))

    extra = _rewrite_weights(src, tmp_path / "extra", lambda t: t.update(extra_head=torch.zeros(2)))
    with pytest.raises(CheckpointMismatchError, match="does not use: extra_head"):
        check_hf_weights(arch, HFWeights(extra))

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]

    misshaped = _rewrite_weights(src, tmp_path / "misshaped", shrink)
    with pytest.raises(CheckpointMismatchError, match="do not fit config.json"):
        check_hf_weights(arch, HFWeights(misshaped))

    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        HFWeights(tmp_path)


def test_pytorch_bin_weights_are_read(hf_dirs, tmp_path):
    src = hf_dirs["gpt2"]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(src / "model.safetensors"), tmp_path / "pytorch_model.bin")
    weights = HFWeights(tmp_path)
    assert torch.equal(
        weights.get("transformer.wte.weight"), load_file(src / "model.safetensors")["transformer.wte.weight"]
    )
    assert weights.meta("transformer.h.0.attn.c_attn.weight").shape == (64, 192)
