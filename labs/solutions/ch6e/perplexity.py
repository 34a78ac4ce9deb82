"""Solution ch6e.3. avg = nll / (T - 1); ratio = (T - 1) / (W - 1); adjusted = exp(min(20, avg * ratio))."""
import math


def adjusted_perplexity(nll_sum: float, num_tokenized_tokens: int, num_original_tokens: int) -> float:
    avg_loss = nll_sum / (num_tokenized_tokens - 1)
    ratio = (num_tokenized_tokens - 1) / (num_original_tokens - 1)
    return math.exp(min(20.0, avg_loss * ratio))
