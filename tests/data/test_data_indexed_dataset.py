"""Megatron's .bin/.idx: writer/reader round trip, the byte layout read back independently, the three readers, errors."""
import struct

import numpy as np
import pytest

from lessons_pkg.data import (
    CachedIndexedDataset,
    IndexedDatasetBuilder,
    IndexFormatError,
    LazyIndexedDataset,
    MMapIndexedDataset,
    best_fitting_dtype,
)


def random_documents(n=40, vocab=500, max_len=60, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]


def write(prefix, documents, dtype):
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for doc in documents:
            builder.add_document(doc)


def independent_read(prefix):
    """Parse the pair with struct and numpy only, from the documented layout (not with our reader)."""
    raw = open(f"{prefix}.idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, seq_count, doc_count = struct.unpack_from("<QBQQ", raw, 9)
    offset = 34
    sizes = np.frombuffer(raw, "<i4", seq_count, offset)
    pointers = np.frombuffer(raw, "<i8", seq_count, offset + 4 * seq_count)
    doc_idx = np.frombuffer(raw, "<i8", doc_count, offset + 12 * seq_count)
    assert len(raw) == offset + 12 * seq_count + 8 * doc_count  # nothing after the document indices
    dtype = {8: "<u2", 4: "<i4"}[code]
    data = open(f"{prefix}.bin", "rb").read()
    sequences = [np.frombuffer(data, dtype, int(n), int(p)) for n, p in zip(sizes, pointers)]
    return version, code, sizes, pointers, doc_idx, sequences, len(data)


@pytest.mark.parametrize("vocab_size, code, itemsize", [(50257, 8, 2), (65500, 4, 4)])
def test_byte_layout_matches_megatron(tmp_path, vocab_size, code, itemsize):
    # uint16 (code 8) below 65500 tokens, int32 (code 4) from 65500 on: Megatron's DType.optimal_dtype.
    documents = random_documents(vocab=vocab_size)
    write(tmp_path / "ds", documents, best_fitting_dtype(vocab_size))
    version, read_code, sizes, pointers, doc_idx, sequences, bin_bytes = independent_read(tmp_path / "ds")
    assert (version, read_code) == (1, code)
    assert sizes.tolist() == [len(d) for d in documents]
    assert pointers.tolist() == [itemsize * sum(len(d) for d in documents[:i]) for i in range(len(documents))]
    assert doc_idx.tolist() == list(range(len(documents) + 1))  # one sequence per document
    assert bin_bytes == itemsize * sum(len(d) for d in documents)
    assert all(np.array_equal(s, d) for s, d in zip(sequences, documents))


def test_round_trip_and_the_three_readers_agree(tmp_path):
    documents = random_documents()
    write(tmp_path / "ds", documents, np.uint16)
    readers = [MMapIndexedDataset(str(tmp_path / "ds")), LazyIndexedDataset(str(tmp_path / "ds")),
               CachedIndexedDataset(str(tmp_path / "ds"))]
    for reader in readers:
        assert len(reader) == len(documents)
        assert reader.sizes.tolist() == [len(d) for d in documents]
        for i, doc in enumerate(documents):
            assert np.array_equal(reader[i], doc), (type(reader).__name__, i)
        assert np.array_equal(reader[-1], documents[-1])
        assert all(np.array_equal(a, b) for a, b in zip(reader[5:9], documents[5:9]))
        assert np.array_equal(reader.get(3, offset=1, length=len(documents[3]) - 2), documents[3][1:-1])
        with pytest.raises(IndexError):
            reader[len(documents)]
        with pytest.raises(IndexError):
            reader.get(0, offset=0, length=len(documents[0]) + 1)
        with pytest.raises(IndexError):  # not "to the end of the file" (the following documents)
            reader.get(3, offset=1, length=-1)


def test_cached_reader_reads_only_what_was_prefetched(tmp_path):
    documents = random_documents()
    write(tmp_path / "ds", documents, np.uint16)
    cached = CachedIndexedDataset(str(tmp_path / "ds"), prefetch_all=False)
    cached.prefetch([7, 2])
    assert cached.cache.size == len(documents[2]) + len(documents[7])  # one contiguous RAM array
    assert np.array_equal(cached[7], documents[7])
    with pytest.raises(KeyError, match="not prefetched"):
        cached[3]


def test_token_ids_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ValueError, match="do not fit in uint16"):
        write(tmp_path / "ds", [np.array([1, 70000])], np.uint16)


def corrupt(tmp_path, edit):
    write(tmp_path / "ds", random_documents(n=5), np.uint16)
    idx = tmp_path / "ds.idx"
    raw = bytearray(idx.read_bytes())
    edit(raw, tmp_path)
    idx.write_bytes(bytes(raw))
    return str(tmp_path / "ds")


@pytest.mark.parametrize("edit, message", [
    (lambda raw, _: raw.__setitem__(slice(0, 9), b"TNTIDX\x00\x00\x00"), "magic .* older 'TNTIDX'"),
    (lambda raw, _: raw.__setitem__(slice(9, 17), struct.pack("<Q", 2)), "version 2, expected 1"),
    (lambda raw, _: raw.__setitem__(17, 99), "dtype code 99"),
    (lambda raw, _: raw.__delitem__(slice(-8, None)), "bytes, but a header declaring 5 sequences"),
    (lambda raw, _: raw.__setitem__(slice(34 + 20 + 8, 34 + 20 + 16), struct.pack("<q", 3)),
     "pointer of sequence 1 is 3"),
    (lambda raw, tmp: (tmp / "ds.bin").write_bytes((tmp / "ds.bin").read_bytes()[:-2]),
     r"declares \d+ tokens of uint16 .* has \d+ bytes"),
])
def test_corrupt_or_mismatched_index_names_the_file_and_the_problem(tmp_path, edit, message):
    prefix = corrupt(tmp_path, edit)
    for reader in (MMapIndexedDataset, LazyIndexedDataset, CachedIndexedDataset):
        with pytest.raises(IndexFormatError, match=message) as error:
            reader(prefix)
        assert "ds.idx" in str(error.value)
