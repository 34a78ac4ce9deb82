"""Megatron-LM's GPT dataset: fixed-length samples cut across document boundaries, with three indices.

GPT pretraining has no padding. The documents of a split are shuffled and laid
end to end (each ends with the ``<|endoftext|>`` token that
``preprocess_data.py --append-eod`` added), and that token stream is cut into
samples of ``seq_length + 1`` tokens: the model reads tokens ``[0, seq_length)``
and predicts ``[1, seq_length]``. Consecutive samples share one token (the last
label of sample k is the first input of sample k+1), so sample k starts at
stream position ``k * seq_length``. Three arrays, built once and saved as
``.npy`` next to the data, turn a sample number into tokens:

* ``doc_idx``  [epochs * docs]: the split's document ids, repeated once per
  epoch and shuffled (the order documents appear in the stream).
* ``sample_idx`` [samples + 1, 2]: where sample k starts, as (position in
  ``doc_idx``, token offset in that document). Sample k is everything from row
  k up to and including the token at row k + 1.
* ``shuffle_idx`` [samples]: a permutation, so consecutive training steps read
  samples from unrelated places in the stream.

``dataset[i]`` reads sample ``shuffle_idx[i]``. The functions below follow
Megatron-LM's ``megatron/data/gpt_dataset.py`` step by step (same NumPy
``RandomState`` calls in the same order, so the same seed gives the same
indices), except the sample index, which Megatron builds with a C++ loop
(``helpers.build_sample_idx``): :func:`build_sample_idx_reference` is that loop
in Python, :func:`build_sample_idx` computes the same array with
``np.searchsorted``; the tests check that they agree.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np

from lessons_pkg.data.indexed_dataset import MMapIndexedDataset
from lessons_pkg.errors import UserError

# ---------------------------------------------------------------------------------------------
# train / valid / test split of the documents
# ---------------------------------------------------------------------------------------------


def get_train_valid_test_split(splits_string: str, size: int) -> list[int]:
    """Document boundaries ``[0, train_end, valid_end, size]`` for ``--split 949,50,1``.

    Megatron's ``get_train_valid_test_split_``: weights are normalised, each
    split gets ``round(weight * size)`` documents, and any rounding excess is
    taken from the end so the last boundary is exactly ``size``.
    """
    separator = "," if "," in splits_string else "/"
    try:
        weights = [float(s) for s in splits_string.split(separator)]
    except ValueError:
        raise UserError(f"--split {splits_string!r} must be numbers separated by ',' or '/', like 949,50,1") from None
    weights = (weights + [0.0, 0.0])[:3]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--split {splits_string!r} needs non-negative weights with a positive sum")
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * float(size))))
    excess = bounds[-1] - size
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    assert bounds[-1] == size
    return bounds


# ---------------------------------------------------------------------------------------------
# the three indices
# ---------------------------------------------------------------------------------------------


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest number of passes over the split that yields ``num_samples`` samples.

    ``e`` epochs hold ``e * tokens_per_epoch`` tokens, which give
    ``(e * tokens_per_epoch - 1) // seq_length`` samples: each sample needs
    ``seq_length + 1`` tokens, and all but the last share their final token
    with the next one.
    """
    if tokens_per_epoch < 2:
        raise UserError(f"the split has {tokens_per_epoch} tokens; a sample needs at least 2")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))  # ceil((ns*sl + 1) / tpe)


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                  separate_last_epoch: bool) -> np.ndarray:
    """The split's documents repeated ``num_epochs`` times, shuffled (as one block, or the
    last epoch shuffled on its own when ``separate_last_epoch``, see :func:`build_indices`)."""
    if not separate_last_epoch or num_epochs == 1:
        doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)  # [epochs * docs]
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, num_epochs - 1, rng, False)
    last = build_doc_idx(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_idx_reference(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int,
                               num_epochs: int, tokens_per_epoch: int) -> np.ndarray:
    """Megatron's loop (``helpers.build_sample_idx``): walk the stream, ``seq_length + 1`` tokens a sample."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int64)
    doc_pos, doc_offset = 0, 0  # position in doc_idx, token offset in that document
    for k in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = int(sizes[doc_idx[doc_pos]]) - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                # The sample ends inside this document; its last token starts the next sample.
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_pos, doc_offset = doc_pos + 1, 0
        sample_idx[k] = doc_pos, doc_offset
    return sample_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int,
                     num_epochs: int, tokens_per_epoch: int) -> np.ndarray:
    """Same array as :func:`build_sample_idx_reference`, without a Python loop.

    Sample k starts at stream position ``k * seq_length``; the document holding
    that position is the last one whose first token is at or before it.
    """
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    doc_lengths = np.asarray(sizes, dtype=np.int64)[doc_idx]          # [epochs * docs]
    doc_starts = np.concatenate(([0], np.cumsum(doc_lengths)[:-1]))    # stream position of each doc
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length  # [samples + 1]
    doc_pos = np.searchsorted(doc_starts, positions, side="right") - 1
    sample_idx = np.stack((doc_pos, positions - doc_starts[doc_pos]), axis=1)  # [samples + 1, 2]
    sample_idx[0] = 0, 0  # the loop starts at (0, 0) even if the first document were empty
    return sample_idx


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of ``[0, num_samples)`` followed by a separate permutation of ``[num_samples, total_size)``."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_indices(documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(doc_idx, sample_idx, shuffle_idx)`` for the given split, as Megatron builds them.

    When the last epoch is needed for fewer than 80% of its samples, Megatron
    shuffles it separately from the earlier epochs and puts its samples after
    theirs in the shuffle index. Training, which reads the shuffle index from
    the start, then consumes every sample of the full epochs (each document
    equally often) and only the few it needs from the last one.
    """
    tokens_per_epoch = int(np.asarray(sizes, dtype=np.int64)[documents].sum())
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    separate_last_epoch = False
    if num_epochs > 1:
        samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_last_epoch = num_samples - samples_before_last < int(0.80 * samples_per_epoch)
    doc_idx = build_doc_idx(documents, num_epochs, rng, separate_last_epoch)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    total = sample_idx.shape[0] - 1
    shuffle_idx = build_shuffle_idx(samples_before_last if separate_last_epoch else total, total, rng)
    return doc_idx, sample_idx, shuffle_idx


# ---------------------------------------------------------------------------------------------
# the dataset, with the indices cached on disk
# ---------------------------------------------------------------------------------------------


def _index_cache_prefix(data_prefix: str, name: str, documents: np.ndarray, sizes: np.ndarray,
                        num_samples: int, seq_length: int, seed: int) -> str:
    """Megatron's ``<prefix>_<name>_indexmap_<ns>ns_<sl>sl_<seed>s`` plus a hash of the split's
    documents and their sizes, so a different ``--split`` or re-tokenized data never reuses stale indices."""
    digest = hashlib.md5()
    digest.update(np.asarray(documents, dtype=np.int64).tobytes())
    digest.update(np.asarray(sizes, dtype=np.int64)[documents].tobytes())
    return (f"{data_prefix}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s_"
            f"{digest.hexdigest()[:10]}")


def _save_atomically(path: str, array: np.ndarray) -> None:
    # Ranks may build the same indices at once: each writes a private file and renames it,
    # so nobody ever loads a half-written .npy.
    # A failed write (a full disk, a read-only folder) leaves no file and names the cache it was for.
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write the dataset index cache {path}: {e.strerror or e}") from None


class GPTDataset:
    """Samples of ``seq_length + 1`` token ids from the documents ``documents`` of an indexed dataset.

    ``dataset[i]`` is ``{"text": np.ndarray[int64] of shape [seq_length + 1]}``.
    ``len(dataset)`` counts every sample of the epochs built (at least
    ``num_samples``). ``built_indices`` says whether this object computed the
    indices (True) or loaded them from the ``.npy`` cache (False).
    """

    def __init__(self, name: str, data_prefix: str, documents: np.ndarray, indexed_dataset,
                 num_samples: int, seq_length: int, seed: int, verbose: bool = False):
        documents = np.asarray(documents, dtype=np.int32)
        sizes = indexed_dataset.sizes
        if len(documents) == 0 or documents.min() < 0 or documents.max() >= len(sizes):
            raise ValueError(f"{name}: documents must be a non-empty subset of [0, {len(sizes)}), "
                             f"got {len(documents)} ids")
        if seq_length < 1 or num_samples < 0:
            raise ValueError(f"{name}: seq_length ({seq_length}) must be >= 1 and num_samples ({num_samples}) >= 0")
        self.name, self.seq_length, self.indexed_dataset = name, seq_length, indexed_dataset
        self.index_prefix = _index_cache_prefix(data_prefix, name, documents, sizes,
                                                num_samples, seq_length, seed)
        paths = [f"{self.index_prefix}_{kind}_idx.npy" for kind in ("doc", "sample", "shuffle")]
        self.built_indices = not all(os.path.isfile(p) for p in paths)
        if self.built_indices:
            for path, array in zip(paths, build_indices(documents, sizes, num_samples, seq_length, seed)):
                _save_atomically(path, array)
        self.doc_idx, self.sample_idx, self.shuffle_idx = (np.load(p, mmap_mode="r") for p in paths)
        if verbose:
            action = "built and saved" if self.built_indices else "loaded cached"
            print(f" > {name}: {action} indices {os.path.basename(self.index_prefix)}_*.npy: "
                  f"{len(documents)} documents, "
                  f"{len(self)} samples of {seq_length + 1} tokens", flush=True)

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k = int(self.shuffle_idx[i])
        (first_pos, first_offset), (last_pos, last_offset) = self.sample_idx[k], self.sample_idx[k + 1]
        first_pos, first_offset, last_pos, last_offset = map(int, (first_pos, first_offset, last_pos, last_offset))
        get = self.indexed_dataset.get
        if first_pos == last_pos:  # inside one document
            pieces = [get(int(self.doc_idx[first_pos]), offset=first_offset,
                          length=last_offset - first_offset + 1)]
        else:  # rest of the first document, whole documents in between, head of the last one
            pieces = [get(int(self.doc_idx[first_pos]), offset=first_offset)]
            pieces += [get(int(self.doc_idx[p])) for p in range(first_pos + 1, last_pos)]
            pieces.append(get(int(self.doc_idx[last_pos]), length=last_offset + 1))
        return {"text": np.concatenate(pieces).astype(np.int64)}  # [seq_length + 1]


def check_token_ids(indexed: MMapIndexedDataset, vocab_size: int, chunk_tokens: int = 1 << 24) -> None:
    """Raise ``ValueError`` naming the first token id outside ``[0, vocab_size)`` and its document.

    One pass over the ``.bin`` (memory-mapped, ``chunk_tokens`` at a time): at
    memory speed, a second or two per GB, once per build. Ids the model has no
    row for would otherwise fail inside the embedding (one rank) or, split over
    ranks, silently become zero vectors and wrong losses.
    """
    tokens = np.frombuffer(indexed._bin, dtype=indexed.dtype) if len(indexed._bin) else np.zeros(0, indexed.dtype)
    for start in range(0, len(tokens), chunk_tokens):
        chunk = tokens[start:start + chunk_tokens]
        if chunk.min() >= 0 and chunk.max() < vocab_size:
            continue
        at = start + int(np.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0])
        ends = np.cumsum(indexed.sizes.astype(np.int64))
        sequence = int(np.searchsorted(ends, at, side="right"))
        document = int(np.searchsorted(indexed.document_indices, sequence, side="right")) - 1
        raise UserError(f"{indexed.prefix}: token id {int(tokens[at])} (document {document}, token "
                         f"{at - (int(ends[sequence - 1]) if sequence else 0)} of sequence {sequence}) is outside "
                         f"the vocabulary of size {vocab_size}; were these data made with another tokenizer?")


def build_train_valid_test_datasets(data_prefix: str, splits_string: str, train_valid_test_num_samples,
                                    seq_length: int, seed: int, verbose: bool = True, vocab_size: int | None = None):
    """Megatron's entry point: split ``<data_prefix>.bin/.idx`` by documents, one :class:`GPTDataset` each.

    ``data_prefix`` is the path without ``.bin``/``.idx`` (``data/my-gpt2_text_document``).
    Returns ``(train, valid, test)``; a split that receives no documents is ``None``,
    as in Megatron. Every rank may call this: the indices are built once and
    reused from ``<data_prefix>_<split>_indexmap_*.npy`` afterwards. With
    ``vocab_size``, every token id is first checked to be below it (:func:`check_token_ids`).
    """
    if len(train_valid_test_num_samples) != 3:
        raise ValueError(f"train_valid_test_num_samples needs 3 numbers, got {train_valid_test_num_samples}")
    indexed = MMapIndexedDataset(data_prefix)
    if vocab_size is not None:
        check_token_ids(indexed, vocab_size)
    bounds = get_train_valid_test_split(splits_string, len(indexed))
    if verbose:
        print(f" > {data_prefix}: {len(indexed)} documents, split {splits_string} -> "
              f"train [{bounds[0]}, {bounds[1]}), valid [{bounds[1]}, {bounds[2]}), "
              f"test [{bounds[2]}, {bounds[3]})", flush=True)
    datasets = []
    for k, name in enumerate(("train", "valid", "test")):
        if bounds[k + 1] > bounds[k]:
            documents = np.arange(bounds[k], bounds[k + 1], dtype=np.int32)
            datasets.append(GPTDataset(name, data_prefix, documents, indexed,
                                       int(train_valid_test_num_samples[k]), seq_length, seed, verbose))
        else:
            datasets.append(None)
    return tuple(datasets)
