"""Solution ch6f.1. Per layer, A = activation bytes, M = mask bytes:
not split by TP: LayerNorm inputs 2A, QKV input A, MLP input A, two hidden-dropout masks 2M (sbh each);
split by TP: Q, K 2A, V A, projection input A, GeLU input 4A, second matmul input 4A (sbh each), and the
attention terms a s^2 b (2A + M): softmax output, dropout mask, dropout output. Sequence parallelism
splits the first group too."""


def activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                     activation_bytes: int = 2, mask_bytes: int = 1) -> float:
    A, M = activation_bytes, mask_bytes
    unsplit = s * b * h * (4 * A + 2 * M)
    split = s * b * h * (12 * A) + a * s * s * b * (2 * A + M)
    return (unsplit / t if sequence_parallel else unsplit) + split / t
