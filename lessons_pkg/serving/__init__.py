"""A text-generation server like Megatron-LM's, on TP x PP ranks: ``PUT /api``, OpenAI completions, a web page.

One concept per file:

* :mod:`~lessons_pkg.serving.schema`      what a request may ask for (Megatron's defaults and rules, OpenAI's)
* :mod:`~lessons_pkg.serving.control`     rank 0 -> all ranks work items over a gloo group
* :mod:`~lessons_pkg.serving.follower`    what ranks 1..N-1 do: wait for an item, run it with the others
* :mod:`~lessons_pkg.serving.batcher`     the request queue and the run of one batch
* :mod:`~lessons_pkg.serving.completions` OpenAI's completion objects and streamed chunks
* :mod:`~lessons_pkg.serving.app`         the Flask routes (rank 0 only)
* :mod:`~lessons_pkg.serving.server`      rank 0's loop: HTTP thread + batches + heartbeat + clean stop
* :mod:`~lessons_pkg.serving.process`     start/stop the server as a job on a free port (tests, load test)

``src/ch6/text_generation_server.py`` puts them together with the inference engine.
"""
from lessons_pkg.serving.batcher import Job, RequestQueue, batch_key, run_batch
from lessons_pkg.serving.control import ControlChannel, WorkItem
from lessons_pkg.serving.follower import follow
from lessons_pkg.serving.schema import BadRequest, GenerateRequest, parse_api_request, parse_completion_request
from lessons_pkg.serving.server import ServingLoop

__all__ = ["BadRequest", "ControlChannel", "GenerateRequest", "Job", "RequestQueue", "ServingLoop", "WorkItem",
           "batch_key", "follow", "parse_api_request", "parse_completion_request", "run_batch"]
