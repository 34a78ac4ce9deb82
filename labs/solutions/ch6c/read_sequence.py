"""Solution ch6c.2."""
import struct

import numpy as np

DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def read_sequence(prefix: str, i: int) -> list[int]:
    with open(prefix + ".idx", "rb") as f:
        header = f.read(34)
        assert header[:9] == b"MMIDIDX\x00\x00", header[:9]
        code = header[17]
        num_sequences, _ = struct.unpack("<QQ", header[18:34])
        sizes = np.frombuffer(f.read(4 * num_sequences), dtype=np.int32)
        pointers = np.frombuffer(f.read(8 * num_sequences), dtype=np.int64)
    tokens = np.fromfile(prefix + ".bin", dtype=DTYPES[code], count=int(sizes[i]), offset=int(pointers[i]))
    return tokens.tolist()
