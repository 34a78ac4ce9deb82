"""Exercise ch6.4: the padded vocabulary, and what breaks without it.

1. Write Megatron's padding rule: the vocabulary grows with dummy tokens to
   the next multiple of ``divisible_by x tp`` (GPT-2's 50257 at TP=1 -> 50304).
2. Break it: build the vocab-parallel embedding with the unpadded size on two
   tensor ranks and paste the error (the last line Python prints, ``ValueError: ...``,
   with or without the ``ValueError:``) into ERROR_WITHOUT_PADDING:

       python -c "from lessons_pkg.tensor_parallel import VocabParallelEmbedding; \
from lessons_pkg.tensor_parallel.layers import TPShape; VocabParallelEmbedding(50257, 8, tp_group=TPShape(2))"

3. Explain it: WHY is one of
   A: the tokenizer needs a vocabulary of even size
   B: every tensor rank must hold the same whole number of rows of the table
   C: matrix-multiply kernels cannot handle an odd dimension

(The lesson's Korean notes give GPT-2's vocabulary as 52527 (it is 50257, the
number Megatron's logs print) and say tensor parallelism needs an even number
of GPUs; check both against your rule: TP=3 works once the vocabulary is padded.)

Check: python -m lessons_pkg.labs check ch6.4
"""


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    raise NotImplementedError("padded_vocab_size(vocab_size, tp, divisible_by)")


ERROR_WITHOUT_PADDING = ""   # paste the error message here
WHY = None                   # "A", "B" or "C"
