"""Exercise ch6d.1: how many parameters one tensor-parallel rank holds.

GPT with L layers, hidden h, vocabulary V, sequence length s (learned position
embeddings), TP ranks. The vocabulary is padded to a multiple of 128 x TP
(Megatron's rule). Which tensors are split over the ranks (the word embedding
rows, QKV and fc1 output features, proj and fc2 input features, the biases
of split outputs) and which are replicated (position embeddings, LayerNorms,
the biases added after an all-reduce)? The LM head is the word embedding (tied).

The lesson's 345M model (24 layers, hidden 1024, 16 heads, 50257 tokens,
seq 1024) at TP=4: Megatron prints 89,714,688 per rank.

Check: python -m lessons_pkg.labs check ch6d.1   (against the model itself, built shape-only)
"""


def params_per_rank(num_layers: int, hidden: int, vocab: int, seq: int, tp: int) -> int:
    raise NotImplementedError("params_per_rank(num_layers, hidden, vocab, seq, tp)")
