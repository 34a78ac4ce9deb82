"""The lazy and cached readers (fairseq's, which Megatron-LM copied), over the same ``.bin``/``.idx``.

Three ways to get sequence ``i`` out of a ``.bin`` file, all using the index
parsed by :func:`~lessons_pkg.data.indexed_dataset.read_index`:

* **lazy** (:class:`LazyIndexedDataset`): keep a file handle; each item is a
  ``seek`` + ``readinto`` into a fresh array. Little memory, but one system
  call and one copy per item, through the kernel's file buffer.
* **cached** (:class:`CachedIndexedDataset`): ``prefetch(indices)`` reads the
  wanted sequences into one contiguous array in RAM, once; items are copies out
  of that array. Fast afterwards, but the cache must fit in memory.
* **mmap** (:class:`~lessons_pkg.data.indexed_dataset.MMapIndexedDataset`):
  map the file into the address space; an item is a view, pages come in on
  first touch (4 KiB at a time) and the OS can drop them again. No copy, no
  system call per item, and no limit from RAM. Megatron-LM only keeps this one.

In fairseq and early Megatron, lazy and cached read an older file pair (``.idx``
magic ``TNTIDX\\x00\\x00``, element offsets instead of byte pointers); here they
read Megatron's mmap format so the three can be compared on the same files.
"""
from __future__ import annotations

import numpy as np

from lessons_pkg.data.indexed_dataset import data_file_path, index_file_path, read_index


class LazyIndexedDataset:
    """Each item: ``seek`` to its byte pointer in ``.bin`` and ``readinto`` a new array."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.index = read_index(index_file_path(prefix), data_file_path(prefix))
        self.dtype = self.index.dtype
        self._file = None  # opened on first read, so the object can be sent to DataLoader workers

    @property
    def sizes(self) -> np.ndarray:
        return self.index.sizes

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, byte_offset: int, count: int) -> np.ndarray:
        if self._file is None:
            self._file = open(data_file_path(self.prefix), "rb", buffering=0)
        array = np.empty(count, dtype=self.dtype)
        self._file.seek(byte_offset)
        self._file.readinto(array)  # one system call straight into the array's memory
        return array

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        size = int(self.index.sizes[i])
        length = size - offset if length is None else length
        if not (0 <= offset and 0 <= length and offset + length <= size):
            raise IndexError(f"tokens [{offset}, {offset + length}) out of sequence {i} of {size} tokens")
        return self._read(int(self.index.pointers[i]) + offset * self.dtype.itemsize, length)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError(f"slices of an indexed dataset must be contiguous, got step {step}")
            sizes = self.index.sizes[start:stop]
            if len(sizes) == 0:
                return []
            flat = self._read(int(self.index.pointers[start]), int(sizes.sum()))  # one read for the run
            return np.split(flat, np.cumsum(sizes)[:-1])
        i = int(idx)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences in {self.prefix}")
        return self.get(i % len(self))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):
        return {**self.__dict__, "_file": None}


class CachedIndexedDataset(LazyIndexedDataset):
    """Read the wanted sequences into one RAM array up front; items are copies from it.

    ``prefetch(indices)`` must cover every index that will be read (the whole
    dataset by default, ``prefetch_all=True``). Reading an index that was not
    prefetched raises, as fairseq's does.
    """

    def __init__(self, prefix: str, prefetch_all: bool = True):
        super().__init__(prefix)
        self.cache = np.empty(0, dtype=self.dtype)
        self.cache_index: dict[int, int] = {}  # sequence -> its start in self.cache
        if prefetch_all:
            self.prefetch(range(len(self)))

    def prefetch(self, indices) -> None:
        indices = sorted(set(int(i) for i in indices))
        if all(i in self.cache_index for i in indices):
            return
        total = int(sum(int(self.index.sizes[i]) for i in indices))
        self.cache = np.empty(total, dtype=self.dtype)  # the whole cache in one allocation
        self.cache_index.clear()
        position = 0
        for i in indices:
            size = int(self.index.sizes[i])
            self.cache_index[i] = position
            self.cache[position:position + size] = super().get(i)
            position += size
        self.close()  # everything is in RAM now

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        if i not in self.cache_index:
            raise KeyError(f"sequence {i} was not prefetched into the cache of {self.prefix}")
        size = int(self.index.sizes[i])
        length = size - offset if length is None else length
        if not (0 <= offset and 0 <= length and offset + length <= size):
            raise IndexError(f"tokens [{offset}, {offset + length}) out of sequence {i} of {size} tokens")
        start = self.cache_index[i] + offset
        return self.cache[start:start + length].copy()

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError(f"slices of an indexed dataset must be contiguous, got step {step}")
            return [self.get(i) for i in range(start, stop)]
        return super().__getitem__(idx)
