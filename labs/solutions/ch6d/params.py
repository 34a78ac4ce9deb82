"""Solution ch6d.1. 345M at TP=4: 12,976,128 + 1,048,576 + 24 x 3,153,664 + 2,048 = 89,714,688."""


def params_per_rank(num_layers: int, hidden: int, vocab: int, seq: int, tp: int) -> int:
    h = hidden
    multiple = 128 * tp
    padded = -(-vocab // multiple) * multiple
    embeddings = padded // tp * h + seq * h            # word rows of this rank + all position embeddings
    layer = (2 * h * 2                                  # two LayerNorms (weight, bias), replicated
             + 3 * h * h // tp + 3 * h // tp            # QKV: column parallel, bias split
             + h * h // tp + h                          # proj: row parallel, bias after the all-reduce
             + 4 * h * h // tp + 4 * h // tp            # fc1: column parallel
             + 4 * h * h // tp + h)                     # fc2: row parallel
    return embeddings + num_layers * layer + 2 * h      # + final LayerNorm
