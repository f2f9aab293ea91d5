"""Checkpoints from strangers and damaged disks: nothing unpickled runs, damage is named, saves
that fail replace nothing.

One 1-rank task saves a native and a training checkpoint, then loads poisoned, damaged and
manifest-less copies; one CLI run (in a warm worker) shows the converter's exit status and message.
Multi-rank verification (each rank hashing its share) is covered by test_training_checkpoint.
"""

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
from harness import run_distributed, run_tool_in_workers
from hf_zoo import hf_model
from parity import lm_loss_func, micro_batches

# Runs `touch <marker>` when plain-unpickled, then goes on with the real stream (memo-free opcodes).
POISON = b"cposix\nsystem\n(S'touch {marker}'\ntR0"


def _poison(path: Path, marker: Path) -> None:
    path.write_bytes(POISON.replace(b"{marker}", str(marker).encode()) + path.read_bytes())


def _outcome(call) -> str:
    try:
        call()
        return "loaded"
    except Exception as err:  # noqa: BLE001 - the type and message are what is checked
        return f"{type(err).__name__}: {err}"


class _Evil:
    """An ``_extra_state`` that runs a command when plain-unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _damage(path: Path) -> None:
    """Random bytes in the middle of a file (tensor data), as a bad disk block would leave."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(256))


def _checks(hf_dir: Path, work: Path, marker: Path) -> dict[str, str]:
    import resource
    import signal

    from megatron.core.optimizer import OptimizerConfig

    from megatron_minillm.checkpoint.convert import convert_hf_to_mcore
    from megatron_minillm.checkpoint.dist_checkpoint import load_model, save_checkpoint
    from megatron_minillm.checkpoint.integrity import write_manifest
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.training import setup_model_and_optimizer, train_step
    from megatron_minillm.training.checkpointing import load_training_checkpoint, save_training_checkpoint

    init_distributed(tp=1, pp=1)
    native = work / "native"
    meta = convert_hf_to_mcore(hf_dir, native)
    model, arch, _ = load_model(native)
    ddp, optimizer, scheduler = setup_model_and_optimizer(
        model, OptimizerConfig(lr=1e-3, use_distributed_optimizer=True)
    )
    train_step(ddp, optimizer, scheduler, micro_batches(2, seed=0), lm_loss_func(arch.vocab_size))  # Adam state
    save = work / "save"
    save_training_checkpoint(save, 1, ddp, optimizer, scheduler, {}, metadata=meta, hf_dir=hf_dir)
    ckpt = save / "iter_0000001"
    out = {"manifest": (ckpt / "manifest.json").read_text()}

    def resume(save_dir: Path, **kwargs) -> str:
        return _outcome(lambda: load_training_checkpoint(save_dir, ddp, optimizer, scheduler, arch, **kwargs))

    def training_copy(name: str) -> Path:
        (work / name).mkdir()
        (work / name / "latest").write_text("1\n")
        return _copy(ckpt, work / name / ckpt.name)

    # Poisoned .metadata, model and optimizer, with a manifest that fits (an author's) and without.
    poisoned = _copy(native, work / "poisoned")
    _poison(poisoned / "model" / ".metadata", marker)
    write_manifest(poisoned)
    out["poisoned"] = _outcome(lambda: load_model(poisoned))
    (poisoned / "manifest.json").unlink()
    out["poisoned_no_manifest"] = _outcome(lambda: load_model(poisoned))
    _poison(training_copy("poisoned_opt") / "optimizer" / ".metadata", marker)
    (work / "poisoned_opt" / ckpt.name / "manifest.json").unlink()
    out["poisoned_optimizer"] = resume(work / "poisoned_opt")

    # A poisoned byte object inside a shard (megatron's _extra_state, read by torch's load planner).
    layer = model.decoder.layers[0].mlp.linear_fc1
    layer.get_extra_state = lambda: _Evil(marker)
    save_checkpoint(model, work / "evil_extra", meta, hf_dir)
    del layer.get_extra_state
    out["evil_extra_state"] = _outcome(lambda: load_model(work / "evil_extra"))

    # Damage: random bytes inside a model and an optimizer shard; --no-checksums accepts the former.
    damaged = _copy(native, work / "damaged")
    _damage(damaged / "model" / "__0_0.distcp")
    out["damaged_model"] = _outcome(lambda: load_model(damaged))
    out["damaged_model_unchecked"] = _outcome(lambda: load_model(damaged, checksums=False))
    _damage(training_copy("damaged_opt") / "optimizer" / "__0_1.distcp")
    out["damaged_optimizer"] = resume(work / "damaged_opt")
    out["resume_intact"] = resume(save)

    # Without a manifest (an older checkpoint): loads with a warning; structural damage still named.
    old = _copy(native, work / "old")
    (old / "manifest.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["old"] = _outcome(lambda: load_model(old))
    out["old_warning"] = " | ".join(str(w.message) for w in caught)
    os.truncate(old / "model" / "__0_1.distcp", 10)
    out["truncated_shard"] = _outcome(lambda: load_model(old))
    (old / "model" / "__0_1.distcp").unlink()
    out["deleted_shard"] = _outcome(lambda: load_model(old))
    (old / "model" / "common.pt").unlink()
    out["no_common_pt"] = _outcome(lambda: load_model(old))
    meta_file = _copy(native, work / "truncated_meta") / "model" / ".metadata"
    (work / "truncated_meta" / "manifest.json").unlink()
    os.truncate(meta_file, meta_file.stat().st_size // 2)
    out["truncated_metadata"] = _outcome(lambda: load_model(work / "truncated_meta"))

    # A save that runs out of room (a file-size limit stands in for a full disk) replaces nothing.
    before = (native / "manifest.json").read_text()
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, limits[1]))
    try:
        out["full_disk"] = _outcome(lambda: save_checkpoint(model, native, meta, hf_dir, overwrite=True))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    out["kept_after_full_disk"] = str((native / "manifest.json").read_text() == before)
    out["reload_after_full_disk"] = _outcome(lambda: load_model(native))  # verified against that manifest
    out["leftovers"] = " ".join(sorted(p.name for p in work.iterdir() if p.name.startswith("native.")))
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("untrusted")
    hf_model("llama").save_pretrained(root / "hf")
    (root / "work").mkdir()
    out = run_distributed(_checks, 1, root / "hf", root / "work", root / "PWNED")[0]
    out["pwned"] = str((root / "PWNED").exists())
    out["root"] = str(root)
    return out


def test_no_code_runs_from_a_checkpoint(outcomes):
    assert outcomes["pwned"] == "False"
    for case in ("poisoned", "poisoned_no_manifest"):
        assert outcomes[case].startswith("UnsafeCheckpointError: "), outcomes[case]
        assert "poisoned/model/.metadata refused: it asks for posix.system" in outcomes[case]
    assert "poisoned_opt/iter_0000001/optimizer/.metadata refused" in outcomes["poisoned_optimizer"]
    assert outcomes["evil_extra_state"].startswith("UnsafeCheckpointError: "), outcomes["evil_extra_state"]
    assert "evil_extra/model refused: it stores objects other than tensors" in outcomes["evil_extra_state"]


def test_damage_is_named(outcomes):
    manifest = json.loads(outcomes["manifest"])["files"]
    assert {"model/.metadata", "optimizer/common.pt", "training_state.json", "config.json"} <= manifest.keys()
    assert all(len(entry["sha256"]) == 64 and entry["size"] >= 0 for entry in manifest.values())
    assert "damaged/model/__0_0.distcp (SHA-256 differs from" in outcomes["damaged_model"]
    assert outcomes["damaged_model_unchecked"] == "loaded"  # the documented opt-out: sizes only
    assert "damaged_opt/iter_0000001/optimizer/__0_1.distcp (SHA-256 differs" in outcomes["damaged_optimizer"]
    assert outcomes["resume_intact"] == "loaded"
    assert outcomes["old"] == "loaded" and "has no manifest.json" in outcomes["old_warning"]
    assert "old/model/__0_1.distcp is truncated: 10 bytes" in outcomes["truncated_shard"]
    assert "old/model/__0_1.distcp is missing" in outcomes["deleted_shard"]
    assert "old/model/common.pt is missing" in outcomes["no_common_pt"]
    assert "truncated_meta/model/.metadata is damaged or truncated" in outcomes["truncated_metadata"]
    for case in ("damaged_model", "truncated_shard", "deleted_shard", "no_common_pt", "truncated_metadata"):
        assert outcomes[case].startswith("DamagedCheckpointError: "), outcomes[case]


def test_a_failed_save_replaces_nothing(outcomes):
    assert outcomes["full_disk"].startswith("CheckpointWriteError: could not write "), outcomes["full_disk"]
    assert "a full disk, a quota or a file-size limit" in outcomes["full_disk"]
    assert "nothing was replaced" in outcomes["full_disk"]
    assert outcomes["kept_after_full_disk"] == "True" and outcomes["reload_after_full_disk"] == "loaded"
    assert outcomes["leftovers"] == ""  # no native.partial, no native.old


def test_converter_refuses_a_poisoned_checkpoint(outcomes):
    root = Path(outcomes["root"])
    done = run_tool_in_workers(
        "tools/checkpoint/convert.py",
        "mcore-to-hf",
        "--ckpt",
        str(root / "work" / "poisoned"),
        "--out",
        str(root / "x"),
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "refused" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (root / "PWNED").exists() and not (root / "x").exists()


def test_hf_weights_damaged_or_unsafe(tmp_path):
    import torch

    from megatron_minillm.checkpoint.hf_io import HFWeights
    from megatron_minillm.checkpoint.integrity import DamagedCheckpointError, UnsafeCheckpointError

    hf_model("llama").save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    random = shutil.copytree(tmp_path / "ok", tmp_path / "random")
    (random / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(DamagedCheckpointError, match="random/model.safetensors is not a safetensors file"):
        HFWeights(random)
    truncated = shutil.copytree(tmp_path / "ok", tmp_path / "truncated")
    os.truncate(truncated / "model.safetensors", weights.stat().st_size - 100)
    with pytest.raises(DamagedCheckpointError, match="truncated/model.safetensors is damaged or truncated: tensor"):
        HFWeights(truncated)
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(tmp_path / "ok" / "config.json", binary)
    torch.save({"w": _Evil(tmp_path / "PWNED")}, binary / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="bin/pytorch_model.bin refused"):
        HFWeights(binary)
    assert not (tmp_path / "PWNED").exists()
    assert pickle.dumps(1)  # pickle stays usable: nothing here patches it
