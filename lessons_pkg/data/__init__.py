"""Data for Megatron-style GPT pretraining (chapter 6, part 3).

Modules (each one idea):
    indexed_dataset  Megatron's .bin/.idx format: byte layout, writer, checks, mmap reader
    file_readers     the lazy and cached readers the lesson compares with mmap
    gpt_dataset      document / sample / shuffle indices, train/valid/test split, GPTDataset
    tokenizer        GPT-2 byte-level BPE from vocab.json + merges.txt, and training one locally

Typical use (what pretrain_gpt.py does)::

    from lessons_pkg.data import build_train_valid_test_datasets
    from lessons_pkg.data.tokenizer import build_tokenizer
    tokenizer = build_tokenizer("data/vocab.json", "data/merges.txt")
    train, valid, test = build_train_valid_test_datasets(
        "data/my-gpt2_text_document", "949,50,1", [3200, 480, 160], seq_length=128, seed=1234)
    train[0]["text"]  # np.int64 array of 129 token ids
"""
from lessons_pkg.data.file_readers import CachedIndexedDataset, LazyIndexedDataset
from lessons_pkg.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets, get_train_valid_test_split
from lessons_pkg.data.indexed_dataset import (
    IndexedDatasetBuilder,
    IndexFormatError,
    MMapIndexedDataset,
    best_fitting_dtype,
    read_index,
)

__all__ = [
    "CachedIndexedDataset",
    "GPTDataset",
    "IndexFormatError",
    "IndexedDatasetBuilder",
    "LazyIndexedDataset",
    "MMapIndexedDataset",
    "best_fitting_dtype",
    "build_train_valid_test_datasets",
    "get_train_valid_test_split",
    "make_indexed_dataset",
    "read_index",
]


def make_indexed_dataset(prefix: str, impl: str = "mmap"):
    """Open ``<prefix>.bin/.idx`` with the reader named like Megatron's old ``--data-impl``."""
    readers = {"mmap": MMapIndexedDataset, "lazy": LazyIndexedDataset, "cached": CachedIndexedDataset}
    if impl not in readers:
        raise ValueError(f"data impl {impl!r} is not one of {sorted(readers)}")
    return readers[impl](prefix)
