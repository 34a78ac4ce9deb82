"""Solution ch6c.1. Header 9 + 8 + 1 + 8 + 8 = 34 bytes; sizes int32 (4 S), pointers int64 (8 S),
document indices int64 with one entry per document plus the final S (8 (D + 1)).
79,000 one-sequence documents: 34 + 12 x 79,000 + 8 x 79,001 = 1,580,042 bytes."""


def idx_size(num_sequences: int, num_documents: int) -> int:
    return 34 + 12 * num_sequences + 8 * (num_documents + 1)
