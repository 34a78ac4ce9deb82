"""The GPT dataset: Megatron's split, the three indices, samples across document boundaries, the index cache."""
import os

import numpy as np
import pytest

from lessons_pkg.data import IndexedDatasetBuilder, MMapIndexedDataset, build_train_valid_test_datasets
from lessons_pkg.data.gpt_dataset import (
    GPTDataset,
    build_sample_idx,
    build_sample_idx_reference,
    get_train_valid_test_split,
    num_epochs_needed,
)


@pytest.fixture
def corpus(tmp_path):
    """60 documents of 1..40 tokens; token ids encode (document, position) so slices are unambiguous."""
    rng = np.random.default_rng(1)
    documents = [1000 * d + np.arange(int(rng.integers(1, 40))) for d in range(60)]
    prefix = str(tmp_path / "corpus_text_document")
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for doc in documents:
            builder.add_document(doc)
    return prefix, documents


def test_split_follows_megatron():
    # Values worked out by hand from Megatron's get_train_valid_test_split_ (round, then fix the end).
    assert get_train_valid_test_split("949,50,1", 1000) == [0, 949, 999, 1000]
    assert get_train_valid_test_split("949,50,1", 60) == [0, 57, 60, 60]
    assert get_train_valid_test_split("98/2", 10) == [0, 10, 10, 10]   # round(9.8) = 10, valid gets none
    # round(3.33) three times = 9 documents, one short: Megatron shifts every boundary after 0 by one.
    assert get_train_valid_test_split("1,1,1", 10) == [0, 4, 7, 10]
    with pytest.raises(ValueError, match="like 949,50,1"):
        get_train_valid_test_split("949;50;1", 10)


def megatron_num_epochs(tokens_per_epoch, seq_length, num_samples):
    epochs, tokens = 0, 0
    while True:  # Megatron's _num_epochs, verbatim logic
        epochs += 1
        tokens += tokens_per_epoch
        if (tokens - 1) // seq_length >= num_samples:
            return epochs


def test_num_epochs_matches_megatrons_loop():
    for tokens in (2, 7, 100, 1001):
        for seq_length in (1, 3, 16, 128):
            for num_samples in (0, 1, 5, 77, 1000):
                assert num_epochs_needed(tokens, seq_length, num_samples) == \
                    megatron_num_epochs(tokens, seq_length, num_samples)


@pytest.mark.parametrize("seq_length", [1, 4, 17, 64])
def test_vectorised_sample_index_equals_megatrons_loop(seq_length):
    rng = np.random.default_rng(seq_length)
    sizes = rng.integers(1, 50, size=30).astype(np.int32)
    doc_idx = rng.permutation(np.tile(np.arange(30, dtype=np.int32), 3))
    tokens = int(sizes.sum())
    assert np.array_equal(build_sample_idx(sizes, doc_idx, seq_length, 3, tokens),
                          build_sample_idx_reference(sizes, doc_idx, seq_length, 3, tokens))


@pytest.mark.parametrize("seq_length, num_samples", [(8, 20), (16, 200), (5, 400)])
def test_samples_are_contiguous_slices_of_the_shuffled_document_stream(corpus, seq_length, num_samples):
    prefix, documents = corpus
    indexed = MMapIndexedDataset(prefix)
    ids = np.arange(10, 50)  # a split in the middle of the corpus
    ds = GPTDataset("train", prefix, ids, indexed, num_samples, seq_length, seed=7)
    tokens_per_epoch = sum(len(documents[d]) for d in ids)
    epochs = len(ds.doc_idx) // len(ids)
    # Each document of the split appears once per epoch, and only those documents.
    assert sorted(np.asarray(ds.doc_idx).tolist()) == sorted(ids.tolist() * epochs)
    stream = np.concatenate([documents[d] for d in ds.doc_idx])  # rebuilt from the documents themselves
    assert len(ds) == (epochs * tokens_per_epoch - 1) // seq_length >= num_samples
    assert sorted(np.asarray(ds.shuffle_idx).tolist()) == list(range(len(ds)))  # a permutation
    covered = np.zeros(len(stream), dtype=bool)
    for i in range(len(ds)):
        sample = ds[i]["text"]
        k = int(ds.shuffle_idx[i])
        assert sample.dtype == np.int64 and sample.shape == (seq_length + 1,)
        assert np.array_equal(sample, stream[k * seq_length: k * seq_length + seq_length + 1]), (i, k)
        covered[k * seq_length: k * seq_length + seq_length + 1] = True
    # Every token of the epochs is in some sample, except a tail shorter than one sample.
    assert covered[: len(ds) * seq_length + 1].all()
    assert len(stream) - (len(ds) * seq_length + 1) < seq_length
    crossing = sum(ds.sample_idx[k][0] != ds.sample_idx[k + 1][0] for k in range(len(ds)))
    assert crossing > 0  # samples really do run across document boundaries


def test_last_epoch_is_shuffled_separately_when_mostly_unused(corpus):
    prefix, documents = corpus
    ids = np.arange(0, 60)
    tokens = sum(len(d) for d in documents)
    per_epoch = (tokens - 1) // 8
    ds = GPTDataset("train", prefix, ids, MMapIndexedDataset(prefix), per_epoch + 3, 8, seed=3)
    # Two epochs, the second needed for 3 samples (< 80%): Megatron shuffles it on its own.
    assert len(ds.doc_idx) == 120
    assert sorted(np.asarray(ds.doc_idx[60:]).tolist()) == ids.tolist()
    before_last = (tokens - 1) // 8
    assert sorted(np.asarray(ds.shuffle_idx[:before_last]).tolist()) == list(range(before_last))


def test_train_valid_test_do_not_overlap_and_indices_are_cached(corpus):
    prefix, documents = corpus
    train, valid, test = build_train_valid_test_datasets(prefix, "80,10,10", [50, 10, 10], 16, 1234, verbose=False)
    owners = [set(np.asarray(ds.doc_idx).tolist()) for ds in (train, valid, test)]
    assert owners == [set(range(0, 48)), set(range(48, 54)), set(range(54, 60))]
    assert all(ds.built_indices for ds in (train, valid, test))
    cache = sorted(f for f in os.listdir(os.path.dirname(prefix)) if f.endswith(".npy"))
    assert len(cache) == 9  # doc/sample/shuffle for each split
    mtimes = {f: os.stat(os.path.join(os.path.dirname(prefix), f)).st_mtime_ns for f in cache}

    again = build_train_valid_test_datasets(prefix, "80,10,10", [50, 10, 10], 16, 1234, verbose=False)
    assert not any(ds.built_indices for ds in again)  # loaded, not recomputed
    assert {f: os.stat(os.path.join(os.path.dirname(prefix), f)).st_mtime_ns for f in cache} == mtimes
    assert all(np.array_equal(a[i]["text"], b[i]["text"])
               for a, b in zip((train, valid, test), again) for i in range(len(a)))

    # Any parameter change gets its own indices: seed, sequence length, samples, split.
    for args in (("80,10,10", [50, 10, 10], 16, 99), ("80,10,10", [50, 10, 10], 8, 1234),
                 ("80,10,10", [51, 10, 10], 16, 1234), ("70,20,10", [50, 10, 10], 16, 1234)):
        changed = build_train_valid_test_datasets(prefix, *args, verbose=False)
        assert changed[0].built_indices
        assert changed[0].index_prefix != train.index_prefix


def test_token_ids_outside_the_vocabulary_are_named_when_datasets_are_built(corpus):
    prefix, documents = corpus
    largest = max(int(d.max()) for d in documents)          # 1000 * 59 + position
    build_train_valid_test_datasets(prefix, "1,0,0", [5, 0, 0], 8, 1, verbose=False, vocab_size=largest + 1)
    document = next(k for k, d in enumerate(documents) if d.max() >= 30000)
    with pytest.raises(ValueError, match=rf"token id {1000 * document} \(document {document}, token 0 of "
                                         rf"sequence {document}\) is outside the vocabulary of size 30000"):
        build_train_valid_test_datasets(prefix, "1,0,0", [5, 0, 0], 8, 1, verbose=False, vocab_size=30000)


def test_empty_split_is_none_and_bad_arguments_are_named(corpus):
    prefix, _ = corpus
    train, valid, test = build_train_valid_test_datasets(prefix, "100,0,0", [10, 0, 0], 8, 1, verbose=False)
    assert valid is None and test is None and len(train) >= 10
    with pytest.raises(ValueError, match="needs 3 numbers"):
        build_train_valid_test_datasets(prefix, "1,1,1", [10, 10], 8, 1)
    with pytest.raises(ValueError, match=r"seq_length \(0\)"):
        GPTDataset("train", prefix, np.arange(3), MMapIndexedDataset(prefix), 10, 0, 1)
