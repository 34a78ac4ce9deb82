"""Exercise ch6c.2: read sequence i of a Megatron dataset by hand.

Given the prefix (``prefix + ".idx"``, ``prefix + ".bin"``), parse the .idx
header with struct (magic, version, dtype code, S, D), find the size and the
byte pointer of sequence i, and read its tokens from the .bin with
numpy.fromfile (count=, offset=). Dtype codes: 4 = int32, 8 = uint16 (the
others are in lessons_pkg/data/indexed_dataset.py). Do not use the course's reader.

Check: python -m lessons_pkg.labs check ch6c.2
"""
import struct

import numpy as np


def read_sequence(prefix: str, i: int) -> list[int]:
    raise NotImplementedError("read_sequence(prefix, i)")
