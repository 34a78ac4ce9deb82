"""Tokenize a JSONL corpus in parallel and binarize it into Megatron-LM's ``.bin``/``.idx`` pair.

Megatron-LM's ``tools/preprocess_data.py``, with its options and output:

    python src/ch6/preprocess_data.py --input data/megatron_datasets.jsonl --output-prefix data/my-gpt2 \\
        --vocab-file data/vocab.json --merge-file data/merges.txt --tokenizer-type GPT2BPETokenizer \\
        --json-keys text --append-eod --workers 2

writes ``data/my-gpt2_text_document.bin`` and ``.idx`` (one file pair per
``--json-keys`` key). The main process reads the JSONL and hands lines to
``--workers`` processes in chunks (``Pool.imap``, which returns results in
input order, so the output does not depend on the number of workers); each
worker builds its own tokenizer once and turns a line into token ids, plus the
``<|endoftext|>`` id with ``--append-eod`` so that documents stay separated
once the GPT dataset concatenates them. The main process appends each document
to the ``.bin`` and writes the ``.idx`` at the end (byte layout in
``lessons_pkg/data/indexed_dataset.py``). Empty documents are skipped.

A line that is not a JSON object with a string under every ``--json-keys``
key stops the run with an error naming the file and the line number; an input
with no tokens at all is an error too. Either way no temporary file is left
and an existing ``.bin``/``.idx`` pair under the same prefix is not touched.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallelism comes from the worker processes

import numpy as np  # noqa: E402

from lessons_pkg.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset, best_fitting_dtype  # noqa: E402
from lessons_pkg.data.tokenizer import build_tokenizer  # noqa: E402


class Encoder:
    """Runs in each worker: ``initializer`` builds the tokenizer once, ``encode`` handles one JSON line."""

    def __init__(self, args):
        self.args = args

    def initializer(self) -> None:
        Encoder.tokenizer = build_tokenizer(self.args.vocab_file, self.args.merge_file, self.args.tokenizer_type)

    def encode(self, numbered_line: tuple[int, str]) -> tuple[dict[str, list[int]], int]:
        """``({key: token ids}, bytes of the line)`` for ``(line number, line)``; a bad line is a ``ValueError``."""
        number, line = numbered_line
        where = f"{self.args.input}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        ids = {}
        for key in self.args.json_keys:
            if key not in data:
                raise ValueError(f"{where}: no key {key!r} (--json-keys); the line has {sorted(data)}")
            if not isinstance(data[key], str):
                raise ValueError(f"{where}: the value of {key!r} is a {type(data[key]).__name__}, not a string")
            tokens = Encoder.tokenizer.tokenize(data[key])
            if tokens and self.args.append_eod:
                tokens.append(Encoder.tokenizer.eod)
            ids[key] = tokens
        return ids, len(line.encode("utf-8"))


def output_prefix(args, key: str) -> str:
    """``<output-prefix>_<key>_document``, the ``--data-path`` pretraining takes."""
    return f"{args.output_prefix}_{key}_document"


def preprocess(args) -> dict[str, int]:
    """Tokenize ``args.input`` into one ``.bin``/``.idx`` pair per JSON key; returns document counts."""
    start = time.time()
    tokenizer = build_tokenizer(args.vocab_file, args.merge_file, args.tokenizer_type)
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    print(f"Opening {args.input}")
    print(f"vocab size {tokenizer.vocab_size} -> tokens stored as {dtype.__name__}; {args.workers} worker(s)")
    encoder = Encoder(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    builders = {}
    try:
        for key in args.json_keys:
            builders[key] = IndexedDatasetBuilder(output_prefix(args, key), dtype)
        counts = _write(args, encoder, builders, start)
        for builder in builders.values():  # every pair complete under its temporary names ...
            builder.finish()
    except BaseException:  # a bad line, a full disk, Ctrl-C: no temporary file left, no existing pair replaced
        for builder in builders.values():
            builder.discard()
        raise
    for key, builder in builders.items():  # ... before any of them replaces an earlier pair
        builder.publish()
        prefix = output_prefix(args, key)
        print(f"wrote {counts[key]} documents to {prefix}.bin ({os.path.getsize(prefix + '.bin')} bytes) "
              f"and {prefix}.idx ({os.path.getsize(prefix + '.idx')} bytes)")
    return counts


def _drain(results) -> None:
    """Read what is left of a ``Pool.imap`` iterator, errors included."""
    while True:
        try:
            next(results)
        except StopIteration:
            return
        except Exception:
            continue


def _write(args, encoder: Encoder, builders: dict, start: float) -> dict[str, int]:
    counts = {key: 0 for key in args.json_keys}
    skipped = 0
    processed_bytes = 0
    with open(args.input, encoding="utf-8") as lines, \
            multiprocessing.Pool(args.workers, initializer=encoder.initializer) as pool:
        print(f"Time to startup: {time.time() - start:.3f} s")
        start = time.time()
        stop = threading.Event()  # set on an error: the pool's feeder thread hands out no more lines

        def numbered_lines():
            for item in enumerate(lines, start=1):
                if stop.is_set():
                    return
                yield item

        encoded = pool.imap(encoder.encode, numbered_lines(), args.chunk_size)  # in input order
        try:
            for number, (document, line_bytes) in enumerate(encoded, start=1):
                processed_bytes += line_bytes
                for key, tokens in document.items():
                    if tokens:
                        builders[key].add_document(tokens)
                        counts[key] += 1
                    else:
                        skipped += 1
                if number % args.log_interval == 0:
                    elapsed = time.time() - start
                    print(f"Processed {number} documents ({number / elapsed:.1f} docs/s, "
                          f"{processed_bytes / elapsed / 1024 / 1024:.2f} MB/s).", flush=True)
        except Exception:
            # A bad line (raised in a worker) or a full disk: let the pool finish the few chunks it already
            # holds before leaving the `with`, whose terminate() can hang on a pool whose feeder thread is
            # blocked on a full pipe (without this: 1 hang in 60 runs of a bad key on 60 documents; with it, 0 in 80).
            stop.set()
            _drain(encoded)
            raise
    if skipped:
        print(f"skipped {skipped} empty documents")
    empty = [key for key, count in counts.items() if count == 0]
    if empty:
        raise ValueError(f"{args.input}: no document has any token under {empty} "
                         f"({'the file is empty' if processed_bytes == 0 else 'every one is empty'}); "
                         "nothing was written")
    return counts


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSONL file, one document per line")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="fields of each line to tokenize")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=["GPT2BPETokenizer"])
    group.add_argument("--vocab-file", required=True)
    group.add_argument("--merge-file", required=True)
    group.add_argument("--append-eod", action="store_true", help="end every document with <|endoftext|>")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    group.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only Megatron's mmap format")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--chunk-size", type=int, default=32, help="lines handed to a worker at a time")
    group.add_argument("--log-interval", type=int, default=1000, help="report progress every this many documents")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.chunk_size < 1 or args.log_interval < 1:
        parser.error(f"--workers ({args.workers}), --chunk-size ({args.chunk_size}) and "
                     f"--log-interval ({args.log_interval}) must be positive")
    for option, path in (("--input", args.input), ("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
        if not os.path.isfile(path):
            parser.error(f"{option} {path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    return args


def verify(args, counts: dict[str, int]) -> bool:
    """Read the pair back with Megatron's mmap reader: document count, and the first document decodes to its text."""
    tokenizer = build_tokenizer(args.vocab_file, args.merge_file, args.tokenizer_type)
    ok = True
    for key in args.json_keys:
        with open(args.input, encoding="utf-8") as f:  # the first document that was not skipped as empty
            first = next((text for text in (json.loads(line)[key] for line in f) if text), "")
        dataset = MMapIndexedDataset(output_prefix(args, key))
        tokens = dataset[0] if len(dataset) else np.zeros(0, dtype=np.int64)
        if args.append_eod and len(tokens):
            tokens = tokens[:-1]
        same_count = len(dataset) == counts[key]
        same_text = tokenizer.detokenize(tokens) == first
        print(f"read back {output_prefix(args, key)}: {len(dataset)} documents == {counts[key]} written: "
              f"{same_count}; first document decodes to its input text: {same_text}")
        ok = ok and same_count and same_text
    return ok


def main(argv=None) -> None:
    args = get_args(argv)
    try:
        counts = preprocess(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if not verify(args, counts):
        sys.exit(1)


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
