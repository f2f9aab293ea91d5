"""tools/checkpoint/make_student.py: a layer-dropped copy equals the teacher run with those layers only."""

import json

import pytest
import torch
import transformers
from harness import run_tool, run_tool_in_workers
from hf_zoo import hf_model

from megatron_minillm.checkpoint.student import evenly_spaced_layers, make_student

# The layer list of each family's HF module tree.
LAYER_LISTS = {"llama": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h"}


def _teacher_with_layers(name: str, keep: list[int]) -> transformers.PreTrainedModel:
    """The teacher with every other layer deleted in memory: the oracle for the student."""
    model = hf_model(name)
    parent_path, attr = LAYER_LISTS[name].rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in keep]))
    for i, layer in enumerate(getattr(parent, attr)):  # LLaMA attention reads its index for the KV cache
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = i
    return model


@pytest.mark.parametrize("name", sorted(LAYER_LISTS))
def test_student_equals_teacher_with_those_layers(tmp_path, name):
    teacher_dir, student_dir, keep = tmp_path / "teacher", tmp_path / "student", [0, 3]
    hf_model(name).save_pretrained(teacher_dir)
    assert make_student(teacher_dir, student_dir, 2) == keep  # evenly spaced: first and last

    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, attn_implementation="eager").eval()
    oracle = _teacher_with_layers(name, keep)
    assert student.config.num_hidden_layers == 2
    tokens = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(tokens).logits, oracle(tokens).logits, atol=0, rtol=0)
    provenance = json.loads((student_dir / "config.json").read_text())["minillm_student_of"]
    assert provenance == {"teacher": str(teacher_dir), "layers": keep}


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(5, 1) == [0]
    with pytest.raises(ValueError, match="cannot keep 5 of 4 layers"):
        evenly_spaced_layers(4, 5)


def test_cli_and_its_errors(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "teacher")

    tool, teacher = "tools/checkpoint/make_student.py", str(tmp_path / "teacher")
    ok = run_tool(tool, "--hf", teacher, "--out", str(tmp_path / "s"), "--layers", "1", "2")  # a process of its own
    assert ok.returncode == 0, ok.stderr
    assert "teacher layers [1, 2]" in ok.stdout
    assert transformers.AutoConfig.from_pretrained(tmp_path / "s").num_hidden_layers == 2
    again = run_tool_in_workers(tool, "--hf", teacher, "--out", str(tmp_path / "s"), "--num-layers", "2")
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    bad = run_tool_in_workers(tool, "--hf", teacher, "--out", str(tmp_path / "t"), "--layers", "2", "7")
    assert bad.returncode == 2 and "increasing indices in [0, 4)" in bad.stderr
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.partial").exists()
