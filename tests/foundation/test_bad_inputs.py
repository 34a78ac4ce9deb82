"""Every command-line tool given a bad input: one ``error:`` line that names it, exit status 2, no traceback.

Each case below runs a tool for real, as ``python FILE args`` (through
tests/foundation/tool_runner.py, which forks the interpreter after the heavy
imports, so a case costs a fraction of a second), with its bad file, value or
folder; cases with ``ranks`` > 1 start real ranks with torchrun. Each case is
a test: the status, no traceback, the error line (and that it is printed once
when several ranks meet it), and for write faults that nothing was lost.

When every case has run, the module writes docs/bad_inputs.md: the table of
what each input gave (exit status and error line, as recorded in this run).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest

from lessons_pkg.launch import USER_ERROR_LINE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "bad_inputs.md")
FULL_DISK = 64 * 1024  # RLIMIT_FSIZE for the full-disk cases: logs fit, checkpoint shards and .bin files do not


# --- the runner ----------------------------------------------------------------------------------
class Runner:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   TRANSFORMERS_VERBOSITY="error")
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "foundation", "tool_runner.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, tool: str, argv: list[str], env=None, fsize=None, timeout=120) -> dict:
        request = dict(tool=os.path.join(ROOT, tool), argv=[str(a) for a in argv], env=env or {}, fsize=fsize,
                       cwd=ROOT, timeout=timeout)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the tool runner died"
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# --- what the cases read: small real files -------------------------------------------------------
@dataclass
class Files:
    root: str
    vocab: str
    merges: str
    jsonl: str
    data: str      # prefix of a .bin/.idx pair
    hf: str        # a transformers GPT-2 folder with its tokenizer
    ckpt: str      # a Megatron checkpoint saved by pretrain_gpt.py at iteration 2 (TP=1)
    rows: dict = field(default_factory=dict)
    cleanups: list = field(default_factory=list)  # undone after each case (a mount, a mode)

    def fresh(self, name: str) -> str:
        """An empty folder of this case's own."""
        path = os.path.join(self.root, "cases", name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def copy_ckpt(self, name: str) -> str:
        path = os.path.join(self.fresh(name), "ckpt")
        shutil.copytree(self.ckpt, path)
        return path


SMALL_GPT = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
             "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "2"]


def pretrain_args(f: Files, *extra, iters=2) -> list[str]:
    return [*SMALL_GPT, "--train-iters", str(iters), "--lr", "1e-3", "--data-path", f.data, "--vocab-file", f.vocab,
            "--merge-file", f.merges, "--split", "90,8,2", "--eval-iters", "0", "--log-interval", "1", *extra]


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory, runner):
    import pydoc_data.topics

    from lessons_pkg.checkpoint import convert
    from lessons_pkg.checkpoint.reshard import Layout
    from lessons_pkg.data import IndexedDatasetBuilder
    from lessons_pkg.data.tokenizer import build_tokenizer, train_byte_level_bpe

    root = str(tmp_path_factory.mktemp("bad-inputs"))
    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 500][:60]
    vocab, merges = train_byte_level_bpe(texts, 300, root)
    jsonl = os.path.join(root, "docs.jsonl")
    with open(jsonl, "w") as out:
        for t in texts:
            out.write(json.dumps({"text": t}) + "\n")
    tok = build_tokenizer(vocab, merges)
    data = os.path.join(root, "docs_text_document")
    with IndexedDatasetBuilder(data) as builder:
        for t in texts:
            builder.add_document(tok.tokenize(t) + [tok.eod])

    from transformers import GPT2Config, GPT2LMHeadModel

    hf = os.path.join(root, "hf")
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=16, n_embd=32, n_layer=2, n_head=4)).save_pretrained(hf)
    for src in (vocab, merges):
        shutil.copy(src, hf)
    f = Files(root, vocab, merges, jsonl, data, hf, os.path.join(root, "ckpt"))
    done = runner.run("src/ch6/pretrain_gpt.py", pretrain_args(f, "--save", f.ckpt, "--save-interval", "2"))
    assert done["status"] == 0, done["stderr"]
    assert convert.hf_to_megatron(hf, os.path.join(root, "hf-megatron"), Layout(1, 1), log=lambda *a: None,
                                  progress=False)
    return f


# --- the cases -----------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    tool: str
    what: str                                   # the bad input, in words (the table's third column)
    argv: Callable[[Files], list]
    expect: str                                 # the error line must contain this (after its paths are shortened)
    status: int = 2
    setup: Callable[[Files], None] | None = None
    env: dict | None = None
    fsize: int | None = None
    ranks: int = 1                              # > 1: real ranks (torchrun); the line must be printed once
    then: Callable[[Files], None] | None = None  # nothing lost: checked after the run
    timeout: float = 120
    torchrun: bool = False                      # plain torchrun: its summary must name the line as root cause


def write(path: str, text: str | bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(text, bytes) else "w") as out:
        out.write(text)
    return path


def vocab_with(f: Files, name: str, change) -> str:
    """A copy of the case's vocab.json after ``change(vocab)``."""
    with open(f.vocab) as src:
        vocab = json.load(src)
    change(vocab)
    return write(os.path.join(f.root, "cases", name, "vocab.json"), json.dumps(vocab))


def corrupt_pair(f: Files, name: str, how: str) -> str:
    folder = f.fresh(name)
    prefix = os.path.join(folder, "d")
    for ext in (".bin", ".idx"):
        shutil.copy(f.data + ext, prefix + ext)
    if how == "magic":
        with open(prefix + ".idx", "r+b") as g:
            g.write(b"NOTMMIDX")
    elif how == "short-bin":
        with open(prefix + ".bin", "r+b") as g:
            g.truncate(os.path.getsize(prefix + ".bin") // 2)
    elif how == "short-idx":
        with open(prefix + ".idx", "r+b") as g:
            g.truncate(20)
    return prefix


def tracker(text):
    return lambda path: write(os.path.join(path, "latest_checkpointed_iteration.txt"), text)


def empty_iteration(path):
    shutil.rmtree(os.path.join(path, "iter_0000002"))
    os.makedirs(os.path.join(path, "iter_0000002"))


def truncated_file(path):
    file = os.path.join(path, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")
    with open(file, "r+b") as g:
        g.truncate(os.path.getsize(file) // 3)


def torch_dist(path):
    shutil.rmtree(os.path.join(path, "iter_0000002", "mp_rank_00"))
    write(os.path.join(path, "iter_0000002", "metadata.json"), "{}")
    write(os.path.join(path, "iter_0000002", "__0_0.distcp"), b"\0")


DAMAGES = {"abc": tracker("abc"), "missing-iter": tracker("7"), "half-written": empty_iteration,
           "truncated": truncated_file, "torch-dist": torch_dist}  # done to a copy of the iteration-2 checkpoint


def damaged(kind: str) -> Callable[[Files], str]:
    """The path of the damaged copy (made by ``make_damaged(kind)`` in the case's setup)."""
    return lambda f: os.path.join(f.root, "cases", f"ckpt-{kind}", "ckpt")


def make_damaged(kind: str) -> Callable[[Files], None]:
    return lambda f: DAMAGES[kind](f.copy_ckpt(f"ckpt-{kind}"))


def gen_args(load, *extra):
    return ["--load", load, "--prompt", "Hello", "--tokens-to-generate", "2", *extra]


def eval_args(f, *extra, load=None):
    return ["--task", "WIKITEXT103", "--valid-data", "standin", "--load", load or f.ckpt, "--seq-length", "8",
            "--micro-batch-size", "2", "--no-progress", *extra]


def unchanged_pair(prefix):
    def check(f: Files):
        for ext in (".bin", ".idx"):
            assert open(prefix(f) + ext, "rb").read() == open(f.data + ext, "rb").read()
        assert not [n for n in os.listdir(os.path.dirname(prefix(f))) if "tmp" in n]
    return check


def nothing_under(folder):
    def check(f: Files):
        path = folder(f)
        assert not os.path.exists(path) or not os.listdir(path), os.listdir(path)
        parent = os.path.dirname(path)
        assert not os.path.exists(parent) or not [n for n in os.listdir(parent) if ".tmp-" in n]
    return check


def tracker_still(iteration, folder):
    def check(f: Files):
        from lessons_pkg.checkpoint.layout import read_tracker

        path = folder(f)
        assert read_tracker(path) == iteration
        assert sorted(n for n in os.listdir(path) if n.startswith("iter_")) == [f"iter_{iteration:07d}"]
        assert not [p for p, _, names in os.walk(path) for n in names if n.endswith(".tmp")]
    return check


P, T, M, G, C = ("src/ch6/preprocess_data.py", "src/ch6/train_tokenizer.py", "src/ch6/megatron_datasets.py",
                 "src/ch6/pretrain_gpt.py", "src/ch6/checkpoint_util.py")
GEN, EV, S = "src/ch6/generate.py", "src/ch6/evaluate_gpt.py", "src/ch6/text_generation_server.py"
L = "lessons_pkg/launch.py"  # python -m lessons_pkg.launch --nproc N SCRIPT ARGS: torchrun with a timeout


def _torchrun_file() -> str:
    import torch.distributed.run

    return torch.distributed.run.__file__


TORCHRUN = _torchrun_file()  # plain torchrun: every rank's lines on one terminal, then torchrun's summary


def prep(f, *extra, input=None, vocab=None, merges=None, out=None, name="prep"):
    return ["--input", input or f.jsonl, "--vocab-file", vocab or f.vocab, "--merge-file", merges or f.merges,
            "--output-prefix", out or os.path.join(f.root, "cases", name, "out"), *extra]


def lines_file(name, *lines):
    return lambda f: write(os.path.join(f.root, "cases", name, "in.jsonl"), "".join(line + "\n" for line in lines))


def in_case(name, *parts):
    return lambda f: os.path.join(f.root, "cases", name, *parts)


def seed_pair(name):
    """An earlier good .bin/.idx pair under the output prefix the case writes to."""
    def setup(f: Files):
        folder = f.fresh(name)
        for ext in (".bin", ".idx"):
            shutil.copy(f.data + ext, os.path.join(folder, "out_text_document" + ext))
    return setup


def read_only(name):
    """A folder nobody may write to: a read-only tmpfs when we are root (root ignores permissions), else mode 555."""
    def setup(f: Files):
        folder = f.fresh(name)
        if os.geteuid() != 0:
            os.chmod(folder, 0o555)
            f.cleanups.append(lambda: os.chmod(folder, 0o755))
            return
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", folder], capture_output=True,
                                 text=True)
        if mounted.returncode != 0:
            pytest.skip(f"as root, a read-only folder needs a read-only mount, which failed: {mounted.stderr.strip()}")
        f.cleanups.append(lambda: subprocess.run(["umount", folder], check=True))
    return setup


def with_setups(*setups):
    def run(f):
        for s in setups:
            s(f)
    return run


CASES = [
    # ---- preprocess_data.py ----
    Case("prep-no-input", P, "`--input` that does not exist", lambda f: prep(f, input="/nonexistent.jsonl"),
         "--input /nonexistent.jsonl: no such file"),
    Case("prep-workers-0", P, "`--workers 0`", lambda f: prep(f, "--workers", "0"),
         "--workers (0), --chunk-size (32) and --log-interval (1000) must be positive"),
    Case("prep-empty", P, "an empty input file, with an earlier pair under the prefix",
         lambda f: prep(f, input=in_case("prep-empty", "in.jsonl")(f), name="prep-empty"),
         "in.jsonl: no document has any token under ['text'] (the file is empty); nothing was written",
         setup=with_setups(seed_pair("prep-empty"), lines_file("prep-empty")),
         then=unchanged_pair(in_case("prep-empty", "out_text_document"))),
    Case("prep-not-json", P, "a line that is not JSON",
         lambda f: prep(f, input=in_case("prep-bad", "in.jsonl")(f), name="prep-bad"),
         "in.jsonl:2: not valid JSON", setup=lines_file("prep-bad", '{"text": "a"}', '{"text": ')),
    Case("prep-int-text", P, '`{"text": 7}`', lambda f: prep(f, input=in_case("prep-int", "in.jsonl")(f)),
         "in.jsonl:1: the value of 'text' is a int, not a string", setup=lines_file("prep-int", '{"text": 7}')),
    Case("prep-missing-key", P, "`--json-keys body` on lines with `text`",
         lambda f: prep(f, "--json-keys", "body"), "docs.jsonl:1: no key 'body' (--json-keys); the line has ['text']"),
    Case("prep-list-line", P, "a line `[1, 2]`", lambda f: prep(f, input=in_case("prep-list", "in.jsonl")(f)),
         "in.jsonl:1: expected a JSON object, got list", setup=lines_file("prep-list", "[1, 2]")),
    Case("prep-vocab-cut", P, "a `vocab.json` cut short",
         lambda f: prep(f, vocab=in_case("prep-vocab-cut", "vocab.json")(f)), "vocab.json: not GPT-2's vocab.json",
         setup=lambda f: write(in_case("prep-vocab-cut", "vocab.json")(f), '{"a": 0,')),
    Case("prep-vocab-empty-token", P, "a `vocab.json` holding the empty token",
         lambda f: prep(f, vocab=in_case("prep-vocab-empty", "vocab.json")(f)),
         "is the empty string; a BPE vocabulary has no empty token",
         setup=lambda f: vocab_with(f, "prep-vocab-empty", lambda v: v.__setitem__("", len(v)))),
    Case("prep-vocab-bad-id", P, "a `vocab.json` whose id is a string",
         lambda f: prep(f, vocab=in_case("prep-vocab-id", "vocab.json")(f)), "has id '7'; ids are integers >= 0",
         setup=lambda f: vocab_with(f, "prep-vocab-id", lambda v: v.__setitem__("zzz", "7"))),
    Case("prep-vocab-dup-id", P, "a `vocab.json` giving one id to two tokens",
         lambda f: prep(f, vocab=in_case("prep-vocab-dup", "vocab.json")(f)), "is given to more than one token",
         setup=lambda f: vocab_with(f, "prep-vocab-dup", lambda v: v.__setitem__("zzz", 0))),
    Case("prep-vocab-no-eod", P, "a `vocab.json` without `<|endoftext|>`",
         lambda f: prep(f, vocab=in_case("prep-vocab-eod", "vocab.json")(f)), "has no <|endoftext|> token",
         setup=lambda f: vocab_with(f, "prep-vocab-eod", lambda v: v.pop("<|endoftext|>"))),
    Case("prep-merges-bad", P, "a `merges.txt` line with three symbols",
         lambda f: prep(f, merges=in_case("prep-merges", "merges.txt")(f)),
         "merges.txt:2: a merge is two symbols separated by a space, got 'a b c'",
         setup=lambda f: write(in_case("prep-merges", "merges.txt")(f), "#version: 0.2\na b c\n")),
    Case("prep-vocab-is-dir", P, "`--vocab-file` naming a folder", lambda f: prep(f, vocab=f.root),
         "--vocab-file …: a folder, not a file"),
    Case("prep-out-under-file", P, "`--output-prefix` under a file (a file where a folder goes)",
         lambda f: prep(f, out=os.path.join(f.jsonl, "out")), "docs.jsonl is a file, where a folder is needed"),
    Case("prep-full-disk", P, "a full disk while the `.bin` is written, with an earlier pair under the prefix",
         lambda f: prep(f, name="prep-full"), "cannot write …/cases/prep-full/out_text_document.bin: File too large",
         fsize=4096, setup=seed_pair("prep-full"),
         then=unchanged_pair(in_case("prep-full", "out_text_document"))),
    # ---- train_tokenizer.py ----
    Case("tok-empty", T, "an empty corpus",
         lambda f: ["--input", in_case("tok-empty", "in.jsonl")(f), "--output-dir", in_case("tok-empty", "out")(f),
                    "--tokenizer", "train"], "no text to train a tokenizer on (0 texts, all empty)",
         setup=lines_file("tok-empty"), then=nothing_under(in_case("tok-empty", "out"))),
    Case("tok-small-vocab", T, "`--vocab-size 100`",
         lambda f: ["--input", f.jsonl, "--output-dir", in_case("tok-100", "out")(f), "--tokenizer", "train",
                    "--vocab-size", "100"], "vocab_size (100) must be at least 257: 256 bytes + <|endoftext|>"),
    Case("tok-huge-vocab", T, "`--vocab-size 100000` on 60 documents",
         lambda f: ["--input", f.jsonl, "--output-dir", in_case("tok-huge", "out")(f), "--tokenizer", "train",
                    "--vocab-size", "100000"], "not the 100000 asked for: give more text or a smaller vocab_size",
         timeout=240),
    Case("tok-not-json", T, "a line that is not JSON",
         lambda f: ["--input", in_case("tok-bad", "in.jsonl")(f), "--output-dir", in_case("tok-bad", "out")(f),
                    "--tokenizer", "train"], "in.jsonl:2: not a JSON object with a 'text' field",
         setup=lines_file("tok-bad", '{"text": "a b c"}', "nope")),
    Case("tok-no-gpt2", T, "`--tokenizer gpt2` with no GPT-2 files and no network",
         lambda f: ["--tokenizer", "gpt2", "--gpt2-dir", in_case("tok-nogpt2", "none")(f), "--output-dir",
                    in_case("tok-nogpt2", "out")(f)], "--tokenizer gpt2: GPT-2's files are neither in --gpt2-dir"),
    Case("tok-no-input", T, "`--input` that does not exist",
         lambda f: ["--input", "/nonexistent.jsonl", "--output-dir", in_case("tok-noinput", "out")(f), "--tokenizer",
                    "train"], "--input /nonexistent.jsonl: no such file"),
    Case("tok-out-is-file", T, "`--output-dir` that is a file",
         lambda f: ["--input", f.jsonl, "--output-dir", f.jsonl, "--tokenizer", "train"],
         "docs.jsonl is a file, where a folder is needed"),
    # ---- megatron_datasets.py ----
    Case("data-samples-0", M, "`--num-samples 0`", lambda f: ["--num-samples", "0", "--output", in_case("m", "o")(f)],
         "--num-samples (0) and --min-length (512) must be positive"),
    Case("data-wikitext-offline", M, "`--source wikitext` without network",
         lambda f: ["--source", "wikitext", "--output", in_case("m-wiki", "o.jsonl")(f)],
         "--source wikitext: the Hugging Face hub is not reachable", then=nothing_under(in_case("m-wiki", "x"))),
    Case("data-out-under-file", M, "`--output` under a file",
         lambda f: ["--source", "offline", "--num-samples", "2", "--output", os.path.join(f.jsonl, "o.jsonl")],
         "docs.jsonl is a file, where a folder is needed"),
]

# ---- pretrain_gpt.py: refused with the other argument checks, before any process group ----
for flag, value, message in (
        ("--clip-grad", "-1", "--clip-grad must be >= 0 (0: no clipping), got -1.0"),
        ("--clip-grad", "nan", "--clip-grad must be >= 0 (0: no clipping), got nan"),
        ("--weight-decay", "-0.1", "--weight-decay must be >= 0, got -0.1"),
        ("--adam-beta1", "1.0", "--adam-beta1 must be in [0, 1), got 1.0"),
        ("--adam-beta2", "-0.1", "--adam-beta2 must be in [0, 1), got -0.1"),
        ("--adam-eps", "0", "--adam-eps must be > 0, got 0.0"),
        ("--adam-eps", "nan", "--adam-eps must be > 0, got nan"),
        ("--init-method-std", "0", "--init-method-std must be > 0, got 0.0"),
        ("--init-method-std", "nan", "--init-method-std must be > 0, got nan"),
        ("--lr", "nan", "--lr must be >= 0, got nan"),
        ("--exit-interval", "0", "--exit-interval must be >= 1, got 0"),
        ("--micro-batch-size", "0", "--micro-batch-size must be a positive integer, got 0"),
        ("--seq-length", "32", "seq-length (32) is larger than max-position-embeddings (16)"),
        ("--ckpt-format", "torch_dist", "--ckpt-format torch_dist: this trainer writes and reads"),
        ("--attention-backend", "flash", "--attention-backend flash: this course has auto"),
        ("--sequence-parallel", None, "needs --tensor-model-parallel-size > 1, got 1"),
        ("--bf16", None, "--bf16 needs CUDA GPUs"),
        ("--distributed-backend", "nccl", "--distributed-backend nccl needs one CUDA GPU per rank: this node runs 1 "
                                          "rank(s) and has 0 GPU(s)"),
        ("--tensor-model-parallel-size", "2", "world size (1) is not divisible by tensor-model-parallel-size (2)"),
        ("--split", "", "--split '' must be numbers separated by ',' or '/', like 949,50,1"),
        ("--save-interval", "5", "save-interval (5) is set but --save (the folder) is not"),
        ("--rampup-batch-size", "4 2", "argument --rampup-batch-size: expected 3 arguments"),
        ("--eval-iters", "-1", "--eval-iters must be >= 0, got -1"),
):
    extra = [flag] + ([] if value is None else value.split(" ") if " " in value else [value])
    shown = flag if value is None else f"{flag} {value or repr(value)}"
    CASES.append(Case(f"pretrain{flag}={value}", G, f"`{shown}`", lambda f, extra=extra: pretrain_args(f, *extra),
                      message, env={"CUDA_VISIBLE_DEVICES": ""}))  # a CPU job on any machine (--bf16 needs one)

CASES += [
    Case("pretrain-lr-warmup", G, "`--lr-warmup-iters 20 --train-iters 10`",
         lambda f: pretrain_args(f, "--lr-warmup-iters", "20", iters=10),
         "lr-warmup-iters (20) must be between 0 and lr-decay-iters (10, default train-iters)"),
    Case("pretrain-heads", G, "`--hidden-size 30 --num-attention-heads 4`",
         lambda f: pretrain_args(f, "--hidden-size", "30"), "hidden-size (30) is not divisible by num-attention-heads (4)"),
    Case("pretrain-vocab-0", G, "`--mock-data --vocab-size 0`",
         lambda f: [*SMALL_GPT, "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--vocab-size", "0"],
         "--vocab-size must be a positive integer, got 0"),
    Case("pretrain-no-data", G, "no `--data-path` (and no `--mock-data`)",
         lambda f: [*SMALL_GPT, "--train-iters", "1", "--lr", "1e-3"], "--data-path is required (or --mock-data --vocab-size N)"),
    Case("pretrain-missing-data", G, "`--data-path` that does not exist",
         lambda f: pretrain_args(f, "--data-path", "/nothing"), "--data-path /nothing: no /nothing.bin"),
    Case("pretrain-save-is-file", G, "`--save` that is a file", lambda f: pretrain_args(f, "--save", f.jsonl),
         "--save …/docs.jsonl: is a file, not a folder"),
    Case("pretrain-save-under-file", G, "`--save` under a file", lambda f: pretrain_args(f, "--save", f.jsonl + "/c"),
         "so no folder can be made under it"),
    Case("pretrain-save-read-only", G, "`--save` in a read-only folder",
         lambda f: pretrain_args(f, "--save", in_case("pt-ro", "ckpt")(f)),
         "pt-ro is not writable (read-only file system or no permission)", setup=read_only("pt-ro")),
    Case("pretrain-log-json-dir", G, "`--log-json` naming a folder", lambda f: pretrain_args(f, "--log-json", f.root),
         "is a folder; it names the file the log lines go to"),
    Case("pretrain-vocab-no-eod", G, "a `vocab.json` without `<|endoftext|>`",
         lambda f: pretrain_args(f, "--vocab-file", in_case("pt-eod", "vocab.json")(f)), "has no <|endoftext|> token",
         setup=lambda f: vocab_with(f, "pt-eod", lambda v: v.pop("<|endoftext|>"))),
    Case("pretrain-idx-magic", G, "an `.idx` with the wrong magic",
         lambda f: pretrain_args(f, "--data-path", in_case("pt-magic", "d")(f)), "is not Megatron's mmap index magic",
         setup=lambda f: corrupt_pair(f, "pt-magic", "magic")),
    Case("pretrain-bin-short", G, "a `.bin` cut to half its size",
         lambda f: pretrain_args(f, "--data-path", in_case("pt-short", "d")(f)), "but …/cases/pt-short/d.bin has",
         setup=lambda f: corrupt_pair(f, "pt-short", "short-bin")),
    Case("pretrain-idx-short", G, "an `.idx` cut to 20 bytes",
         lambda f: pretrain_args(f, "--data-path", in_case("pt-short-idx", "d")(f)),
         "d.idx: 20 bytes, shorter than the 34-byte header",
         setup=lambda f: corrupt_pair(f, "pt-short-idx", "short-idx")),
    Case("pretrain-other-tokenizer", G, "data whose token ids reach the vocabulary size (another tokenizer's data)",
         lambda f: pretrain_args(f, "--vocab-file", in_case("pt-small-vocab", "vocab.json")(f)),
         "is outside the vocabulary of size",
         setup=lambda f: vocab_with(f, "pt-small-vocab", lambda v: [v.pop(k) for k in [k for k, i in v.items()
                                                                                     if 200 <= i < 299]])),
    Case("pretrain-load-abc", G, "`--load` whose tracker holds `abc`",
         lambda f: pretrain_args(f, "--load", damaged("abc")(f)), "should hold an iteration number or 'release', found 'abc'",
         setup=make_damaged("abc")),
    Case("pretrain-load-missing-iter", G, "`--load` whose tracker names a missing iteration",
         lambda f: pretrain_args(f, "--load", damaged("missing-iter")(f)),
         "latest_checkpointed_iteration.txt names iter_0000007, but there is no such folder",
         setup=make_damaged("missing-iter")),
    Case("pretrain-load-half", G, "`--load` whose iteration folder is half-written (empty)",
         lambda f: pretrain_args(f, "--load", damaged("half-written")(f)), "holds no mp_rank_XX[_YYY] folders",
         setup=make_damaged("half-written")),
    Case("pretrain-load-truncated", G, "`--load` with a truncated `model_optim_rng.pt`",
         lambda f: pretrain_args(f, "--load", damaged("truncated")(f)), "cannot read checkpoint file",
         setup=make_damaged("truncated")),
    Case("pretrain-load-other-model", G, "`--load` of another model (hidden size 32, this run 64)",
         lambda f: pretrain_args(f, "--load", f.ckpt, "--hidden-size", "64"), "holds another model than this run builds",
         ),
    Case("pretrain-load-torch-dist", G, "`--load` of a Megatron-LM torch_dist checkpoint",
         lambda f: pretrain_args(f, "--load", damaged("torch-dist")(f)), "is a Megatron-LM torch_dist checkpoint",
         setup=make_damaged("torch-dist")),
    Case("pretrain-vocab-binary", G, "a binary file as `--vocab-file`",
         lambda f: pretrain_args(f, "--vocab-file", f.data + ".bin"), "not GPT-2's vocab.json ('utf-8' codec"),
    Case("pretrain-bad-flag-2-ranks", L, "an unknown flag (2 ranks)",
         lambda f: ["--nproc", "2", G, *pretrain_args(f, "--no-such-flag")],
         "pretrain_gpt.py: error: unrecognized arguments: --no-such-flag", ranks=2),
    Case("torchrun-bad-value", TORCHRUN, "`--clip-grad -1` under plain torchrun (2 ranks, before any process group)",
         lambda f: ["--standalone", "--nproc_per_node", "2", G,
                    *pretrain_args(f, "--clip-grad", "-1", "--global-batch-size", "4")],
         "error: --clip-grad must be >= 0 (0: no clipping), got -1.0", ranks=2, torchrun=True, status=1),
    Case("torchrun-bad-flag", TORCHRUN, "an unknown flag under plain torchrun (2 ranks)",
         lambda f: ["--standalone", "--nproc_per_node", "2", G, *pretrain_args(f, "--no-such-flag")],
         "pretrain_gpt.py: error: unrecognized arguments: --no-such-flag", ranks=2, torchrun=True, status=1),
    Case("torchrun-corrupt-idx", TORCHRUN, "an `.idx` with the wrong magic under plain torchrun (2 ranks, TP=2)",
         lambda f: ["--standalone", "--nproc_per_node", "2", G,
                    *pretrain_args(f, "--tensor-model-parallel-size", "2", "--data-path", in_case("pt-magic3", "d")(f))],
         "is not Megatron's mmap index magic", ranks=2, torchrun=True, status=1,
         setup=lambda f: corrupt_pair(f, "pt-magic3", "magic")),
    # ---- checkpoint_util.py ----
    Case("util-no-load", C, "`--load-dir` that does not exist",
         lambda f: ["--load-dir", "/nowhere", "--save-dir", in_case("u", "o")(f)], "/nowhere: no such checkpoint folder"),
    Case("util-not-ckpt", C, "`--load-dir` that is not a checkpoint", lambda f: ["--load-dir", f.hf, "--save-dir",
                                                                              in_case("u", "o")(f)],
         "is not a Megatron checkpoint folder: no latest_checkpointed_iteration.txt"),
    Case("util-same", C, "`--save-dir` equal to `--load-dir`, with `--overwrite`",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", f.ckpt, "--overwrite"], "is --load-dir",
         then=tracker_still(2, lambda f: f.ckpt)),
    Case("util-inside", C, "`--save-dir` inside `--load-dir`, with `--overwrite`",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", os.path.join(f.ckpt, "iter_0000002"), "--overwrite"],
         "is inside --load-dir", then=tracker_still(2, lambda f: f.ckpt)),
    Case("util-parent", C, "`--save-dir` the parent of `--load-dir`, with `--overwrite`",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", f.root, "--overwrite"], "holds --load-dir",
         then=tracker_still(2, lambda f: f.ckpt)),
    Case("util-not-empty", C, "`--save-dir` that holds files, without `--overwrite`",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", in_case("u-full", "o")(f)], "exists and is not empty",
         setup=lambda f: write(in_case("u-full", "o", "keep.txt")(f), "keep me")),
    Case("util-tp-3", C, "`--target-tensor-parallel-size 3` (4 heads)",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", in_case("u-tp3", "o")(f), "--target-tensor-parallel-size", "3"],
         "target tensor-parallel size 3 does not divide num_attention_heads (4)", then=nothing_under(in_case("u-tp3", "o"))),
    Case("util-pp-0", C, "`--target-pipeline-parallel-size 0`",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", in_case("u", "o")(f), "--target-pipeline-parallel-size", "0"],
         "--target-pipeline-parallel-size must be >= 1, got 0"),
    Case("util-pp-3", C, "`--target-pipeline-parallel-size 3` (2 layers)",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", in_case("u-pp3", "o")(f), "--target-pipeline-parallel-size", "3"],
         "do not divide num_layers (2)"),
    Case("util-true-vocab-0", C, "`--true-vocab-size 0`",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", in_case("u", "o")(f), "--true-vocab-size", "0"],
         "--true-vocab-size must be >= 1, got 0"),
    Case("util-true-vocab-big", C, "`--true-vocab-size` larger than the embedding",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", in_case("u-big", "o")(f), "--true-vocab-size", "5000"],
         "--true-vocab-size is 5000, but the word embedding has only 384 rows"),
    Case("util-vocab-binary", C, "a binary file as `--vocab-file`",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", in_case("u-vb", "o")(f), "--vocab-file", f.data + ".bin"],
         "cannot read vocabulary file"),
    Case("util-vocab-missing", C, "`--vocab-file` that does not exist",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", in_case("u", "o")(f), "--vocab-file", "/none.json"],
         "--vocab-file /none.json: no such file"),
    Case("util-hf-hf", C, "`--loader hf --saver hf`",
         lambda f: ["--loader", "hf", "--saver", "hf", "--load-dir", f.hf, "--save-dir", in_case("u", "o")(f)],
         "--loader hf --saver hf is a copy: nothing to convert"),
    Case("util-hf-offline", C, "`--loader hf --load-dir gpt2` without network",
         lambda f: ["--loader", "hf", "--load-dir", "gpt2", "--save-dir", in_case("u-gpt2", "o")(f)],
         "--load-dir 'gpt2' is not a local folder and could not be downloaded"),
    Case("util-hf-not-gpt2", C, "`--loader hf` on a folder that is not a GPT-2",
         lambda f: ["--loader", "hf", "--load-dir", in_case("u-nongpt2", "hf")(f), "--save-dir", in_case("u-ng", "o")(f)],
         "only GPT-2 folders can be imported",
         setup=lambda f: write(in_case("u-nongpt2", "hf", "config.json")(f), json.dumps(
             {"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 16})) and write(
             in_case("u-nongpt2", "hf", "model.safetensors")(f), b"")),
    Case("util-abc", C, "a tracker holding `abc`",
         lambda f: ["--load-dir", damaged("abc")(f), "--save-dir", in_case("u-abc", "o")(f)], "found 'abc'",
         setup=make_damaged("abc")),
    Case("util-half", C, "a half-written iteration (empty folder)",
         lambda f: ["--load-dir", damaged("half-written")(f), "--save-dir", in_case("u-half", "o")(f)],
         "it is empty or half-written", setup=make_damaged("half-written")),
    Case("util-truncated", C, "a truncated `model_optim_rng.pt`",
         lambda f: ["--load-dir", damaged("truncated")(f), "--save-dir", in_case("u-trunc", "o")(f)],
         "cannot read checkpoint file", setup=make_damaged("truncated"), then=nothing_under(in_case("u-trunc", "o"))),
    Case("util-torch-dist", C, "a Megatron-LM torch_dist checkpoint",
         lambda f: ["--load-dir", damaged("torch-dist")(f), "--save-dir", in_case("u-td", "o")(f)],
         "--ckpt-format torch", setup=make_damaged("torch-dist")),
    Case("util-full-disk", C, "a full disk while the shards are written",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", in_case("u-disk", "o")(f), "--no-progress"],
         "could not write the conversion to --save-dir", fsize=FULL_DISK, then=nothing_under(in_case("u-disk", "o"))),
    Case("util-full-disk-hf", C, "a full disk while a transformers folder is written",
         lambda f: ["--saver", "hf", "--load-dir", f.ckpt, "--save-dir", in_case("u-disk-hf", "o")(f)],
         "could not write the conversion to --save-dir", fsize=FULL_DISK,
         then=nothing_under(in_case("u-disk-hf", "o"))),
    Case("util-save-read-only", C, "`--save-dir` in a read-only folder",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", in_case("u-ro", "o")(f), "--no-progress"],
         "could not write the conversion to --save-dir …/cases/u-ro/o", setup=read_only("u-ro")),
    Case("util-save-under-file", C, "`--save-dir` under a file",
         lambda f: ["--load-dir", f.ckpt, "--save-dir", os.path.join(f.jsonl, "o")],
         "docs.jsonl is a file, where a folder is needed; nothing was written"),
    # ---- generate.py ----
    Case("gen-no-load", GEN, "`--load` that does not exist", lambda f: gen_args("/nowhere"), "--load '/nowhere': no such folder"),
    Case("gen-abc", GEN, "`--load` whose tracker holds `abc`", lambda f: gen_args(damaged("abc")(f)), "found 'abc'",
         setup=make_damaged("abc")),
    Case("gen-truncated", GEN, "`--load` with a truncated shard", lambda f: gen_args(damaged("truncated")(f)),
         "cannot read checkpoint file", setup=make_damaged("truncated")),
    Case("gen-other-tokenizer", GEN, "`--vocab-file` of another size than the model's vocabulary",
         lambda f: gen_args(f.ckpt, "--vocab-file", in_case("gen-vocab", "vocab.json")(f), "--merge-file", f.merges),
         "not the tokenizer this model was trained with",
         setup=lambda f: vocab_with(f, "gen-vocab", lambda v: v.__setitem__("zzzz", len(v)))),
    Case("gen-tokens-negative", GEN, "`--tokens-to-generate -1`", lambda f: gen_args(f.ckpt, "--tokens-to-generate", "-1"),
         "tokens_to_generate must be an integer >= 0, got -1"),
    Case("gen-top-k-p", GEN, "`--top-k 2 --top-p 0.5` together", lambda f: gen_args(f.ckpt, "--top-k", "2", "--top-p", "0.5"),
         "cannot set both top-k and top-p samplings (top_k=2, top_p=0.5)"),
    Case("gen-temperature-0", GEN, "`--temperature 0`", lambda f: gen_args(f.ckpt, "--temperature", "0"),
         "temperature must be a positive number <= 100.0, got 0.0"),
    Case("gen-abc-2-ranks", GEN, "`--load` whose tracker holds `abc` (2 ranks, TP=2)",
         lambda f: gen_args(damaged("abc")(f), "--tensor-model-parallel-size", "2"), "found 'abc'", ranks=2,
         setup=make_damaged("abc")),
    Case("gen-out-under-file", GEN, "`--output-json` under a file",
         lambda f: gen_args(f.ckpt, "--output-json", os.path.join(f.jsonl, "o.json")), "its folder is a file"),
    # ---- evaluate_gpt.py ----
    Case("eval-task", EV, "`--task SQUAD`", lambda f: ["--task", "SQUAD", "--valid-data", "x", "--load", f.ckpt],
         "argument --task: invalid choice: 'SQUAD'"),
    Case("eval-no-data", EV, "`--valid-data` that does not exist",
         lambda f: eval_args(f)[:2] + ["--valid-data", "/none.txt"] + eval_args(f)[4:],
         "--valid-data '/none.txt': no such file"),
    Case("eval-seq-too-long", EV, "`--seq-length 64` for a 16-position model", lambda f: eval_args(f, "--seq-length", "64"),
         "--seq-length (64) must be between 1 and the model's"),
    Case("eval-no-load", EV, "`--load` that does not exist", lambda f: eval_args(f, load="/nowhere"),
         "--load '/nowhere': no such folder"),
    Case("eval-other-model-file", EV, "`--load` half-written", lambda f: eval_args(f, load=damaged("half-written")(f)),
         "holds no mp_rank_XX[_YYY] folders: it is empty or half-written", setup=make_damaged("half-written")),
    Case("eval-results-under-file", EV, "`--results-json` under a file",
         lambda f: eval_args(f, "--results-json", os.path.join(f.jsonl, "r.json")), "its folder is a file"),
    # ---- text_generation_server.py ----
    Case("server-port", S, "`--port 70000`", lambda f: ["--load", f.ckpt, "--port", "70000"],
         "--port must be between 1 and 65535, got 70000"),
    Case("server-batch-0", S, "`--max-batch-size 0`", lambda f: ["--load", f.ckpt, "--max-batch-size", "0"],
         "--max-batch-size must be >= 1, got 0"),
    Case("server-heartbeat", S, "`--heartbeat 90 --control-timeout 60`",
         lambda f: ["--load", f.ckpt, "--heartbeat", "90"], "must be shorter than --control-timeout"),
    Case("server-no-load", S, "`--load` that does not exist", lambda f: ["--load", "/nowhere", "--port", "1"],
         "--load '/nowhere': no such folder"),
    Case("server-truncated", S, "`--load` with a truncated shard",
         lambda f: ["--load", damaged("truncated")(f), "--port", "1"], "cannot read checkpoint file",
         setup=make_damaged("truncated")),
    # ---- the launchers ----
    Case("launch-nproc-0", L, "`--nproc 0`", lambda f: ["--nproc", "0", G],
         "nproc_per_node must be >= 1, got 0"),
    Case("launch-no-script", L, "a script that does not exist",
         lambda f: ["--nproc", "2", "no_such_script.py"], "no such script: no_such_script.py"),
    Case("gpipe-chunks", "src/ch5/gpipe.py", "`--chunks 9 --batch-size 4`", lambda f: ["--chunks", "9", "--batch-size", "4"],
         "--chunks (9) must not exceed --batch-size (4)"),
    Case("gpipe-model-offline", "src/ch5/gpipe.py", "`--model-name gpt2` without network",
         lambda f: ["--model-name", "gpt2"], "--model-name gpt2: could not load it"),
    Case("gpipe-squad-offline", "src/ch5/gpipe.py", "`--dataset squad` without network",
         lambda f: ["--dataset", "squad"], "--dataset squad: could not load it"),
    Case("deepspeed-0", "src/ch5/deepspeed_launch.py", "`--num_gpus 0`", lambda f: ["--num_gpus", "0", "src/ch5/pipe_dream.py"],
         "num_gpus must be >= 1, got 0"),
    Case("parallelformers-model", "src/ch6/parallelformers_inference.py", "`--model /nonexistent`",
         lambda f: ["--model", "/nonexistent", "--nproc", "1"], "--model /nonexistent: could not load it"),
]


# --- the test ------------------------------------------------------------------------------------
def shorten(text: str, f: Files) -> str:
    return re.sub(r"\.tmp-\d+", ".tmp-PID", text.replace(f.root, "…").replace(ROOT + os.sep, ""))


def error_line(stderr: str) -> str | None:
    """The report of the error: ours (``error: ...``) or argparse's (``prog: error: ...``), with the
    indented lines that continue it (several problems at once), joined into one line."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error: ") or re.match(r"^[\w.-]+: error: ", line):
            more = []
            for follow in lines[i + 1:]:
                if not follow.startswith("  "):
                    break
                more.append(follow.strip())
            return " ".join([line, *more])
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, runner: Runner, files: Files):
    try:
        _run_case(case, runner, files)
    finally:
        while files.cleanups:
            files.cleanups.pop()()


def _run_case(case: Case, runner: Runner, files: Files):
    if case.setup:
        case.setup(files)
    argv = case.argv(files)
    result = runner.run(case.tool, argv, env=case.env, fsize=case.fsize, timeout=case.timeout)
    stderr = result["stderr"]
    assert not result["timed_out"], f"ran past {case.timeout} s:\n{stderr[-3000:]}"
    if case.torchrun:  # torchrun itself ends in a traceback of its own (ChildFailedError); the ranks show none
        summary = stderr[stderr.index("Root Cause"):]
        assert stderr.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in stderr, stderr
        assert not [x for x in stderr.splitlines() if x.startswith("[rank")], stderr
        stderr = stderr[:stderr.index("Traceback (most recent call last)")]
    else:
        assert "Traceback" not in stderr, stderr[-3000:]
    line = error_line(stderr)
    assert line is not None, f"no error line in:\n{stderr[-3000:]}"
    assert case.expect in shorten(line, files) or case.expect in line, line
    assert result["status"] == case.status, (result["status"], stderr[-2000:])
    reports = [x for x in stderr.splitlines() if USER_ERROR_LINE.match(x)]
    assert len(reports) == 1, f"reported {len(reports)} times:\n{stderr}"  # several ranks: still once
    if case.torchrun:
        assert f"traceback : {reports[0]}" in summary, summary  # torchrun's root cause names it
    if case.then:
        case.then(files)
    command = " ".join(["python", case.tool, *(shorten(a, files) for a in argv)])
    files.rows[case.id] = (case.tool, case.what, command, result["status"], shorten(line, files), result["seconds"])


@pytest.fixture(scope="module", autouse=True)
def table(files):
    """After the module: docs/bad_inputs.md from every case's recorded result (only when all of them ran)."""
    yield
    if len(files.rows) != len(CASES):
        return
    lines = [
        "# Bad inputs: what each tool does with them",
        "",
        "Generated by `tests/foundation/test_bad_inputs.py`: every row below is a test that runs the tool",
        "for real with that input (a full disk is `RLIMIT_FSIZE` lowered for the run: writes fail with",
        "`EFBIG`), and the last two columns are what that run gave, recorded when the suite ran. Paths",
        "are shortened to `…`. Every row exits with 2 (rows under plain torchrun: torchrun's own 1) and",
        "prints one `error:` line (argparse's `prog: error:` for a bad command line) and no traceback;",
        "rows with several ranks print it once, and under plain torchrun its failure summary names it.",
        "Where a row writes, the test also checks that nothing was lost: an earlier `.bin/.idx` pair or",
        "checkpoint is unchanged, no temporary file is left, and `latest_checkpointed_iteration.txt` still",
        "names the last complete iteration.",
        "",
        f"{len(CASES)} inputs.",
        "",
        "| # | Tool | Bad input | Exit | Error line |",
        "|---|------|-----------|------|------------|",
    ]
    for i, case in enumerate(CASES, 1):
        tool, what, _, status, line, _ = files.rows[case.id]
        cell, what = line.replace("|", "\\|"), what.replace("|", "\\|")
        name = "torchrun" if case.torchrun else os.path.basename(tool)
        lines.append(f"| {i} | `{name}` | {what} | {status} | `{cell}` |")
    lines += [
        "",
        "Write faults that are not in the table because they need a run to be interrupted:",
        "`tests/training/test_training_pretrain_gpt.py` kills (SIGKILL) a rank of a 4-rank job between",
        "the shard writes and the tracker move, fills the disk during a save, and then checks that the",
        "next run resumes from the last complete iteration with exactly the losses of an uninterrupted run.",
        "",
    ]
    with open(DOC, "w") as out:
        out.write("\n".join(lines))
