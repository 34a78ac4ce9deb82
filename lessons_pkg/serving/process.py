"""Start the text-generation server as a job of its own on a free loopback port, wait until it answers, stop it.

Used by the tests (tests/serving/) and the load test (scripts/bench_server.py)::

    server = ServerProcess("path/to/checkpoint", tp=2, pp=2)   # torchrun job, new session, free port
    requests.put(server.url + "/api", json={"prompts": ["Hello"], "tokens_to_generate": 4})
    server.stop()                                              # SIGTERM; SIGKILL to the group if it lingers
    server.close()                                             # remove the log file
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import requests

from lessons_pkg.launch import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SERVER = os.path.join(ROOT, "src", "ch6", "text_generation_server.py")


class ServerProcess:
    """A text_generation_server.py job in its own session, on a free port.

    Several ranks start under ``torchrun``, or with ``launcher="python"`` as plain
    ``python text_generation_server.py`` (the script starts its own ranks).
    """

    def __init__(self, load: str, tp: int = 1, pp: int = 1, extra: tuple = (), timeout: float = 90,
                 launcher: str = "torchrun"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        n = tp * pp
        args = ["--load", load, "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                "--port", str(self.port), *extra]
        if launcher not in ("torchrun", "python"):
            raise ValueError(f"launcher must be 'torchrun' or 'python' (the script starts its own ranks), got {launcher!r}")
        if n == 1 or launcher == "python":
            cmd = [sys.executable, SERVER, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   SERVER, *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"server-{self.port}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                output = self.output()
                self.stop()    # the ranks a plain-python server started may outlive it: end its whole group
                self.close()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{output}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                output = self.output()
                self.close()
                raise RuntimeError(f"server not up within {timeout} s:\n{output}")
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

    def close(self) -> None:
        """Remove the log file (after :meth:`stop`)."""
        self.log.close()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)
