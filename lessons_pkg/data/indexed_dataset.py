"""Megatron-LM's memory-mapped indexed dataset: the ``.bin``/``.idx`` pair, its writer and its reader.

A tokenized corpus is stored as two files that share a prefix
(``my-gpt2_text_document.bin`` and ``.idx``). The ``.bin`` file is every
sequence's token ids back to back, in one dtype, with nothing in between.
The ``.idx`` file says where each sequence starts and how long it is.
Megatron-LM (``megatron/core/datasets/indexed_dataset.py``, ``_IndexWriter`` /
``_IndexReader``; the older ``megatron/data/indexed_dataset.py``
``MMapIndexedDataset.Index`` writes the same bytes) lays the ``.idx`` out as,
all integers little-endian::

    offset  size        field
    0       9           magic  b"MMIDIDX\\x00\\x00"
    9       8   <Q      version, always 1
    17      1   <B      dtype code of the tokens in .bin (see DTYPE_CODES; 8 = uint16, 4 = int32)
    18      8   <Q      S = number of sequences
    26      8   <Q      D = number of entries in document_indices (documents + 1)
    34      4*S int32   sizes:    tokens in sequence i
    34+4S   8*S int64   pointers: byte offset of sequence i in .bin (0, then running sum of size*itemsize)
    34+12S  8*D int64   document_indices: sequence index where each document starts, then S

Each JSON line of the corpus is one document made of one sequence (Megatron
splits documents into several sequences only with ``--split-sentences``), so
``document_indices`` is ``[0, 1, 2, ..., S]``. Tokens are stored as uint16
when the vocabulary has fewer than 65500 entries, otherwise int32
(:func:`best_fitting_dtype`, Megatron's ``DType.optimal_dtype``).

:class:`IndexedDatasetBuilder` writes the pair; :func:`read_index` parses and
checks an ``.idx`` against its ``.bin``; :class:`MMapIndexedDataset` reads
sequences through a memory map (Megatron's reader). The lazy and cached readers
the lesson compares it with are in :mod:`lessons_pkg.data.file_readers`.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from lessons_pkg.errors import UserError, output_error

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, S, D = 34 bytes

# Megatron-LM's DType enum: the code stored in byte 17 of the .idx.
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


def best_fitting_dtype(vocab_size: int | None) -> type:
    """uint16 when every token id fits with room to spare (vocab < 65500), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


class IndexedDatasetBuilder:
    """Write a ``.bin``/``.idx`` pair one document at a time.

    Tokens go to a temporary ``.bin`` as they arrive; the index (sizes, pointers,
    document indices; layout in the module docstring) is written by
    :meth:`finalize`, which then renames both into place. Use as a context
    manager or call :meth:`finalize` yourself.

        with IndexedDatasetBuilder("data/my-gpt2_text_document", np.uint16) as builder:
            builder.add_document([464, 3290, 50256])
    """

    def __init__(self, prefix: str, dtype: type = np.int32):
        if np.dtype(dtype) not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {np.dtype(dtype)} is not one of Megatron's dtypes "
                             f"{sorted(str(np.dtype(t)) for t in DTYPE_CODES.values())}")
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        # Written under temporary names and renamed by finalize(): a crashed run leaves no
        # half-written pair, and readers of an older pair never see a partial file.
        self._tmp_suffix = f".tmp-{os.getpid()}"
        self._data_file = open(data_file_path(prefix) + self._tmp_suffix, "wb")
        self._sizes: list[int] = []
        self._document_indices: list[int] = [0]

    def add_document(self, tokens, sequence_lengths: list[int] | None = None) -> None:
        """Append one document; ``sequence_lengths`` splits it into sequences (default: one)."""
        array = np.asarray(tokens)
        if array.size and self.dtype.kind in "iu":
            limits = np.iinfo(self.dtype)
            if array.min() < limits.min or array.max() > limits.max:
                raise ValueError(f"token ids in [{array.min()}, {array.max()}] do not fit in {self.dtype} "
                                 f"(writing {self.prefix}.bin)")
        lengths = [array.size] if sequence_lengths is None else list(sequence_lengths)
        if sum(lengths) != array.size:
            raise ValueError(f"sequence_lengths sum to {sum(lengths)} but the document has {array.size} tokens")
        try:
            self._data_file.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        except OSError as e:  # a full disk: name the file (Python's error names none)
            raise output_error(data_file_path(self.prefix), e) from None
        self._sizes.extend(lengths)
        self._document_indices.append(len(self._sizes))

    def finalize(self) -> None:
        """Close the ``.bin``, write the ``.idx``, and rename both into place."""
        self.finish()
        self.publish()

    def finish(self) -> None:
        """Close the ``.bin`` and write the ``.idx``, both still under their temporary names."""
        if self._data_file.closed:
            return
        try:
            self._data_file.close()  # the last buffered bytes: a full disk often shows only here
        except OSError as e:
            raise output_error(data_file_path(self.prefix), e) from None
        try:
            write_index(index_file_path(self.prefix) + self._tmp_suffix, self.dtype, self._sizes,
                        self._document_indices)
        except OSError as e:
            raise output_error(index_file_path(self.prefix), e) from None

    def publish(self) -> None:
        """Rename the finished pair into place (replacing an earlier pair under this prefix only now)."""
        if os.path.exists(data_file_path(self.prefix) + self._tmp_suffix):
            os.replace(data_file_path(self.prefix) + self._tmp_suffix, data_file_path(self.prefix))
            os.replace(index_file_path(self.prefix) + self._tmp_suffix, index_file_path(self.prefix))

    def discard(self) -> None:
        """Give up: remove the temporary files; an existing pair under this prefix stays as it was."""
        if not self._data_file.closed:
            try:
                self._data_file.close()
            except OSError:  # the same full disk that made us give up
                pass
        for path in (data_file_path(self.prefix), index_file_path(self.prefix)):
            if os.path.exists(path + self._tmp_suffix):
                os.remove(path + self._tmp_suffix)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:  # leave no half-written pair behind
            self.discard()


def write_index(idx_path: str, dtype, sizes, document_indices) -> None:
    """Write an ``.idx`` file (layout in the module docstring)."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    document_indices = np.asarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(document_indices.tobytes(order="C"))


class IndexFormatError(UserError):
    """An ``.idx`` file that is not Megatron's format, or that does not match its ``.bin``."""


@dataclass
class Index:
    """The parsed ``.idx``: arrays are read-only views into a memory map of the file."""

    path: str
    dtype: np.dtype
    sizes: np.ndarray             # [S] int32, tokens per sequence
    pointers: np.ndarray          # [S] int64, byte offset of each sequence in .bin
    document_indices: np.ndarray  # [D] int64, first sequence of each document, then S

    def __len__(self) -> int:
        return len(self.sizes)


def read_index(idx_path: str, bin_path: str | None = None) -> Index:
    """Parse ``idx_path`` and check it (and ``bin_path``'s length, if given).

    Raises :class:`IndexFormatError` naming the file and what is wrong: bad
    magic, unknown version or dtype code, a file too short for the counts it
    declares, pointers that disagree with the sizes, or a ``.bin`` whose
    length is not the total number of tokens times the item size.
    """
    file_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        raise IndexFormatError(f"{idx_path}: {file_size} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic = header[:9]
    if magic != INDEX_MAGIC:
        hint = " (the older 'TNTIDX' lazy/cached format)" if magic.startswith(b"TNTIDX") else ""
        raise IndexFormatError(f"{idx_path}: magic {magic!r} is not Megatron's mmap index magic "
                               f"{INDEX_MAGIC!r}{hint}")
    (version,) = struct.unpack("<Q", header[9:17])
    if version != INDEX_VERSION:
        raise IndexFormatError(f"{idx_path}: version {version}, expected {INDEX_VERSION}")
    (code,) = struct.unpack("<B", header[17:18])
    if code not in DTYPE_CODES:
        raise IndexFormatError(f"{idx_path}: dtype code {code} is not one of {sorted(DTYPE_CODES)}")
    dtype = np.dtype(DTYPE_CODES[code])
    sequence_count, document_count = struct.unpack("<QQ", header[18:34])
    expected_size = HEADER_SIZE + 12 * sequence_count + 8 * document_count
    if file_size != expected_size:
        raise IndexFormatError(f"{idx_path}: {file_size} bytes, but a header declaring {sequence_count} "
                               f"sequences and {document_count} document indices needs {expected_size}")

    buffer = np.memmap(idx_path, mode="r", order="C")
    sizes = np.frombuffer(buffer, dtype=np.int32, count=sequence_count, offset=HEADER_SIZE)
    pointers = np.frombuffer(buffer, dtype=np.int64, count=sequence_count, offset=HEADER_SIZE + sizes.nbytes)
    document_indices = np.frombuffer(buffer, dtype=np.int64, count=document_count,
                                     offset=HEADER_SIZE + sizes.nbytes + pointers.nbytes)
    index = Index(idx_path, dtype, sizes, pointers, document_indices)
    _check_consistency(index, bin_path)
    return index


def _check_consistency(index: Index, bin_path: str | None) -> None:
    sizes, pointers, docs = index.sizes, index.pointers, index.document_indices
    if sizes.size and sizes.min() < 0:
        raise IndexFormatError(f"{index.path}: negative sequence size {sizes.min()}")
    expected_pointers = np.zeros_like(pointers)
    np.cumsum(sizes[:-1].astype(np.int64) * index.dtype.itemsize, out=expected_pointers[1:])
    if not np.array_equal(pointers, expected_pointers):
        bad = int(np.flatnonzero(pointers != expected_pointers)[0])
        raise IndexFormatError(f"{index.path}: pointer of sequence {bad} is {pointers[bad]}, "
                               f"but the sizes before it put it at {expected_pointers[bad]}")
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(sizes) or np.any(np.diff(docs) < 0):
        raise IndexFormatError(f"{index.path}: document indices must rise from 0 to the number of "
                               f"sequences ({len(sizes)}); got {docs[:3].tolist()}...{docs[-3:].tolist()}")
    if bin_path is not None:
        total_bytes = int(sizes.astype(np.int64).sum()) * index.dtype.itemsize
        bin_size = os.path.getsize(bin_path)
        if bin_size != total_bytes:
            raise IndexFormatError(f"{index.path} declares {int(sizes.astype(np.int64).sum())} tokens of "
                                   f"{index.dtype} ({total_bytes} bytes), but {bin_path} has {bin_size} bytes")


class MMapIndexedDataset:
    """Megatron's reader: both files memory-mapped, a sequence is a view of the ``.bin``.

    Opening costs only the ``.idx`` parse; ``ds[i]`` is a zero-copy NumPy view
    whose pages the operating system loads on first touch and may evict under
    memory pressure, so datasets far larger than RAM work. ``ds[i:j]`` returns a
    list of arrays, ``ds.get(i, offset, length)`` a slice of one sequence
    (what the GPT dataset uses).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.index = read_index(index_file_path(prefix), data_file_path(prefix))
        self.dtype = self.index.dtype
        # np.memmap cannot map an empty file; an empty dataset has nothing to read anyway.
        if os.path.getsize(data_file_path(prefix)) > 0:
            self._bin = np.memmap(data_file_path(prefix), mode="r", order="C")
        else:
            self._bin = np.zeros(0, dtype=np.uint8)

    @property
    def sizes(self) -> np.ndarray:
        return self.index.sizes

    @property
    def document_indices(self) -> np.ndarray:
        return self.index.document_indices

    def __len__(self) -> int:
        return len(self.index)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (to its end if ``length`` is None)."""
        size = int(self.index.sizes[i])
        if length is None:
            length = size - offset
        if not (0 <= offset and 0 <= length and offset + length <= size):  # numpy reads count=-1 to the file's end
            raise IndexError(f"tokens [{offset}, {offset + length}) out of sequence {i} of {size} tokens")
        start = int(self.index.pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError(f"slices of an indexed dataset must be contiguous, got step {step}")
            sizes = self.index.sizes[start:stop]
            if len(sizes) == 0:
                return []
            flat = np.frombuffer(self._bin, dtype=self.dtype, count=int(sizes.sum()),
                                 offset=int(self.index.pointers[start]))
            return np.split(flat, np.cumsum(sizes)[:-1])
        i = int(idx)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences in {self.prefix}")
        return self.get(i % len(self))
