"""From the all-reduced sums to the numbers Megatron and lm-evaluation-harness print.

LAMBADA (``N`` passages, ``C`` of them right, ``L_i`` = ``-log p`` of passage
``i``'s target tokens)::

    accuracy          C / N                          Megatron's "avg accuracy" (strict or not)
    perplexity        exp( (1/N) sum_i L_i )         lm-evaluation-harness's lambada "perplexity":
                                                     per target *word* with --strict-lambada,
                                                     per last token without

WikiText-103 (``T`` = BPE tokens of the detokenized text, ``W`` = words of the
raw file, ``S`` = sum of ``-log p`` over the ``T - 1`` scored tokens)::

    avg loss          S / (T - 1)                    nats per BPE token
    ppl               exp(avg loss)
    token ratio       (T - 1) / (W - 1)
    adjusted ppl      exp(avg loss x token ratio)    = exp(S / (W - 1)): per original word

The adjusted perplexity is what makes models with different tokenizers
comparable: the total surprise ``S`` of the text is spread over its words,
which every tokenizer agrees on, instead of over BPE tokens. Megatron caps
the exponent at 20 (``exp(min(20, x))``); so do we, and say so when it bites.
"""
from __future__ import annotations

import json
import math

from lessons_pkg.evaluation.loop import Totals

_MAX_EXPONENT = 20.0


def _capped_exp(x: float) -> float:
    return math.exp(min(_MAX_EXPONENT, x))


def lambada_metrics(t: Totals) -> dict:
    if t.examples == 0:
        raise ValueError("no LAMBADA examples were scored")
    return {"task": "LAMBADA", "number_correct": t.correct, "total_examples": t.examples,
            "accuracy": t.correct / t.examples, "target_tokens": t.tokens, "nll_sum": t.nll,
            "perplexity": math.exp(t.nll / t.examples)}


def wikitext_metrics(t: Totals, num_tokenized_tokens: int, num_original_tokens: int) -> dict:
    if t.tokens != num_tokenized_tokens - 1:
        raise RuntimeError(f"{t.tokens} tokens were scored but the text has {num_tokenized_tokens - 1} to predict: "
                           "the windows skipped or repeated some")
    if num_original_tokens < 2:
        raise ValueError(f"the text has {num_original_tokens} original word(s); the token ratio needs at least 2")
    avg_loss = t.nll / (num_tokenized_tokens - 1)
    ratio = (num_tokenized_tokens - 1) / (num_original_tokens - 1)
    return {"task": "WIKITEXT103", "avg_loss": avg_loss, "ppl": _capped_exp(avg_loss),
            "adjusted_ppl": _capped_exp(avg_loss * ratio), "token_ratio": ratio,
            "num_tokenized_tokens": num_tokenized_tokens, "num_original_tokens": num_original_tokens,
            "windows": t.examples, "capped": avg_loss * ratio > _MAX_EXPONENT}


def megatron_lines(metrics: dict) -> list[str]:
    """Megatron's result block (``tasks/zeroshot_gpt/evaluate.py``): a ruler, the line, a ruler."""
    line = f" validation results on {metrics['task']} | "
    if metrics["task"] == "LAMBADA":
        line += (f"number correct: {float(metrics['number_correct']):.4E} | "
                 f"total examples: {float(metrics['total_examples']):.4E} | "
                 f"avg accuracy: {metrics['accuracy']:.4E}")
    else:
        line += (f"avg loss: {metrics['avg_loss']:.4E} | ppl: {metrics['ppl']:.4E} | "
                 f"adjusted ppl: {metrics['adjusted_ppl']:.4E} | token ratio: {metrics['token_ratio']} |")
    ruler = "-" * (len(line) + 1)
    return [ruler, line, ruler]


def extra_lines(metrics: dict) -> list[str]:
    """What Megatron does not print: the per-word perplexity, the cap."""
    if metrics["task"] == "LAMBADA":
        unit = "target word (lm-evaluation-harness)" if metrics.get("strict") else "last token"
        return [f" perplexity per {unit}: {metrics['perplexity']:.4f} over {metrics['total_examples']} examples "
                f"({metrics['target_tokens']} target tokens)"]
    lines = [f" {metrics['windows']} windows, {metrics['num_tokenized_tokens']} BPE tokens, "
             f"{metrics['num_original_tokens']} original words"]
    if metrics["capped"]:
        lines.append(f" note: exp() capped at exp({_MAX_EXPONENT:g}) as Megatron does; the true value is larger")
    return lines


def write_json(path: str, metrics: dict) -> None:
    import os

    from lessons_pkg.errors import output_error

    try:  # whole or not at all: a full disk leaves no half-written results
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise output_error(path, e) from None


def compare(a: dict, b: dict, rtol: float = 1e-5) -> list[str]:
    """Where two result files of the same task disagree: counts exactly, real numbers within ``rtol``.

    ``rtol`` 1e-5: the same float32 forward split differently over ranks agrees to a few units
    in the last place per token; summed in float64, the totals agree far better than that.
    """
    problems = []
    for key in ("task", "number_correct", "total_examples", "target_tokens", "num_tokenized_tokens",
                "num_original_tokens", "windows", "strict", "overlapping_eval", "valid_data"):
        if a.get(key) != b.get(key):
            problems.append(f"{key}: {a.get(key)!r} != {b.get(key)!r}")
    for key in ("accuracy", "perplexity", "avg_loss", "ppl", "adjusted_ppl"):
        if key in a or key in b:
            x, y = a.get(key), b.get(key)
            if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)) or abs(x - y) > rtol * abs(y):
                problems.append(f"{key}: {x!r} != {y!r} (rtol {rtol:g})")
    return problems


def main(argv=None) -> int:
    """``python -m lessons_pkg.evaluation.metrics --compare A.json B.json``: exit 1 unless they agree."""
    import argparse

    parser = argparse.ArgumentParser(description="Check that two --results-json files of one task agree.")
    parser.add_argument("--compare", nargs=2, required=True, metavar=("A", "B"))
    args = parser.parse_args(argv)
    a, b = (json.load(open(p, encoding="utf-8")) for p in args.compare)
    problems = compare(a, b)
    layout = lambda r: f"TP={r.get('tensor_model_parallel_size')} x PP={r.get('pipeline_model_parallel_size')}"
    if problems:
        print(f"{a.get('task')}: {layout(a)} and {layout(b)} DISAGREE: " + "; ".join(problems))
        return 1
    print(f"{a.get('task')}: {layout(a)} and {layout(b)} agree (counts equal, real numbers within 1e-5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
