"""A tiny world for the evaluation tests: a locally trained BPE, a GPT trained in seconds, the task files.

The model is trained (single process, ``transformers``' GPT2LMHeadModel) on
passages ``"<filler words> the <colour> <object>."`` where each colour has one
object. The LAMBADA file holds ``len(COLOURS)`` passages that follow the rule
and ``len(WRONG)`` that break it, so a model that learned the rule scores
exactly ``len(COLOURS)`` whether the target is the last token or the whole word:
a count that all-zero results cannot fake, fixed before any evaluation runs.
The tokenizer's vocabulary is large enough for every word of the rule to be a
single token; three more passages end in words the model never saw, which are
several tokens each (so strict and non-strict targets differ there).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch

OBJECT_OF = {"red": "apple", "blue": "ocean", "green": "grass", "golden": "coin",
             "pink": "rose", "gray": "stone", "black": "night", "white": "snow"}
WRONG = [("red", "snow"), ("blue", "coin"), ("green", "night"), ("white", "apple")]
FILLER = "we saw that then there was a big small old new and".split()
STEPS = 80   # Adam 5e-3, 32 passages a step: the rule is learned by ~60 (measured), margins > 1 by 80
UNSEEN = ["quixotic", "zeppelin", "kumquat"]


def passage(rng: random.Random, colour: str, obj: str) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 4))) + f" the {colour} {obj}"


@dataclass
class World:
    dir: str
    vocab: str
    merges: str
    tokenizer: object
    config: object
    trained: object          # Pretrained
    lambada: str             # jsonl path: 8 passages by the rule, 4 against, then 3 ending in unseen words
    text: str                # a "wiki" text file (the WikiText detokenizer applies)
    expected_correct: int


def _train(config, tokenizer, texts: list[str], steps: int, seed: int) -> dict:
    from lessons_pkg.tensor_parallel import master_state_dict
    from lessons_pkg.tensor_parallel.hf import from_hf_state_dict, to_hf_model

    torch.manual_seed(seed)
    model = to_hf_model(master_state_dict(config, seed), config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    rng = random.Random(seed)
    for _ in range(steps):
        batch = [tokenizer.tokenize(t) for t in rng.sample(texts, 32)]
        length = max(map(len, batch))
        ids = torch.tensor([b + [tokenizer.eod] * (length - len(b)) for b in batch])
        labels = torch.tensor([b + [-100] * (length - len(b)) for b in batch])
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return from_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, config)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    from lessons_pkg.checkpoint.pretrained import Pretrained
    from lessons_pkg.data.tokenizer import build_tokenizer, train_byte_level_bpe
    from lessons_pkg.tensor_parallel import GPTConfig

    root = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    texts = [passage(rng, c, o) + "." for _ in range(40) for c, o in OBJECT_OF.items()]
    rng.shuffle(texts)
    vocab, merges = train_byte_level_bpe(texts, 340, str(root / "tokenizer"))
    tokenizer = build_tokenizer(vocab, merges)
    for word in [*OBJECT_OF, *OBJECT_OF.values()]:
        assert len(tokenizer.tokenize(" " + word)) == 1, f"{word!r} is not one token: the expected count needs it"
    config = GPTConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4,
                       max_position_embeddings=24, hidden_dropout=0.0, attention_dropout=0.0)
    state = _train(config, tokenizer, texts, steps=STEPS, seed=1)

    rng = random.Random(1)
    cases = ([passage(rng, c, o) for c, o in OBJECT_OF.items()] + [passage(rng, c, o) for c, o in WRONG]
             + [passage(rng, c, word) for c, word in zip(OBJECT_OF, UNSEEN)])
    lambada = root / "lambada_test.jsonl"
    lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in cases))
    text = root / "wiki.test.tokens"   # "wiki" in the name: Megatron's WikiText detokenizer applies
    text.write_text(" \n".join(passage(rng, c, o) + " , and ( so ) it is ." for c, o in OBJECT_OF.items()) * 2)
    return World(str(root), vocab, merges, tokenizer, config, Pretrained(config, state, tokenizer), str(lambada),
                 str(text), len(OBJECT_OF))


NOUNS = "lantern keeper garden river window letter candle harbor".split()
OTHER = "we saw the old and a then there was near by it is quiet bright".split()


def _document(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(4, 7)):
        noun = rng.choice(NOUNS)
        words = [rng.choice(OTHER) for _ in range(rng.randint(4, 8))]
        sentences.append(" ".join(words[:2] + [noun] + words[2:] + [rng.choice([noun, rng.choice(NOUNS)])]) + ".")
    return " ".join(sentences)


@pytest.fixture(scope="session")
def corpus(world, tmp_path_factory):
    """A tokenized corpus of 20 documents (split 80,10,10: 16 train, 4 held out) for the stand-in."""
    import numpy as np

    from lessons_pkg.data.indexed_dataset import IndexedDatasetBuilder

    rng = random.Random(0)
    docs = [_document(rng) for _ in range(20)]
    docs[17] = docs[3]     # a held-out copy of a training document (test_standin.py)
    prefix = str(tmp_path_factory.mktemp("standin") / "corpus_text_document")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for d in docs:
            builder.add_document(world.tokenizer.tokenize(d) + [world.tokenizer.eod])
    return prefix, docs
