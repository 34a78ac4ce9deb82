"""End to end: corpus -> tokenizer -> preprocess_data.py (2 workers == 1 worker) -> GPT dataset."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lessons_pkg.data import MMapIndexedDataset, build_train_valid_test_datasets
from lessons_pkg.data.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def run(script, *args, timeout=120):
    """Run a src/ch6 script offline, as a learner would; fail with its output if it fails."""
    result = subprocess.run([sys.executable, f"src/ch6/{script}", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    corpus = tmp / "corpus.jsonl"
    out = run("megatron_datasets.py", "--output", corpus, "--num-samples", 150, "--min-length", 300,
              "--show", 1)
    assert "HF_HUB_OFFLINE is set" in out and "wrote 150 documents" in out
    run("train_tokenizer.py", "--input", corpus, "--output-dir", tmp, "--tokenizer", "auto",
        "--gpt2-dir", tmp / "no-gpt2-here", "--vocab-size", 300)
    outputs = {}
    for workers in (1, 2):
        log = run("preprocess_data.py", "--input", corpus, "--output-prefix", tmp / f"w{workers}",
                  "--vocab-file", tmp / "vocab.json", "--merge-file", tmp / "merges.txt",
                  "--tokenizer-type", "GPT2BPETokenizer", "--json-keys", "text", "--append-eod",
                  "--workers", workers, "--log-interval", 50)
        assert "Processed 150 documents" in log and "docs/s" in log and "MB/s" in log
        outputs[workers] = tmp / f"w{workers}_text_document"
    return tmp, corpus, outputs


def test_corpus_is_deterministic_jsonl_of_long_documents(pipeline):
    tmp, corpus, _ = pipeline
    lines = corpus.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 150 and all(len(json.loads(line)["text"]) >= 300 for line in lines)
    run("megatron_datasets.py", "--output", tmp / "again.jsonl", "--num-samples", 150,
        "--min-length", 300, "--show", 0)
    assert (tmp / "again.jsonl").read_bytes() == corpus.read_bytes()


def test_two_workers_write_the_same_bytes_as_one(pipeline):
    _, _, outputs = pipeline
    for suffix in (".bin", ".idx"):
        assert (outputs[2].parent / (outputs[2].name + suffix)).read_bytes() == \
            (outputs[1].parent / (outputs[1].name + suffix)).read_bytes()


def test_binarized_documents_decode_to_the_corpus_plus_eod(pipeline):
    tmp, corpus, outputs = pipeline
    tokenizer = build_tokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"))
    dataset = MMapIndexedDataset(str(outputs[2]))
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert dataset.dtype == np.uint16 and len(dataset) == len(texts)
    for tokens, text in zip(dataset[0:len(dataset)], texts):
        assert tokens[-1] == tokenizer.eod  # --append-eod
        assert tokens[:-1].tolist() == tokenizer.tokenize(text)
        assert tokenizer.detokenize(tokens[:-1]) == text


def test_gpt_dataset_reads_the_preprocessed_data(pipeline):
    _, _, outputs = pipeline
    train, valid, test = build_train_valid_test_datasets(str(outputs[2]), "949,50,1", [64, 8, 8], 32, 1234,
                                                         verbose=False)
    assert len(train) >= 64 and valid is not None
    assert all(train[i]["text"].shape == (33,) for i in range(64))


sys.path.insert(0, str(ROOT / "src" / "ch6"))
import preprocess_data  # noqa: E402
import train_tokenizer  # noqa: E402


def _preprocess(tmp, corpus_text, *extra):
    source = tmp / "bad.jsonl"
    source.write_text(corpus_text, encoding="utf-8")
    argv = ["--input", str(source), "--output-prefix", str(tmp / "out"), "--vocab-file", str(tmp / "vocab.json"),
            "--merge-file", str(tmp / "merges.txt"), "--append-eod", *extra]
    preprocess_data.main(argv)


@pytest.mark.parametrize("corpus_text, extra, message", [
    ("", (), "bad.jsonl: no document has any token under ['text'] (the file is empty); nothing was written"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', (), "bad.jsonl:3: not valid JSON"),
    ('{"text": "a"}\n{"text": 7}\n', (), "bad.jsonl:2: the value of 'text' is a int, not a string"),
    ('{"text": "a"}\n', ("--json-keys", "body"), "bad.jsonl:1: no key 'body' (--json-keys); the line has ['text']"),
    ('[1, 2]\n', (), "bad.jsonl:1: expected a JSON object, got list"),
])
def test_bad_input_is_named_with_its_line_and_leaves_the_existing_pair(pipeline, corpus_text, extra, message):
    tmp = pipeline[0]
    key = extra[1] if extra else "text"
    pair = [tmp / f"out_{key}_document{suffix}" for suffix in (".bin", ".idx")]
    for path in pair:
        path.write_bytes(b"an earlier pair")
    with pytest.raises(SystemExit) as info:
        _preprocess(tmp, corpus_text, *extra)
    assert message in str(info.value), info.value
    assert [path.read_bytes() for path in pair] == [b"an earlier pair"] * 2  # not renamed over
    assert [p.name for p in tmp.iterdir() if ".tmp-" in p.name] == []      # no temporary file left


def test_tokenizer_training_refuses_an_empty_corpus_and_writes_nothing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        train_tokenizer.main(["--input", str(tmp_path / "empty.jsonl"), "--output-dir", str(tmp_path / "tok"),
                              "--tokenizer", "train", "--vocab-size", "300"])
    assert "empty.jsonl: no text to train a tokenizer on (0 texts" in str(info.value)
    assert not (tmp_path / "tok" / "vocab.json").exists()


def test_found_tokenizer_files_are_described_from_their_contents(pipeline, tmp_path, capsys):
    tmp = pipeline[0]
    train_tokenizer.main(["--tokenizer", "gpt2", "--gpt2-dir", str(tmp), "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    merges = sum(1 for line in (tmp / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line)
    assert f"found 300 tokens and {merges} merges in {tmp / 'vocab.json'}" in out
    assert "GPT-2" not in out.split("\n")[0]  # 300 tokens: not GPT-2's, and not called so


def test_tokenizer_requests_that_cannot_be_honoured(tmp_path, monkeypatch):
    from lessons_pkg.data.tokenizer import train_byte_level_bpe

    with pytest.raises(ValueError, match=r"1 texts \(11 characters\) yield only \d+ tokens with min_frequency 2, "
                                         r"not the 400 asked for"):
        train_byte_level_bpe(["hello world"], 400, str(tmp_path / "tok"))
    assert not (tmp_path / "tok").exists()  # nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=rf"error: {bad}:2: not a JSON object with a 'text' field"):
        train_tokenizer.main(["--input", str(bad), "--output-dir", str(tmp_path), "--tokenizer", "train"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"error: --tokenizer gpt2: GPT-2's files are neither in --gpt2-dir"):
        train_tokenizer.main(["--tokenizer", "gpt2", "--gpt2-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path)])


@pytest.mark.parametrize("script, argv, message", [
    ("preprocess_data", ["--input", "/nonexistent.jsonl", "--output-prefix", "x", "--vocab-file", __file__,
                         "--merge-file", __file__], "--input /nonexistent.jsonl: no such file"),
    ("preprocess_data", ["--input", __file__, "--output-prefix", "x", "--vocab-file", __file__, "--merge-file",
                         __file__, "--workers", "0"], "--workers (0), --chunk-size (32) and --log-interval (1000) must be positive"),
    ("megatron_datasets", ["--num-samples", "0"], "--num-samples (0) and --min-length (512) must be positive"),
])
def test_argument_errors_name_the_values(script, argv, message, capsys):
    module = preprocess_data if script == "preprocess_data" else __import__("megatron_datasets")
    with pytest.raises(SystemExit) as info:
        module.get_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
