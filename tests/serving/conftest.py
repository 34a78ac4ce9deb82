"""Fixtures for the serving tests: a tiny tokenizer, a tiny GPT-2 folder, servers as processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from lessons_pkg.launch import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SERVER = os.path.join(ROOT, "src", "ch6", "text_generation_server.py")
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. Hello again, world!",
    "Tensor parallelism splits matrices; pipeline parallelism splits layers.",
    "A server answers requests: prompts in, text out. The model was trained on words.",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer_files(tmp_path_factory):
    from lessons_pkg.data.tokenizer import train_byte_level_bpe

    return train_byte_level_bpe(CORPUS, 300, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_files):
    from lessons_pkg.data.tokenizer import build_tokenizer

    return build_tokenizer(*tiny_tokenizer_files)


@pytest.fixture(scope="session")
def tiny_gpt2_folder(tmp_path_factory, tiny_tokenizer_files, tiny_tokenizer):
    """A transformers GPT-2 folder: 4 layers, hidden 32, 4 heads, 64 positions, our 300-token BPE."""
    from lessons_pkg.checkpoint.hf_io import save_hf_folder
    from lessons_pkg.tensor_parallel.checkpointing import master_state_dict
    from lessons_pkg.tensor_parallel.config import GPTConfig

    config = GPTConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, num_layers=4, num_attention_heads=4,
                       max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    folder = str(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")
    save_hf_folder(folder, master_state_dict(config, seed=1234), config, *tiny_tokenizer_files)
    return folder


class ServerProcess:
    """A text_generation_server.py job (torchrun for several ranks) in its own session, on a free port."""

    def __init__(self, load: str, tp: int = 1, pp: int = 1, extra: tuple = (), timeout: float = 90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        n = tp * pp
        args = ["--load", load, "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                "--port", str(self.port), *extra]
        if n == 1:
            cmd = [sys.executable, SERVER, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   SERVER, *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"server-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not up within {timeout} s:\n{self.output()}")
            time.sleep(0.3)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def put_api(self, body, **kw):
        return requests.put(self.url + "/api", json=body, timeout=kw.pop("timeout", 60), **kw)

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> float:
        """Signal the job and wait; kills the whole group if it outlives ``timeout``. Returns seconds taken."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # whatever is left of the job (normally nothing)
        except ProcessLookupError:
            pass
        self.proc.wait()
        return time.monotonic() - start


@pytest.fixture(scope="session")
def server_factory():
    started = []

    def start(*args, **kwargs) -> ServerProcess:
        s = ServerProcess(*args, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def hf_greedy(tiny_gpt2_folder, tiny_tokenizer):
    """``transformers``' greedy ``generate`` on the same folder: prompt -> prompt + n token ids."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_folder).eval()
    cache = {}

    def generate(prompt: str, n: int) -> list[int]:
        if (prompt, n) not in cache:
            ids = torch.tensor([tiny_tokenizer.tokenize(prompt)])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                     pad_token_id=tiny_tokenizer.eod, eos_token_id=tiny_tokenizer.eod)
            cache[prompt, n] = out[0].tolist()
        return cache[prompt, n]

    return generate


@pytest.fixture(scope="session")
def one_rank_server(server_factory, tiny_gpt2_folder):
    """One server process (one rank) shared by the modules that need a plain server."""
    return server_factory(tiny_gpt2_folder)


def expected_api(hf_greedy, tokenizer, prompt: str, n: int) -> tuple[str, list[str]]:
    """Megatron's answer for a greedy request, from transformers: (text, segments)."""
    ids = hf_greedy(prompt, n)
    return tokenizer.detokenize(ids), [tokenizer.detokenize([t]) for t in ids]
