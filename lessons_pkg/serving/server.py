"""The serving rank's main loop: HTTP in a thread, batches of work on the main thread.

Rank 0 (TP rank 0 of the first pipeline stage) runs two things:

* a threaded HTTP server (werkzeug, Flask's own) whose request threads only
  validate, queue and wait (:mod:`lessons_pkg.serving.app`);
* :meth:`ServingLoop.run` on the main thread, the only thread that talks to
  the other ranks: take a batch from the queue, broadcast it, run the engine
  with everyone, answer the jobs; when idle, a ``ping`` every ``heartbeat_s``.

SIGINT/SIGTERM set a flag the loop checks every quarter second: it answers
the requests still queued with 503, sends ``stop`` to the other ranks, shuts
the HTTP server down and closes its socket, so the port is free again. Any
failure of the control collectives (a rank died, a timeout) ends the loop with
a message and a non-zero exit; it never waits forever.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time

from werkzeug.serving import make_server

from lessons_pkg.serving.app import ServingState, create_app
from lessons_pkg.serving.batcher import RequestQueue, run_batch
from lessons_pkg.serving.control import ControlChannel, WorkItem


class ServingLoop:
    def __init__(self, engine, tokenizer, channel: ControlChannel, params_cls, max_positions: int,
                 model_name: str, host: str = "127.0.0.1", port: int = 5000, max_batch_size: int = 32,
                 heartbeat_s: float = 5.0, info: dict | None = None, request_timeout_s: float = 600.0,
                 api_defaults: dict | None = None, max_new_tokens: int | None = None):
        self.engine, self.tokenizer, self.channel, self.params_cls = engine, tokenizer, channel, params_cls
        self.queue = RequestQueue(max_batch_size)
        self.state = ServingState(self.queue, tokenizer, max_positions, model_name,
                                  dict(info or {}, started=time.time(), max_batch_size=max_batch_size),
                                  request_timeout_s, params_cls, dict(api_defaults or {}), max_new_tokens)
        self.app = create_app(self.state)
        self.host, self.port, self.heartbeat_s = host, port, heartbeat_s
        self.stopping = threading.Event()
        self.batches = 0

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            print(f"received {signal.Signals(signum).name}: stopping the server", flush=True)
            self.stopping.set()
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def run(self) -> int:
        """Serve until a signal; returns the exit status (0 clean stop, 1 lost ranks)."""
        logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no access line per request
        http = make_server(self.host, self.port, self.app, threaded=True)
        http.daemon_threads = True
        thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        thread.start()
        print(f" * Serving Flask app '{self.state.model_name}'\n * Running on http://{self.host}:{http.port}",
              flush=True)
        status, idle_since = 0, time.monotonic()
        try:
            while not self.stopping.is_set():
                batch = self.queue.next_batch(timeout=0.25)
                if batch:
                    start = time.perf_counter()
                    run_batch(batch, self.engine, self.channel, self.params_cls, self.tokenizer)
                    stats = self.state.info
                    stats["batches"] = self.batches = self.batches + 1
                    stats["prompts_generated"] = stats.get("prompts_generated", 0) + sum(
                        len(job.request.prompts) for job in batch)
                    stats["busy_s"] = round(stats.get("busy_s", 0.0) + time.perf_counter() - start, 3)
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self.heartbeat_s:
                    self.channel.send(WorkItem("ping"))
                    self.channel.agree(None)
                    idle_since = time.monotonic()
        except Exception as e:  # the control collectives failed: another rank is gone or stuck
            print(f"error: the other ranks stopped answering ({type(e).__name__}: {e}); shutting the server down",
                  file=sys.stderr, flush=True)
            status = 1
        finally:
            for job in self.queue.close():
                job.finish(error=(503, "the server is shutting down"))
            if status == 0:
                try:
                    self.channel.send(WorkItem("stop"))
                except Exception as e:  # the other ranks may have got the signal too, and gone already
                    print(f"the other ranks are gone already ({type(e).__name__})", flush=True)
            http.shutdown()
            http.server_close()
            thread.join(timeout=5)
        print("server stopped", flush=True)
        return status
