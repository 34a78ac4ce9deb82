"""A task from its file to its metrics: what ``src/ch6/evaluate_gpt.py``, the tests and the notebook share.

    prepared = prepare_task("LAMBADA", "lambada_test.jsonl", tokenizer, seq_length=1024, strict=True)
    metrics  = run_task(pre, prepared, micro_batch_size=8)     # inside every rank, groups initialised

:func:`prepare_task` runs on every rank (tokenizing is cheap next to the
forward passes, and every rank must agree on the samples);
:func:`run_task` builds this rank's stage of the model and evaluates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lessons_pkg.evaluation.datasets import lambada_samples, read_lambada_jsonl, wikitext_samples
from lessons_pkg.evaluation.loop import Totals, evaluate_samples
from lessons_pkg.evaluation.metrics import lambada_metrics, wikitext_metrics
from lessons_pkg.evaluation.windows import Sample

TASKS = ("LAMBADA", "WIKITEXT103")


@dataclass
class PreparedTask:
    task: str
    samples: list[Sample]
    info: dict = field(default_factory=dict)     # what the metrics need and the report shows
    lambada: object | None = None                # datasets.LambadaSamples, for display


def prepare_task(task: str, path: str, tokenizer, seq_length: int, strict: bool = False,
                 overlap: int | None = None) -> PreparedTask:
    if task == "LAMBADA":
        cut = lambada_samples(read_lambada_jsonl(path), tokenizer, seq_length, strict)
        info = {"strict": strict, "truncated": cut.truncated, "valid_data": path}
        return PreparedTask(task, cut.samples, info, cut)
    if task == "WIKITEXT103":
        text = wikitext_samples(path, tokenizer, seq_length, overlap)
        info = {"num_tokenized_tokens": text.num_tokenized_tokens, "num_original_tokens": text.num_original_tokens,
                "detokenizer": text.detokenizer, "overlapping_eval": overlap or seq_length, "valid_data": path}
        return PreparedTask(task, text.samples, info)
    raise ValueError(f"--task {task!r} is not one of {', '.join(TASKS)}")


def metrics_of(prepared: PreparedTask, totals: Totals) -> dict:
    if prepared.task == "LAMBADA":
        return {**lambada_metrics(totals), **prepared.info}
    return {**wikitext_metrics(totals, prepared.info["num_tokenized_tokens"], prepared.info["num_original_tokens"]),
            **prepared.info}


def run_task(pre, prepared: PreparedTask, micro_batch_size: int, progress=None, dtype=None) -> tuple[dict, Totals]:
    """Evaluate on the job's TP x PP x DP grid (``parallel_state`` initialised); every rank gets the metrics.

    ``dtype``: the parameters' (``--fp16``/``--bf16``); the scores are computed in float32/float64 either way."""
    from lessons_pkg import parallel_state as ps
    from lessons_pkg.checkpoint.pretrained import build_stage

    model = build_stage(pre, ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_rank(),
                        ps.get_pipeline_model_parallel_world_size(), dtype=dtype)
    model.to(ps.get_device())
    pad_id = pre.tokenizer.eod if pre.tokenizer is not None else pre.config.vocab_size - 1
    totals = evaluate_samples(model, prepared.samples, micro_batch_size, pad_id, pre.config.vocab_size, progress)
    return dict(metrics_of(prepared, totals), params_dtype=str(next(model.parameters()).dtype)), totals
