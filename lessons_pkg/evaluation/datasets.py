"""The two tasks' data: reading the files, and turning them into scored samples as Megatron does.

LAMBADA (``--task LAMBADA``): a JSON-lines file, one ``{"text": "..."}`` per
line, each a passage whose last word is to be predicted (OpenAI's test set has
5153). Megatron's two ways to cut a passage (``tasks/zeroshot_gpt/datasets.py``):

* non-strict (default): tokenize the whole passage; the last BPE token is the
  target, everything before it the context. A word of several tokens is then
  half given away: for ``" Kowalski"`` = ``" Kow" "alski"`` only ``"alski"`` is
  predicted, after ``" Kow"``.
* strict (``--strict-lambada``): the last whitespace-separated word is the
  target, tokenized on its own with its leading space (``" Kowalski"``); the
  context is the text before it, stripped. The example counts as correct only
  if the model's argmax is right at *every* target token.

WikiText-103 (``--task WIKITEXT103``): one text file, read whole, detokenized
(:mod:`lessons_pkg.evaluation.detokenizer`), tokenized in one piece and cut into
windows (:mod:`lessons_pkg.evaluation.windows`). Megatron counts the file's
"original tokens" by splitting the raw text on single spaces; that count turns
the per-BPE-token perplexity into the per-word one (the adjusted perplexity).

Readers fail loudly: a missing or empty file, a line that is not JSON, has no
``"text"`` string, or whose text is empty is an error that names the file and
line. Nothing is ever replaced by other data behind the caller's back.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from lessons_pkg.errors import UserError
from lessons_pkg.evaluation.detokenizer import get_detokenizer
from lessons_pkg.evaluation.windows import Sample, overlapping_windows


class DataError(UserError):
    """An evaluation file that cannot be used as asked; the message names the file (and line)."""


def check_file(path: str, flag: str = "--valid-data") -> None:
    if not os.path.exists(path):
        raise DataError(f"{flag} {path!r}: no such file")
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{flag} {path!r} is empty")


# ---- LAMBADA ----------------------------------------------------------------------------------


def read_lambada_jsonl(path: str) -> list[str]:
    """The passages of a LAMBADA jsonl file; a malformed line is an error naming ``path:line``."""
    check_file(path)
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a trailing blank line is not an example
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not a JSON object ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f"{where}: expected an object with a \"text\" field, got {line.strip()[:80]!r}")
            text = record["text"]
            if not isinstance(text, str):
                raise DataError(f"{where}: \"text\" must be a string, got {type(text).__name__}")
            if len(text.split()) < 2:
                raise DataError(f"{where}: a LAMBADA passage needs a context and a last word, got {text!r}")
            texts.append(text)
    if not texts:
        raise DataError(f"--valid-data {path!r} has no examples (only blank lines)")
    return texts


def lambada_context_and_target(text: str, tokenize, strict: bool) -> tuple[list[int], list[int]]:
    """Megatron's cut of a passage into context ids and target ids (see the module docstring)."""
    if not strict:
        ids = tokenize(text)
        return ids[:-1], ids[-1:]
    last_word = text.split()[-1]
    start = text.rfind(last_word)
    return tokenize(text[:start].strip()), tokenize(" " + last_word)


@dataclass
class LambadaSamples:
    samples: list[Sample]
    contexts: list[list[int]]   # before any truncation, for display
    targets: list[list[int]]
    truncated: int              # passages whose context lost its beginning to fit seq_length


def lambada_samples(texts: list[str], tokenizer, seq_length: int, strict: bool) -> LambadaSamples:
    """One :class:`Sample` per passage: context + target, only the target's predictions scored.

    A passage longer than ``seq_length + 1`` tokens keeps its last
    ``seq_length + 1`` (the beginning of the context is dropped, as
    lm-evaluation-harness does; Megatron assumes passages fit). The number of
    such passages is reported.
    """
    samples, contexts, targets, truncated = [], [], [], 0
    for i, text in enumerate(texts):
        context, target = lambada_context_and_target(text, tokenizer.tokenize, strict)
        if not context:
            raise DataError(f"example {i + 1}: nothing precedes the target (text {text[:60]!r})")
        if len(target) > seq_length:
            raise DataError(f"example {i + 1}: the target has {len(target)} tokens, more than seq_length {seq_length}")
        tokens = context + target
        mask = [0] * (len(context) - 1) + [1] * len(target)
        if len(tokens) > seq_length + 1:
            truncated += 1
            tokens, mask = tokens[-(seq_length + 1):], mask[-seq_length:]
        samples.append(Sample(tokens, mask))
        contexts.append(context)
        targets.append(target)
    return LambadaSamples(samples, contexts, targets, truncated)


# ---- WikiText ---------------------------------------------------------------------------------


@dataclass
class TextSamples:
    samples: list[Sample]
    num_original_tokens: int     # words of the raw file (split on single spaces, Megatron's count)
    num_tokenized_tokens: int    # BPE tokens of the detokenized text
    detokenizer: str


def read_text(path: str) -> str:
    """A whole text file as UTF-8 (an error naming the byte offset if it is not UTF-8)."""
    check_file(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"--valid-data {path!r} holds only whitespace")
    return text


def wikitext_samples(path: str, tokenizer, seq_length: int, overlap: int | None) -> TextSamples:
    """Megatron's WIKITEXT103 data: count words, detokenize (by file name), tokenize, cut into windows."""
    raw = read_text(path)
    num_original = len(raw.strip().split(" "))
    name, detokenize = get_detokenizer(path)
    tokens = tokenizer.tokenize(detokenize(raw))
    return TextSamples(overlapping_windows(tokens, seq_length, overlap), num_original, len(tokens), name)


# ---- the official test sets, through `datasets` (needs the network) ---------------------------

LAMBADA_HUB = ("EleutherAI/lambada_openai", "default", "test")        # OpenAI's 5153 passages
WIKITEXT_HUB = ("wikitext", "wikitext-103-v1", "test")                # the tokenized wiki.test.tokens


def download_lambada(out_dir: str) -> str:
    """OpenAI's LAMBADA test set as ``lambada_test.jsonl`` (the file Megatron's example uses)."""
    from datasets import load_dataset

    name, config, split = LAMBADA_HUB
    data = load_dataset(name, config, split=split)
    path = os.path.join(out_dir, "lambada_test.jsonl")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in data["text"]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def download_wikitext103(out_dir: str) -> str:
    """WikiText-103's test split as ``wikitext-103_wiki.test.tokens`` (lines kept as they are)."""
    from datasets import load_dataset

    name, config, split = WIKITEXT_HUB
    data = load_dataset(name, config, split=split)
    path = os.path.join(out_dir, "wikitext-103_wiki.test.tokens")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(data["text"]))
    return path
