"""Offline stand-ins for LAMBADA and WikiText-103, cut from documents the training split never saw.

Without network there is no LAMBADA and no WikiText-103. What the course does
have is its own corpus, tokenized into ``<prefix>.bin/.idx``, and the
``--split`` the training run used. Megatron's split is by *document*: with
``--split 949,50,1`` the training samples are built only from documents
``[0, train_end)`` (:func:`lessons_pkg.data.gpt_dataset.get_train_valid_test_split`),
and the validation and test documents ``[train_end, D)`` never reach a
gradient. The stand-ins are built from those held-out documents only:

* a cloze set in LAMBADA's format (``{"text": passage}`` per line): a passage
  of whole sentences (15 to 45 words by default: LAMBADA's average ~75 words would
  not fit the course model's 64 positions) ending at the last word of a sentence, where that word
  is alphabetic, at least ``--min-target-chars`` long and already occurs in the
  passage (LAMBADA's passages were chosen so that the context gives the word
  away; here "the word occurs earlier" is the cheap proxy);
* a held-out text for perplexity: the held-out documents, separated by blank lines.

Two guarantees, both checked when the files are built (and by ``tests/evaluation``):

1. every passage is a piece of a held-out document (documents are read by
   index from the training run's ``.bin``, so the split is the trainer's own);
2. no passage ends with an ``--ngram``-word sequence (default 6 words, the
   target included) that occurs anywhere in the training documents, so a
   document that was duplicated into the training split (the corpus's
   docstrings repeat themselves across modules) cannot leak its answers.

It is not LAMBADA: its passages are not filtered by people, the target is
often guessable from local context, and the numbers are not comparable with
published ones. Every run that uses it says so.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass

import numpy as np

STANDIN_NOTICE = ("STAND-IN DATA: not OpenAI's LAMBADA / not WikiText-103 (no network); held-out documents of the "
                  "course's own corpus: numbers are not comparable with published ones")
_END = re.compile(r"[.!?][\"')\]]*$")          # a word that ends a sentence
_TRAILING = re.compile(r"[.!?,;:\"')\]]+$")


@dataclass
class StandinReport:
    data_prefix: str
    split: str
    num_documents: int
    train_documents: list[int]        # [0, train_end)
    heldout_documents: list[int]      # [train_end, num_documents)
    cloze_examples: int
    cloze_excluded_seen_in_training: int
    heldout_words: int
    cloze_path: str
    text_path: str
    ngram: int


def _words(text: str) -> list[str]:
    """Whitespace words without trailing punctuation (a passage's target has lost its full stop)."""
    return [_TRAILING.sub("", w) for w in text.split()]


def _ngram_key(words: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(), "little", signed=True)


def training_ngrams(texts, n: int) -> np.ndarray:
    """Sorted hashes of every ``n``-word sequence of the training documents (see :func:`_words`)."""
    keys = []
    for text in texts:
        words = _words(text)
        keys.extend(_ngram_key(words[i:i + n]) for i in range(len(words) - n + 1))
    return np.unique(np.array(keys, dtype=np.int64))


def seen_in_training(passage: str, ngrams: np.ndarray, n: int) -> bool:
    """Whether the last ``n`` words of ``passage`` (its target included) occur in the training documents."""
    key = _ngram_key(_words(passage)[-n:])
    pos = np.searchsorted(ngrams, key)
    return bool(pos < len(ngrams) and ngrams[pos] == key)


def cloze_passages(text: str, min_words: int = 15, max_words: int = 45, min_target_chars: int = 4) -> list[str]:
    """LAMBADA-style passages of one document (see the module docstring), whitespace collapsed, non-overlapping."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    words = [text[a:b] for a, b in spans]
    starts = [0] + [i + 1 for i, w in enumerate(words[:-1]) if _END.search(w)]   # first word of each sentence
    passages, free_from = [], 0                                                  # words before free_from are used
    for e, word in enumerate(words):
        if not _END.search(word):
            continue
        target = _TRAILING.sub("", word)
        if len(target) < min_target_chars or not target.isalpha():
            continue
        candidates = [s for s in starts if s >= free_from and min_words <= e - s <= max_words]
        if not candidates:
            continue
        s = candidates[0]                                                        # the longest context that fits
        context = [_TRAILING.sub("", w) for w in words[s:e]]
        if target not in context:
            continue
        end = spans[e][0] + len(target)                                          # the target without its punctuation
        passages.append(" ".join(text[spans[s][0]:end].split()))
        free_from = e + 1
    return passages


def build_standin(data_prefix: str, split: str, tokenizer, out_dir: str, ngram: int = 6,
                  min_words: int = 15, max_words: int = 45, min_target_chars: int = 4) -> StandinReport:
    """Write ``standin_cloze.jsonl`` and ``standin_heldout.txt`` into ``out_dir``; return what was done."""
    from lessons_pkg.data.gpt_dataset import get_train_valid_test_split
    from lessons_pkg.data.indexed_dataset import MMapIndexedDataset

    dataset = MMapIndexedDataset(data_prefix)
    doc_starts = dataset.document_indices
    num_docs = len(doc_starts) - 1
    bounds = get_train_valid_test_split(split, num_docs)
    train_end = bounds[1]
    if train_end >= num_docs:
        raise ValueError(f"--split {split!r} gives all {num_docs} documents of {data_prefix} to training: "
                         "there is nothing held out to build a stand-in from")

    def document_text(d: int) -> str:
        ids = np.concatenate([dataset[i] for i in range(doc_starts[d], doc_starts[d + 1])])
        return tokenizer.detokenize([int(t) for t in ids if int(t) != tokenizer.eod])

    seen = training_ngrams((document_text(d) for d in range(train_end)), ngram)
    heldout = [document_text(d) for d in range(train_end, num_docs)]
    passages, excluded = [], 0
    for text in heldout:
        for passage in cloze_passages(text, min_words, max_words, min_target_chars):
            if seen_in_training(passage, seen, ngram):
                excluded += 1
            else:
                passages.append(passage)
    if not passages:
        raise ValueError(f"no cloze passage could be cut from the {len(heldout)} held-out documents of {data_prefix}")

    os.makedirs(out_dir, exist_ok=True)
    cloze_path = os.path.join(out_dir, "standin_cloze.jsonl")
    text_path = os.path.join(out_dir, "standin_heldout.txt")
    with open(cloze_path, "w", encoding="utf-8") as f:
        for passage in passages:
            f.write(json.dumps({"text": passage}, ensure_ascii=False) + "\n")
    heldout_text = "\n\n".join(t.strip() for t in heldout) + "\n"
    with open(text_path, "w", encoding="utf-8") as f:
        f.write(heldout_text)
    report = StandinReport(data_prefix, split, num_docs, [0, train_end], [train_end, num_docs], len(passages),
                           excluded, len(heldout_text.split()), cloze_path, text_path, ngram)
    with open(os.path.join(out_dir, "standin_manifest.json"), "w", encoding="utf-8") as f:
        json.dump(asdict(report), f, indent=2)
    return report


def describe(report: StandinReport) -> str:
    return (f"{STANDIN_NOTICE}\n"
            f" stand-in source: {report.data_prefix} documents [{report.heldout_documents[0]}, "
            f"{report.heldout_documents[1]}) of {report.num_documents}; --split {report.split} trains on "
            f"[0, {report.train_documents[1]}) only\n"
            f" stand-in cloze set: {report.cloze_examples} passages -> {report.cloze_path} "
            f"({report.cloze_excluded_seen_in_training} more dropped: their last {report.ngram} words occur in training)\n"
            f" stand-in held-out text: {report.heldout_words} words -> {report.text_path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the offline LAMBADA-format cloze set and held-out text.")
    parser.add_argument("--data-path", required=True, help="prefix of the training run's .bin/.idx")
    parser.add_argument("--split", required=True, help="the training run's --split, e.g. 949,50,1")
    parser.add_argument("--vocab-file", required=True)
    parser.add_argument("--merge-file", required=True)
    parser.add_argument("--tokenizer-type", default="GPT2BPETokenizer")
    parser.add_argument("--output-dir", default="data/eval")
    parser.add_argument("--ngram", type=int, default=6)
    args = parser.parse_args(argv)
    from lessons_pkg.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.vocab_file, args.merge_file, args.tokenizer_type)
    print(describe(build_standin(args.data_path, args.split, tokenizer, args.output_dir, args.ngram)))


if __name__ == "__main__":
    main()
