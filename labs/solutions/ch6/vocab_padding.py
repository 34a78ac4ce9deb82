"""Solution ch6.4. 50257 -> 50304 (TP=1), 50432 (TP=2), 50688 (TP=4); TP=3 works too (50304 = 131 x 384):
the rule is a multiple of 128 x TP, not an even TP. "52527" in the lesson is a typo of 50257."""


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


ERROR_WITHOUT_PADDING = ("num_embeddings (the padded vocabulary size) (50257) is not divisible by "
                         "tensor_model_parallel_size (2)")
WHY = "B"
