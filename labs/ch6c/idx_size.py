"""Exercise ch6c.1: how big is an .idx file?

Read the layout in lessons_pkg/data/indexed_dataset.py (or Megatron's
_IndexWriter): a fixed header, then three arrays. Write the size in bytes for
S sequences in D documents. (One sequence per document unless the corpus was
preprocessed with --split-sentences.)

Check: python -m lessons_pkg.labs check ch6c.1
"""


def idx_size(num_sequences: int, num_documents: int) -> int:
    raise NotImplementedError("idx_size(num_sequences, num_documents)")
