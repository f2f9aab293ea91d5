"""Readers of the preprocessed datasets, memory-mapped through megatron-core's ``IndexedDataset``.

The layouts are those :mod:`megatron_minillm.data.preprocess` writes: instruction data is one
document of two sequences (prompt, response) per example; pretraining text one document per text.
"""

import struct
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset


class DatasetLayoutError(ValueError):
    """A dataset prefix that is missing or not laid out as the reader expects."""


def _open(path_prefix: str | Path) -> IndexedDataset:
    prefix = str(path_prefix)
    if not IndexedDataset.exists(prefix):
        raise DatasetLayoutError(
            f"no indexed dataset at {prefix} (needs {prefix}.bin and {prefix}.idx); "
            "make one with tools/preprocess_data.py"
        )
    if Path(prefix + ".bin").stat().st_size == 0:
        raise DatasetLayoutError(f"{prefix}.bin is empty: the dataset holds no tokens; re-run tools/preprocess_data.py")
    _check_index(Path(prefix + ".idx"))
    return IndexedDataset(prefix)


def _check_index(path: Path) -> None:
    """The header and size of megatron's ``.idx`` (magic, version, dtype, counts, then int32 lengths,
    int64 pointers and int64 document indices): megatron's reader fails on a damaged one with an
    assertion, then again in its own ``__del__``."""
    with open(path, "rb") as f:
        header = f.read(34)
    problem = None
    if len(header) < 34 or header[:9] != b"MMIDIDX\x00\x00":
        problem = "not an indexed-dataset index (bad header)"
    else:
        sequences, documents = struct.unpack("<QQ", header[18:34])
        expected = 34 + 12 * sequences + 8 * documents
        if path.stat().st_size < expected:
            problem = f"{path.stat().st_size} bytes, its header needs {expected}"
    if problem:
        raise DatasetLayoutError(f"{path} is damaged ({problem}); re-run tools/preprocess_data.py")


class InstructionDataset:
    """Example i -> (prompt_ids, response_ids) as int64 arrays."""

    def __init__(self, path_prefix: str | Path) -> None:
        self._data = _open(path_prefix)
        pairs = len(self._data) // 2
        if not np.array_equal(self._data.document_indices, np.arange(0, 2 * pairs + 1, 2)) or len(self._data) % 2:
            raise DatasetLayoutError(
                f"{path_prefix} is not an instruction dataset: its documents are not "
                "(prompt, response) pairs; was it written by the pretrain command?"
            )
        self._len = pairs

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < self._len:
            raise IndexError(f"example {i} out of range [0, {self._len})")
        return self._data[2 * i].astype(np.int64), self._data[2 * i + 1].astype(np.int64)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return self._data.sequence_lengths[0::2]

    @property
    def response_lengths(self) -> np.ndarray:
        return self._data.sequence_lengths[1::2]


class PretrainDataset:
    """Chunk k -> tokens [k * seq_length, (k + 1) * seq_length) of all texts laid end to end.

    Chunks cross text boundaries (each text ends with EOS), as LMOps' ``process_data_pretrain.py``
    packs its buffer; the remainder shorter than ``seq_length`` is left out. For next-token
    prediction a chunk gives inputs ``chunk[:-1]`` and labels ``chunk[1:]``.
    """

    def __init__(self, path_prefix: str | Path, seq_length: int) -> None:
        if seq_length < 2:
            raise ValueError(f"seq_length must be >= 2 (an input and a label), got {seq_length}")
        self._data = _open(path_prefix)
        if not np.array_equal(self._data.document_indices, np.arange(len(self._data) + 1)):
            raise DatasetLayoutError(
                f"{path_prefix} is not a pretraining dataset (one text per document); "
                "was it written by the instructions command?"
            )
        self.seq_length = seq_length
        self._ends = np.cumsum(self._data.sequence_lengths, dtype=np.int64)
        self.num_tokens = int(self._ends[-1]) if len(self._ends) else 0
        if self.num_tokens < seq_length:
            raise DatasetLayoutError(
                f"{path_prefix} holds {self.num_tokens} tokens, fewer than one chunk of {seq_length} "
                "(training.max_length + 1): give more pretraining text"
            )

    def __len__(self) -> int:
        return self.num_tokens // self.seq_length

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self):
            raise IndexError(f"chunk {k} out of range [0, {len(self)})")
        start, end = k * self.seq_length, (k + 1) * self.seq_length
        pieces = []
        doc = int(np.searchsorted(self._ends, start, side="right"))
        while start < end:
            doc_start = int(self._ends[doc]) - int(self._data.sequence_lengths[doc])
            take = min(end, int(self._ends[doc])) - start
            pieces.append(self._data.get(doc, offset=start - doc_start, length=take))
            start += take
            doc += 1
        return np.concatenate(pieces).astype(np.int64)
