"""The offline stand-in: passages only from held-out documents, none ending as a training text does."""
from __future__ import annotations

import json

import pytest

from lessons_pkg.data.gpt_dataset import get_train_valid_test_split
from lessons_pkg.evaluation.standin import STANDIN_NOTICE, build_standin, cloze_passages, describe

SPLIT = "80,10,10"     # conftest.corpus: documents [16, 20) held out, 17 a copy of training document 3


def _ngrams(text: str, n: int) -> set:
    words = [w.rstrip(".") for w in text.split()]
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_standin_is_disjoint_from_training(world, corpus, tmp_path):
    prefix, docs = corpus
    report = build_standin(prefix, SPLIT, world.tokenizer, str(tmp_path), ngram=6, min_words=8, max_words=30)
    train_end = get_train_valid_test_split(SPLIT, len(docs))[1]
    assert report.train_documents == [0, train_end] and report.heldout_documents == [train_end, len(docs)] == [16, 20]
    train, heldout = docs[:train_end], docs[train_end:]
    with open(report.cloze_path, encoding="utf-8") as f:
        passages = [json.loads(line)["text"] for line in f]
    assert len(passages) == report.cloze_examples > 0
    seen = set().union(*(_ngrams(d, 6) for d in train))
    for p in passages:
        assert any(p in d for d in heldout), p                      # cut from a held-out document
        assert not any(p in d for d in train), p                    # never a piece of a training one
        assert tuple(w.rstrip(".") for w in p.split()[-6:]) not in seen
        *context, target = p.split()
        assert target.isalpha() and target in [w.rstrip(".") for w in context]
    # the held-out copy of a training document yields passages, and every one of them is dropped
    assert cloze_passages(docs[17], 8, 30) and report.cloze_excluded_seen_in_training >= len(cloze_passages(docs[17], 8, 30))
    with open(report.text_path, encoding="utf-8") as f:
        text = f.read()
    assert text == "\n\n".join(heldout) + "\n"
    assert STANDIN_NOTICE in describe(report)


def test_standin_refuses_a_split_with_nothing_held_out(world, corpus, tmp_path):
    with pytest.raises(ValueError, match="nothing held out"):
        build_standin(corpus[0], "100,0,0", world.tokenizer, str(tmp_path))
