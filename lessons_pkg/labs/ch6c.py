"""Chapter 6c (Megatron's data): the .idx layout, reading a sequence by hand, how many samples a run needs."""
from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace

import numpy as np

from lessons_pkg.data.gpt_dataset import get_train_valid_test_split
from lessons_pkg.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset, index_file_path
from lessons_pkg.labs import Exercise, Fail
from lessons_pkg.training.train import num_samples


def _build(folder: str, documents: list[list[list[int]]], dtype) -> str:
    """Write documents (each a list of sequences) with the course's builder; return the prefix."""
    prefix = os.path.join(folder, f"corpus_{np.dtype(dtype).name}_{len(documents)}")
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in documents:
            builder.add_document([t for seq in doc for t in seq], sequence_lengths=[len(s) for s in doc])
    return prefix


def _documents(seed: int, n: int, max_sequences: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 2000, rng.integers(1, 9)).tolist() for _ in range(rng.integers(1, max_sequences + 1))]
            for _ in range(n)]


def check_idx_size(module) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        for seed, n, per_doc in ((0, 1, 1), (1, 7, 1), (2, 50, 1), (3, 20, 4)):
            docs = _documents(seed, n, per_doc)
            prefix = _build(folder, docs, np.uint16)
            sequences = sum(len(d) for d in docs)
            actual = os.path.getsize(index_file_path(prefix))
            got = module.idx_size(sequences, len(docs))
            if got != actual:
                raise Fail(f"{len(docs)} documents of {sequences} sequences: idx_size says {got} bytes, "
                           f"the course's writer wrote {actual}")
            lines.append(f"{len(docs)} documents, {sequences} sequences: {actual} bytes, as you said")
    lines.append(f"OSCAR's 79,000 documents (one sequence each): {module.idx_size(79_000, 79_000):,} bytes")
    return lines


def check_read_sequence(module) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype in (np.uint16, np.int32):
            docs = _documents(4, 12, 3)
            prefix = _build(folder, docs, dtype)
            dataset = MMapIndexedDataset(prefix)
            for i in range(len(dataset)):
                got = [int(t) for t in module.read_sequence(prefix, i)]
                want = dataset[i].tolist()
                if got != want:
                    raise Fail(f"{np.dtype(dtype).name} tokens, sequence {i}: you read {got[:12]}, "
                               f"the .bin holds {want[:12]} there")
            lines.append(f"every one of {len(dataset)} sequences read right from a {np.dtype(dtype).name} .bin")
    return lines


def check_samples(module) -> list[str]:
    lines = []
    for split in ("949,50,1", "98,2,0", "1,1,1", "100", "0.8/0.1/0.1"):
        for size in (1, 10, 79_000, 123_457):
            got, want = list(module.split_bounds(split, size)), get_train_valid_test_split(split, size)
            if got != want:
                raise Fail(f"split_bounds({split!r}, {size}) = {got}, Megatron's rule gives {want}")
    lines.append("split_bounds matches Megatron's get_train_valid_test_split on 20 cases "
                 f"(949,50,1 of 79,000 documents: {get_train_valid_test_split('949,50,1', 79_000)})")
    for train_iters, gbs, interval, evals in ((200, 16, 100, 10), (50, 8, 25, 2), (1000, 32, 1000, 5), (7, 4, 3, 1)):
        args = SimpleNamespace(train_iters=train_iters, global_batch_size=gbs, eval_interval=interval, eval_iters=evals)
        got, want = list(module.target_samples(train_iters, gbs, interval, evals)), num_samples(args)
        if got != want:
            raise Fail(f"target_samples(train_iters={train_iters}, global_batch={gbs}, eval_interval={interval}, "
                       f"eval_iters={evals}) = {got}; the training loop asks its datasets for {want}")
    lines.append("target_samples matches what the training loop asks for; the lesson's run (200 iterations, "
                 f"global batch 16, eval every 100 for 10): {num_samples(SimpleNamespace(train_iters=200, global_batch_size=16, eval_interval=100, eval_iters=10))}")
    return lines


EXERCISES = [
    Exercise("ch6c.1", "the size of an .idx file from its counts", "ch6c/idx_size.py",
             "make one: python src/ch6/preprocess_data.py --help   (then ls -l data/*.idx)", check_idx_size),
    Exercise("ch6c.2", "read one sequence from .idx + .bin by hand", "ch6c/read_sequence.py",
             "xxd data/my-gpt2_text_document.idx | head -3", check_read_sequence),
    Exercise("ch6c.3", "the split boundaries and the samples a run asks its datasets for", "ch6c/samples.py",
             "see them: the 'train/valid/test samples' lines of python src/ch6/pretrain_gpt.py", check_samples),
]
