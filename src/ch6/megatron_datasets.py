"""Write the pretraining corpus: one ``{"text": ...}`` JSON line per document of at least --min-length characters.

Megatron-LM pretrains from a JSONL file; ``preprocess_data.py`` turns it into
the ``.bin``/``.idx`` pair. The lesson takes the first 10000 paragraphs of
WikiText-103 longer than 512 characters:

    python src/ch6/megatron_datasets.py                      # ./megatron_datasets.jsonl, as in the lesson
    python src/ch6/megatron_datasets.py --output data/megatron_datasets.jsonl   # what make course and 06c use

``--source auto`` (default) uses WikiText-103 from the Hugging Face hub when it
can be reached (``--source wikitext`` insists on it: no hub is an error), and otherwise English text that ships with every Python
installation, so nothing has to be downloaded: the reference-manual topics of
``pydoc_data.topics`` (what ``help("if")`` shows) and the docstrings of the
standard library's modules, classes and functions, read from the source files
with ``ast`` (never imported). Either way the texts go through ``datasets``.
The offline texts come grouped by module, so they are shuffled with --seed
(train/valid/test later take contiguous ranges of documents, and each should
see every kind of text); WikiText is kept in its order, as in the lesson.
Same options, same file, byte for byte.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from lessons_pkg.data.python_docs import stdlib_docstrings  # noqa: E402
from lessons_pkg.hub import hub_reachable  # noqa: E402,F401  (also used by the tests through this module)


def wikitext_texts() -> Iterator[str]:
    """The lesson's source: WikiText-103's training split, paragraph by paragraph."""
    from datasets import load_dataset

    train = load_dataset("wikitext", "wikitext-103-raw-v1", split="train")
    for batch in train.iter(batch_size=1000):
        yield from batch["text"]


# ---- offline English text: the documentation inside Python itself ------------------------------


def _paragraphs(text: str) -> Iterator[str]:
    """Prose paragraphs of a docstring, each on one line; code examples and indented blocks are dropped."""
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or all(line[:1].isspace() for line in lines):
            continue  # an indented block: code, a table, a signature
        if any(line.lstrip().startswith((">>>", "...", "$ ")) for line in lines):
            continue  # an interactive example
        paragraph = " ".join(line.strip() for line in lines)
        if sum(c.isalpha() for c in paragraph) > 0.6 * len(paragraph):  # mostly words
            yield paragraph


def _documents(text: str, min_length: int) -> Iterator[str]:
    """Consecutive paragraphs of one text joined until the document has ``min_length`` characters."""
    current: list[str] = []
    for paragraph in _paragraphs(text):
        current.append(paragraph)
        if sum(map(len, current)) + len(current) - 1 >= min_length:
            yield "\n".join(current)
            current = []


def python_documentation_texts() -> Iterator[str]:
    """pydoc's reference-manual topics, then the standard library's docstrings (sorted, so deterministic)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    yield from stdlib_docstrings(recursive=True)


def offline_documents(min_length: int, limit: int) -> Iterator[str]:
    count = 0
    for text in python_documentation_texts():
        for document in _documents(text, min_length):
            yield document
            count += 1
            if count >= limit:
                return


# ---- the corpus ----------------------------------------------------------------------------------


def build_corpus(source: str, num_samples: int, min_length: int, seed: int):
    """A ``datasets.Dataset`` with one ``text`` column: ``num_samples`` documents of >= ``min_length`` chars."""
    from datasets import Dataset

    asked = source
    if source in ("auto", "wikitext"):
        reachable, reason = hub_reachable()
        if not reachable and asked == "wikitext":
            raise RuntimeError(f"--source wikitext: the Hugging Face hub is not reachable ({reason}); "
                               "use --source offline, or --source auto to fall back")
        source = "wikitext" if reachable else "offline"
        if not reachable:
            print(f"Hugging Face hub not used: {reason}; using the documentation shipped with Python")
    if source == "wikitext":
        try:
            texts = []
            for text in wikitext_texts():
                if len(text) >= min_length:  # WikiText paragraphs are single lines
                    texts.append(text)
                    if len(texts) >= num_samples:
                        break
            print(f"source: WikiText-103 (wikitext-103-raw-v1, train split), first {len(texts)} paragraphs")
            return Dataset.from_dict({"text": texts})
        except Exception as error:  # no network after all, a proxy, a missing script...
            if asked == "wikitext":
                raise RuntimeError(f"--source wikitext: loading WikiText-103 failed "
                                   f"({type(error).__name__}: {error})") from error
            print(f"--source auto: loading WikiText-103 failed ({type(error).__name__}: {error}); "
                  "using the documentation shipped with Python")
    corpus = Dataset.from_dict({"text": list(offline_documents(min_length, num_samples))})
    print(f"source: documentation shipped with Python {sys.version.split()[0]} "
          f"(pydoc topics + standard-library docstrings), {len(corpus)} documents, shuffled with seed {seed}")
    return corpus.shuffle(seed=seed)


def write_jsonl(corpus, path: str) -> int:
    """One ``{"text": ...}`` per line, UTF-8 kept as is (``ensure_ascii=False``), as the lesson writes it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in corpus["text"]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return len(corpus)


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="megatron_datasets.jsonl",
                        help="the JSONL file (default: in the current folder, where the lesson's next command, "
                             "preprocess_data.py --input megatron_datasets.jsonl, reads it)")
    parser.add_argument("--num-samples", type=int, default=10000, help="documents to write (at most)")
    parser.add_argument("--min-length", type=int, default=512, help="minimum characters per document")
    parser.add_argument("--source", choices=["auto", "wikitext", "offline"], default="auto")
    parser.add_argument("--seed", type=int, default=1234, help="shuffles the offline documents")
    parser.add_argument("--show", type=int, default=3, help="print this many lines of the result")
    parser.add_argument("--show-chars", type=int, default=0,
                        help="cut each printed line after this many characters (0: whole line)")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.min_length < 1:
        parser.error(f"--num-samples ({args.num_samples}) and --min-length ({args.min_length}) must be positive")
    return args


def main(argv=None) -> None:
    args = get_args(argv)
    import datasets

    datasets.disable_progress_bars()
    try:
        corpus = build_corpus(args.source, args.num_samples, args.min_length, args.seed)
    except RuntimeError as error:
        sys.exit(f"error: {error}")
    count = write_jsonl(corpus, args.output)
    size = os.path.getsize(args.output)
    print(f"wrote {count} documents ({size / 1e6:.2f} MB) to {args.output}\n")
    with open(args.output, encoding="utf-8") as f:  # the structure of the data, as the lesson shows it
        for _, line in zip(range(args.show), f):
            line = line.rstrip("\n")
            if args.show_chars and len(line) > args.show_chars:
                line = line[: args.show_chars] + " ..."
            print(line, end="\n\n")


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
