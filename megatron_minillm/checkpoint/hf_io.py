"""Read and write Hugging Face weight directories tensor by tensor (never the whole model at once)."""

import json
import pickle
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_minillm.checkpoint.hf_mapping import CheckpointMismatchError
from megatron_minillm.checkpoint.integrity import DamagedCheckpointError, UnsafeCheckpointError

# Everything besides weights that makes an HF directory usable (copied as-is).
HF_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)

# HF state-dict entries that are buffers, not weights (older GPT-2 / LLaMA checkpoints carry them).
NON_WEIGHT_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _SafetensorsFile:
    """Reads tensors with plain file reads, not mmap: pages of a memory-mapped file stay in the
    process's resident set, which defeats streaming a 13B checkpoint in bounded memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8).ljust(8, b"\xff"))
            if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise DamagedCheckpointError(f"{path} is not a safetensors file (or is truncated): bad header length")
            try:
                header = json.loads(f.read(header_len))
                header.pop("__metadata__", None)
            except (ValueError, AttributeError) as err:
                raise DamagedCheckpointError(
                    f"{path} is not a safetensors file: its header is not a JSON object"
                ) from err
        self.data_start = 8 + header_len
        self.entries = header
        for name, entry in header.items():
            self._check(name, entry, size - self.data_start)

    def _check(self, name: str, entry: dict, data_bytes: int) -> None:
        """Each entry's dtype, shape and byte range fit the file: a damaged header fails here, named."""
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            numel = torch.Size(entry["shape"]).numel()
            fits = 0 <= start <= end <= data_bytes and end - start == numel * dtype.itemsize
        except (KeyError, TypeError, ValueError, RuntimeError):
            fits = False
        if not fits:
            raise DamagedCheckpointError(f"{self.path} is damaged or truncated: tensor {name!r} does not fit the file")

    def keys(self) -> list[str]:
        return list(self.entries)

    def meta(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        return torch.empty(entry["shape"], dtype=_SAFETENSORS_DTYPES[entry["dtype"]], device="meta")

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        # host: read from the file into host memory; the converter places the shards it builds
        tensor = torch.empty(entry["shape"], dtype=_SAFETENSORS_DTYPES[entry["dtype"]], device="cpu")  # host
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - start:
                raise CheckpointMismatchError(f"{self.path} is truncated at tensor {name!r}")
        return tensor


class _TorchBinFile:
    """A ``pytorch_model*.bin`` file, loaded lazily with ``weights_only=True`` (no code runs)."""

    def __init__(self, path: Path) -> None:
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # host: as safetensors
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(f"{path} refused: it holds objects other than tensors ({err})") from err
        except (RuntimeError, EOFError, ValueError) as err:
            raise DamagedCheckpointError(f"{path} is damaged or not a PyTorch weights file ({err})") from err

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, name: str) -> torch.Tensor:
        return torch.empty_like(self.tensors[name], device="meta")

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class HFWeights:
    """Lazy access to the tensors of an HF directory: safetensors (single or sharded with an index)
    or, where only they exist, ``pytorch_model*.bin``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"HF model directory {self.directory} does not exist")
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._readers: dict[Path, _SafetensorsFile | _TorchBinFile] = {}
        for single in ("model.safetensors", "pytorch_model.bin"):
            if self._index(self.directory / single):
                break
        else:
            raise FileNotFoundError(
                f"{self.directory} has no model.safetensors, model.safetensors.index.json, "
                "pytorch_model.bin or pytorch_model.bin.index.json"
            )

    def _index(self, single: Path) -> bool:
        index = single.with_name(single.name + ".index.json")
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {name: self.directory / f for name, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise DamagedCheckpointError(f"{index} is damaged (no valid weight_map: {err})") from err
            missing = sorted({f.name for f in self._files.values() if not f.is_file()})
            if missing:
                raise DamagedCheckpointError(f"{index} names files that are missing: {', '.join(missing)}")
        elif single.is_file():
            self._files = {name: single for name in self._reader(single).keys()}
        return bool(self._files)

    def _reader(self, path: Path) -> "_SafetensorsFile | _TorchBinFile":
        if path not in self._readers:
            reader = _SafetensorsFile if path.suffix == ".safetensors" else _TorchBinFile
            self._readers[path] = reader(path)
        return self._readers[path]

    def _file(self, name: str) -> Path:
        if name not in self._files:
            raise CheckpointMismatchError(f"HF weights in {self.directory} have no tensor {name!r}")
        return self._files[name]

    def keys(self) -> list[str]:
        return list(self._files)

    def weight_keys(self) -> set[str]:
        return {k for k in self._files if not k.endswith(NON_WEIGHT_SUFFIXES)}

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a missing name is a config/weights mismatch, named in the error)."""
        return self._reader(self._file(name)).get(name)

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype: checks a mapping without reading data."""
        return self._reader(self._file(name)).meta(name)


class ShardedSafetensorsWriter:
    """Write tensors into ``prefix-NNN.safetensors`` files of at most ``max_shard_bytes`` each."""

    def __init__(self, directory: Path, prefix: str, max_shard_bytes: int) -> None:
        self.directory, self.prefix, self.max_shard_bytes = directory, prefix, max_shard_bytes
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._count = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self.flush()
            self._pending[name] = tensor.cpu().contiguous()  # host: a shard waits there for its file
            self._pending_bytes += size
            self.total_bytes += size

    def flush(self) -> None:
        if not self._pending:
            return
        self._count += 1
        filename = f"{self.prefix}-{self._count:03d}.safetensors"
        save_file(self._pending, str(self.directory / filename), metadata={"format": "pt"})
        self.weight_map.update({name: filename for name in self._pending})
        self._pending, self._pending_bytes = {}, 0


def write_index(directory: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path, names: Iterable[str] = HF_SIDE_FILES) -> list[str]:
    """Copy tokenizer/generation files that exist in ``src``; return their names."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
