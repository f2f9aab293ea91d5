"""The native checkpoint: megatron-core ``dist_checkpointing`` (torch_dist) plus what makes it usable.

A checkpoint directory holds::

    config.json                 the HF config it came from (so load_architecture works on it)
    tokenizer / generation files copied from the HF directory
    model/                      dist_checkpointing of model.sharded_state_dict(): loads at any TP x PP
    minillm_checkpoint.json     metadata
    manifest.json               every file's size and SHA-256, written last (checkpoint/integrity.py)

Saves are atomic: everything is written into ``<dir>.partial`` and renamed at the end, so an
interrupted save never looks like a valid checkpoint. Loads run no code from the files and verify
them against the manifest.
"""

import dataclasses
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from megatron_minillm.checkpoint.hf_io import copy_side_files
from megatron_minillm.checkpoint.hf_mapping import CheckpointMismatchError
from megatron_minillm.checkpoint.integrity import (
    DamagedCheckpointError,
    NotACheckpointError,
    safe_dcp_load,
    verify_manifest,
    write_manifest,
)
from megatron_minillm.models.builder import build_model
from megatron_minillm.models.hf_config import Architecture, load_architecture

METADATA_FILE = "minillm_checkpoint.json"
MODEL_DIR = "model"
FORMAT_VERSION = 1


class CheckpointWriteError(OSError):
    """A save that failed part-way (full disk, quota, I/O error); nothing was replaced."""


@dataclass(frozen=True)
class CheckpointMetadata:
    model_type: str
    family: str
    vocab_size: int  # before padding
    padded_vocab_size: int  # what the embedding holds; must be divisible by the loading TP
    dtype: str  # "fp32" | "bf16" | "fp16"
    source: str  # where the weights came from
    format_version: int = FORMAT_VERSION

    @classmethod
    def of(cls, model: torch.nn.Module, arch: Architecture, dtype: str, source: str) -> "CheckpointMetadata":
        """The metadata of ``model`` (built from ``arch``), its vocabulary padded as built."""
        return cls(arch.model_type, arch.family, arch.vocab_size, model.vocab_size, dtype, source)


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def read_metadata(ckpt_dir: str | Path) -> CheckpointMetadata:
    """Validate that ``ckpt_dir`` is a complete checkpoint and return its metadata."""
    ckpt_dir = Path(ckpt_dir)
    partial = ckpt_dir.with_name(ckpt_dir.name + ".partial")
    if not ckpt_dir.is_dir():
        hint = f" (a half-written save is at {partial})" if partial.is_dir() else ""
        raise NotACheckpointError(f"checkpoint directory {ckpt_dir} does not exist{hint}")
    if ckpt_dir.name.endswith(".partial"):
        raise NotACheckpointError(f"{ckpt_dir} is a half-written checkpoint (its save was interrupted)")
    meta_path = ckpt_dir / METADATA_FILE
    if not meta_path.is_file():
        raise NotACheckpointError(
            f"{ckpt_dir} is not a megatron_minillm checkpoint (no {METADATA_FILE}); convert HF "
            "weights with `tools/checkpoint/convert.py hf-to-mcore`"
        )
    try:
        meta = CheckpointMetadata(**json.loads(meta_path.read_text()))
    except (ValueError, TypeError) as err:
        raise DamagedCheckpointError(f"{meta_path} is damaged ({type(err).__name__}: {err})") from err
    if meta.format_version != FORMAT_VERSION:
        raise NotACheckpointError(f"{ckpt_dir} has format version {meta.format_version}, expected {FORMAT_VERSION}")
    return meta


def refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")


def _write_failure(err: BaseException) -> str:
    """The OS's reason for a failed write (``No space left on device``) wherever it sits in ``err``'s
    chain or a checkpoint exception's per-rank failures; else ``err``'s own last line."""
    pending, seen = [err], set()
    while pending:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror
        pending += [e for e in (exc.__cause__, exc.__context__) if e is not None]
        if isinstance(exc, CheckpointException):
            pending += [failure for failure, _ in exc.failures.values()]
    last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
    return f"a write failed ({type(err).__name__}: {last})"


@contextmanager
def atomic_directory(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Collective (or one process without a process group): every rank writes into the yielded
    ``<out_dir>.partial``; when the block ends on every rank, rank 0 renames it to ``out_dir``, so a
    failed write never looks complete."""
    refuse_existing(out_dir, overwrite)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        yield tmp
    except (OSError, RuntimeError, CheckpointException) as err:  # a full disk surfaces as any of them
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, NotACheckpointError | FileExistsError):
            raise
        free = shutil.disk_usage(out_dir.parent).free / 2**30 if out_dir.parent.is_dir() else 0.0
        raise CheckpointWriteError(
            f"could not write {out_dir}: {_write_failure(err)}; {free:.1f} GiB free there (a full disk, a "
            "quota or a file-size limit fail writes like this); nothing was replaced and the half-written "
            "files were removed"
        ) from err
    _barrier()
    if _is_rank0():  # two renames: at every moment out_dir (or, replaced, <out_dir>.old) is whole
        old = out_dir.with_name(out_dir.name + ".old")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def save_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    metadata: CheckpointMetadata,
    hf_dir: str | Path,
    overwrite: bool = False,
    *,
    checksums: bool = True,
) -> None:
    """Save ``model`` (collective: every rank calls it) with the HF config and tokenizer of ``hf_dir``;
    ``checksums=False`` records only the files' sizes in the manifest."""
    with atomic_directory(Path(out_dir), overwrite) as tmp:
        write_checkpoint_files(model, tmp, metadata, hf_dir)
        write_manifest(tmp, checksums)


def write_checkpoint_files(
    model: torch.nn.Module, directory: Path, metadata: CheckpointMetadata, hf_dir: str | Path
) -> None:
    """Write a checkpoint's files into an existing, empty ``directory`` (collective; not atomic by
    itself: callers wrap it in :func:`atomic_directory`, and a training checkpoint adds its own files)."""
    hf_dir = Path(hf_dir)
    if _is_rank0():
        (directory / MODEL_DIR).mkdir()
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(directory / MODEL_DIR))
    torch.distributed.barrier()
    if _is_rank0():
        shutil.copy2(hf_dir / "config.json", directory / "config.json")
        copy_side_files(hf_dir, directory)
        (directory / METADATA_FILE).write_text(json.dumps(dataclasses.asdict(metadata), indent=2) + "\n")


def load_model(
    ckpt_dir: str | Path,
    dtype: str | None = None,
    *,
    checksums: bool = True,
    pg_collection: ProcessGroupCollection | None = None,
    **config_overrides: Any,
) -> tuple[torch.nn.Module, Architecture, CheckpointMetadata]:
    """Build the checkpoint's model at the TP x PP of ``pg_collection`` (None: megatron's global
    groups) and load it (collective); ``config_overrides`` go to its TransformerConfig."""
    meta = read_metadata(ckpt_dir)
    arch = load_architecture(ckpt_dir)
    model = build_model(
        arch,
        dtype=dtype or meta.dtype,
        padded_vocab=meta.padded_vocab_size,
        pg_collection=pg_collection,
        perform_initialization=False,
        **config_overrides,
    )
    load_checkpoint(model, ckpt_dir, arch, checksums=checksums)
    return model, arch, meta


def _differences(a: Architecture, b: Architecture) -> list[str]:
    return [
        f"{f.name}: checkpoint {getattr(a, f.name)!r} vs model {getattr(b, f.name)!r}"
        for f in dataclasses.fields(Architecture)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def load_checkpoint(
    model: torch.nn.Module, ckpt_dir: str | Path, arch: Architecture | None = None, *, checksums: bool = True
) -> CheckpointMetadata:
    """Load a checkpoint into ``model`` at whatever TP x PP it was built with (collective).

    ``arch`` is the architecture ``model`` was built from; a checkpoint of another shape is refused
    with the differing fields named. The model's files are verified against the manifest first
    (sizes always, SHA-256 unless ``checksums`` is False).
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_metadata(ckpt_dir)
    verify_manifest(ckpt_dir, ("", MODEL_DIR), checksums)
    if arch is not None:
        diff = _differences(load_architecture(ckpt_dir), arch)
        if diff:
            raise CheckpointMismatchError(f"checkpoint {ckpt_dir} does not fit the model: " + "; ".join(diff))
    try:
        # A model on its own layout names its DP group, or megatron would count replicas over its global one.
        dp_group = getattr(unwrap_model(model).pg_collection, "dp_cp", None)
        metadata = None if dp_group is None else {"dp_cp_group": dp_group}
        state = safe_dcp_load(model.sharded_state_dict(metadata=metadata), ckpt_dir / MODEL_DIR)
    except NotACheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # shape/key mismatches surface as several types
        raise CheckpointMismatchError(f"cannot load {ckpt_dir / MODEL_DIR} into this model: {err}") from err
    model.load_state_dict(state, strict=True)
    return meta
