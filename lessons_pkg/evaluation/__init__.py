"""Zero-shot evaluation the way Megatron-LM's ``tasks/main.py`` does it: LAMBADA and WikiText-103.

Modules (each one idea, read in this order):
    detokenizer  Megatron's WikiText/PTB detokenizers (undo the corpus's " @-@ " spacing)
    datasets     the LAMBADA jsonl and WikiText readers (errors name the line), Megatron's
                 strict / non-strict LAMBADA targets, the official test sets through ``datasets``
    standin      offline: a LAMBADA-format cloze set and a held-out text from documents the
                 training split never saw
    windows      ``--overlapping-eval``: cutting a long text into windows that score each token once
    scoring      the last stage's vocab-parallel log-probabilities and argmax (logits never gathered)
    loop         the distributed evaluation: TP x PP forward, examples split over DP, sums all-reduced
    metrics      accuracy, per-word perplexity, WikiText perplexity and adjusted perplexity, result lines
    reference    the plain single-process computation with transformers' GPT2LMHeadModel
    tasks        a task from its file to its metrics (what the script, tests and notebook share)

Everything scores a list of :class:`~lessons_pkg.evaluation.windows.Sample`: token ids and a
mask over the labels (``tokens[1:]``) saying which predictions count.
"""
from lessons_pkg.evaluation.windows import Sample

__all__ = ["Sample"]
