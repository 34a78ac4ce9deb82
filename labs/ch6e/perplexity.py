"""Exercise ch6e.3: WikiText-103's adjusted perplexity (what evaluate_gpt.py reports).

A model scores a text of T tokens (BPE) that has W words (whitespace-separated,
the original tokenization): nll_sum nats over the T - 1 predicted tokens.
Token perplexity exp(nll_sum / (T - 1)) depends on the tokenizer; the adjusted
perplexity spreads the same total surprise over the W - 1 words instead,
which every tokenizer agrees on. Megatron caps the exponent at 20.

Check: python -m lessons_pkg.labs check ch6e.3
"""
import math


def adjusted_perplexity(nll_sum: float, num_tokenized_tokens: int, num_original_tokens: int) -> float:
    raise NotImplementedError("adjusted_perplexity(nll_sum, num_tokenized_tokens, num_original_tokens)")
