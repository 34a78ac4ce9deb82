"""Exercise ch6f.1: the activation memory of one transformer layer (Korthikanti et al. 2022, Table 2).

Return the bytes one layer keeps for its backward, per rank, for sequence length s, micro-batch b,
hidden size h, a heads, tensor-parallel size t, with or without sequence parallelism. Each activation
element takes `activation_bytes` (2 in the paper: 16-bit), each dropout-mask element `mask_bytes`
(1 in the paper). List what autograd keeps: the inputs of the two LayerNorms, of the QKV matmul, Q and K
for the scores, the softmax output, the attention-dropout mask and its output, V, the input of the output
projection and its dropout mask; then the MLP's input, the GeLU's input, the second matmul's input and
its dropout mask. Which of them does tensor parallelism split by t, and which only sequence parallelism?
(With 2 and 1 bytes the totals are the paper's sbh(34 + 5as/h), sbh(10 + 24/t + 5as/(ht)), sbh(34/t + 5as/(ht)).)

Check: python -m lessons_pkg.labs check ch6f.1   (it also measures a real layer, float32: 4 and 4 bytes)
"""


def activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                     activation_bytes: int = 2, mask_bytes: int = 1) -> float:
    raise NotImplementedError("activation_bytes(s, b, h, a, t, sequence_parallel, activation_bytes, mask_bytes)")
