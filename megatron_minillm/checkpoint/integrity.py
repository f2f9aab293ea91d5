"""Checkpoints from strangers and damaged disks: no code runs at load, and damage is named.

Two guards, both on every load of a native checkpoint (docs/checkpointing.md, "Trust model"):

* **No pickle.** torch's distributed-checkpoint reader unpickles ``.metadata`` with plain
  ``pickle.load``, and its load planner reads byte objects (megatron's ``_extra_state``) with
  ``torch.load(weights_only=False)``. :func:`safe_dcp_load` first reads ``.metadata`` with an
  unpickler that admits only the checkpoint-metadata classes, checks that every shard file it
  names is there and long enough, and then loads with ``torch.load`` forced to ``weights_only``.
* **A manifest.** Every save ends with ``manifest.json``: each file's size and SHA-256, written
  last and atomically. Every load verifies the files it reads; the hashing is split over the ranks.
  Checkpoints without a manifest (older ones) load with a warning.
"""

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import metadata
from torch.distributed.checkpoint.api import CheckpointException

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
DCP_METADATA = ".metadata"
DCP_FILES = (DCP_METADATA, "common.pt", "metadata.json")  # besides the shards, what a dist_checkpointing dir holds
_CHUNK = 8 << 20

# Everything a torch_dist ``.metadata`` pickles (torch 2.13, megatron-core 0.16.1), by module.
_SAFE_CLASSES = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    ),
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),  # maps a layout's name to torch.strided etc.
}


class NotACheckpointError(FileNotFoundError):
    """A directory that is not (or not yet) a complete megatron_minillm checkpoint."""


class DamagedCheckpointError(NotACheckpointError):
    """A checkpoint file that is missing, truncated or not what was saved."""


class UnsafeCheckpointError(NotACheckpointError):
    """A checkpoint file that would run code (or build objects no checkpoint holds) when loaded."""


class _Refused(pickle.UnpicklingError):
    """A global the metadata unpickler does not admit (its message: ``module.name``)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _SAFE_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")


def read_dcp_metadata(dcp_dir: Path) -> metadata.Metadata:
    """``dcp_dir/.metadata`` read without running code; every shard file it names must exist and be
    long enough for what it claims to hold."""
    path = dcp_dir / DCP_METADATA
    for name in DCP_FILES:
        if not (dcp_dir / name).is_file():
            raise DamagedCheckpointError(f"{dcp_dir / name} is missing: the checkpoint is incomplete")
    try:
        with open(path, "rb") as f:
            loaded = _MetadataUnpickler(f).load()
    except _Refused as err:
        raise UnsafeCheckpointError(
            f"{path} refused: it asks for {err}, which no checkpoint holds; a file like this can run "
            "code when loaded. Do not load this checkpoint."
        ) from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise DamagedCheckpointError(f"{path} is damaged or truncated ({type(err).__name__}: {err})") from err
    if not isinstance(loaded, metadata.Metadata) or not isinstance(loaded.storage_data, dict):
        raise DamagedCheckpointError(f"{path} is not a checkpoint index (it holds a {type(loaded).__name__})")
    ends: dict[str, int] = {}
    for info in loaded.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = dcp_dir / name
        if Path(name).name != name or not shard.is_file():
            raise DamagedCheckpointError(f"{shard} is missing: {path} names it")
        if shard.stat().st_size < end:
            raise DamagedCheckpointError(
                f"{shard} is truncated: {shard.stat().st_size} bytes, {path} has data up to byte {end}"
            )
    return loaded


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """``torch.load`` admits only tensors and plain containers while the block runs, even where the
    caller asks for ``weights_only=False`` (torch's load planner does, for byte objects)."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def safe_dcp_load(sharded_state_dict: dict, dcp_dir: Path) -> dict:
    """``dist_checkpointing.load`` of ``dcp_dir`` with nothing unpickled beyond checkpoint metadata,
    tensors and plain containers (collective)."""
    read_dcp_metadata(dcp_dir)
    try:
        with _weights_only_loads():
            return dist_checkpointing.load(sharded_state_dict, str(dcp_dir))
    except (pickle.UnpicklingError, CheckpointException) as err:
        causes = [exc for exc, _ in err.failures.values()] if isinstance(err, CheckpointException) else [err]
        refused = [exc for exc in causes if isinstance(exc, pickle.UnpicklingError)]
        if not refused:
            raise
        reason = str(refused[0]).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"{dcp_dir} refused: it stores objects other than tensors ({reason}); do not load this checkpoint"
        ) from err


# --- the manifest ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _my_share(sizes: dict[str, int]) -> list[str]:
    """This rank's files to hash: largest first, each to the least loaded rank (same on all ranks)."""
    rank, world = _world()
    load, mine = [0] * world, []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = load.index(min(load))
        load[owner] += sizes[name]
        if owner == rank:
            mine.append(name)
    return mine


def _gather(part: dict[str, str]) -> dict[str, str]:
    if not torch.distributed.is_initialized():
        return part
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def _files(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` holds the old text or all of ``text``, never a part: written to ``<path>.tmp``,
    fsynced, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(directory: Path, checksums: bool = True) -> None:
    """Record every file under ``directory`` in ``directory/manifest.json`` (collective: the ranks
    share the hashing; rank 0 writes). Call it when every other file is written."""
    rank, _ = _world()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's files are written
    sizes = _files(directory) if rank == 0 else {}
    if torch.distributed.is_initialized():  # rank 0's listing for all (a shared FS may lag elsewhere)
        box = [sizes]
        torch.distributed.broadcast_object_list(box, src=0)
        sizes = box[0]
    hashes = _gather({name: _sha256(directory / name) for name in _my_share(sizes)} if checksums else {})
    if rank == 0:
        files = {
            name: {"size": size, **({"sha256": hashes[name]} if checksums else {})} for name, size in sizes.items()
        }
        write_text_atomically(
            directory / MANIFEST_FILE, json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=1)
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def verify_manifest(directory: Path, parts: tuple[str, ...], checksums: bool = True) -> None:
    """Check the files of ``directory`` whose first path component is in ``parts`` ("" for the
    top-level files) against its manifest: sizes always, SHA-256 unless ``checksums`` is False
    (collective: each rank hashes its share). Warns once when there is no manifest."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        if _world()[0] == 0:
            warnings.warn(
                f"{directory} has no {MANIFEST_FILE} (saved by an older version): its files are not verified",
                stacklevel=3,
            )
        return
    try:
        files = json.loads(path.read_text())["files"]
        expected = {name: (int(entry["size"]), entry.get("sha256")) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DamagedCheckpointError(f"{path} is damaged ({type(err).__name__}: {err})") from err
    wanted = {n: e for n, e in expected.items() if (n.split("/")[0] if "/" in n else "") in parts}
    for name, (size, _) in sorted(wanted.items()):
        file = directory / name
        if not file.is_file():
            raise DamagedCheckpointError(f"{file} is missing (listed in {path})")
        if file.stat().st_size != size:
            raise DamagedCheckpointError(f"{file} is damaged: {file.stat().st_size} bytes, {path} says {size}")
    if not checksums:
        return
    mine = _my_share({n: size for n, (size, sha) in wanted.items() if sha})
    bad = _gather({n: "bad" for n in mine if _sha256(directory / n) != wanted[n][1]})
    if bad:
        names = ", ".join(str(directory / n) for n in sorted(bad))
        raise DamagedCheckpointError(
            f"damaged: {names} (SHA-256 differs from {path}); restore the file from a copy or use another checkpoint"
        )
