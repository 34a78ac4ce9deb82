"""Provide ``vocab.json`` + ``merges.txt`` for ``--tokenizer-type GPT2BPETokenizer``: GPT-2's, or trained here.

The lesson downloads GPT-2's two files. This script puts a tokenizer in that
same two-file format into --output-dir, choosing (``--tokenizer auto``):

1. GPT-2's files already on disk in --gpt2-dir (e.g. fetched with
   ``wget https://huggingface.co/gpt2/raw/main/vocab.json`` and ``.../merges.txt``);
2. otherwise GPT-2's files from the Hugging Face hub, when it can be reached;
3. otherwise a byte-level BPE of --vocab-size tokens trained on the corpus
   (``--input``, the JSONL of ``megatron_datasets.py``) with ``tokenizers``.

``--tokenizer train`` always trains (what ``make course`` does: a 2048-token
vocabulary keeps the CPU models small); ``--tokenizer gpt2`` insists on GPT-2's.

    python src/ch6/train_tokenizer.py --input data/megatron_datasets.jsonl --output-dir data --tokenizer train
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from lessons_pkg.data.tokenizer import EOD_TOKEN, build_tokenizer, load_vocab_and_merges, train_byte_level_bpe  # noqa: E402
from lessons_pkg.errors import OutputError  # noqa: E402
from lessons_pkg.hub import hub_reachable  # noqa: E402

GPT2_FILES = ("vocab.json", "merges.txt")


def jsonl_texts(path: str, key: str = "text"):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                yield json.loads(line)[key]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{path}:{number}: not a JSON object with a {key!r} field ({error})") from None


def find_gpt2_files(gpt2_dir: str | None) -> tuple[str, str] | None:
    """GPT-2's files from ``gpt2_dir`` if both are there, else from the hub if reachable, else None."""
    if gpt2_dir and all(os.path.isfile(os.path.join(gpt2_dir, name)) for name in GPT2_FILES):
        paths = tuple(os.path.join(gpt2_dir, name) for name in GPT2_FILES)
        print(describe_files(*paths))
        return paths
    reachable, reason = hub_reachable()
    if not reachable:
        print(f"no GPT-2 files in {gpt2_dir} and the hub is not reachable: {reason}")
        return None
    try:
        from huggingface_hub import hf_hub_download

        paths = tuple(hf_hub_download("openai-community/gpt2", name) for name in GPT2_FILES)
        print("downloaded GPT-2's vocab.json + merges.txt from the Hugging Face hub")
        return paths
    except Exception as error:
        print(f"downloading GPT-2's files failed ({type(error).__name__}: {error})")
        return None


def describe_files(vocab_file: str, merge_file: str) -> str:
    """What the two files hold, read from them (a broken file is a ``ValueError`` naming it)."""
    vocab, merges = load_vocab_and_merges(vocab_file, merge_file)
    gpt2 = len(vocab) == 50257 and vocab.get(EOD_TOKEN) == 50256
    return (f"found {len(vocab)} tokens and {len(merges)} merges in {vocab_file} + {merge_file}"
            f"{' (the size and eod id of GPT-2)' if gpt2 else ''}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default="megatron_datasets.jsonl",
                        help="JSONL corpus to train on (default: what megatron_datasets.py writes by default)")
    parser.add_argument("--json-keys", default="text")
    parser.add_argument("--output-dir", default=".",
                        help="where vocab.json and merges.txt are written (default: the current folder, beside "
                             "megatron_datasets.py's default corpus)")
    parser.add_argument("--tokenizer", choices=["auto", "gpt2", "train"], default="auto")
    parser.add_argument("--gpt2-dir", default="data/gpt2", help="a folder holding GPT-2's vocab.json + merges.txt")
    parser.add_argument("--vocab-size", type=int, default=2048, help="for a trained tokenizer")
    parser.add_argument("--min-frequency", type=int, default=2, help="for a trained tokenizer")
    args = parser.parse_args(argv)
    if args.tokenizer == "train" and not os.path.isfile(args.input):
        parser.error(f"--input {args.input}: no such file")

    os.makedirs(args.output_dir, exist_ok=True)
    vocab_file, merge_file = (os.path.join(args.output_dir, name) for name in GPT2_FILES)
    try:
        found = find_gpt2_files(args.gpt2_dir) if args.tokenizer != "train" else None
    except ValueError as error:
        sys.exit(f"error: {error}")
    if args.tokenizer == "gpt2" and found is None:
        sys.exit(f"error: --tokenizer gpt2: GPT-2's files are neither in --gpt2-dir ({args.gpt2_dir}) nor downloadable")
    if found is not None:
        for source, target in zip(found, (vocab_file, merge_file)):
            if os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)
        print(f"using the tokenizer of those files: {vocab_file}, {merge_file}")
    else:
        if args.tokenizer == "auto":
            print("--tokenizer auto: no GPT-2 files, so training one")
        print(f"training a byte-level BPE with {args.vocab_size} tokens on {args.input}")
        try:
            train_byte_level_bpe(jsonl_texts(args.input, args.json_keys), args.vocab_size, args.output_dir,
                                 args.min_frequency)
        except ValueError as error:
            if isinstance(error, OutputError):  # about the output: it names its folder
                raise
            sys.exit(f"error: {error}" if str(error).startswith(args.input) else f"error: {args.input}: {error}")
        print(f"wrote {vocab_file}, {merge_file}")

    tokenizer = build_tokenizer(vocab_file, merge_file)
    example = "Megatron-LM splits every layer across GPUs."
    ids = tokenizer.tokenize(example)
    print(f"vocab size {tokenizer.vocab_size}, eod ({'<|endoftext|>'}) = {tokenizer.eod}")
    print(f"{example!r} -> {ids}")
    round_trip = tokenizer.detokenize(ids) == example
    print(f"detokenize(tokenize(text)) == text: {round_trip}")
    if not round_trip:
        sys.exit(1)


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
