"""Column parallelism on one process: split A's columns, multiply, concatenate.

    X @ [A1 | A2] = [X @ A1 | X @ A2]

Each "device" keeps a full copy of X and half of A's columns; the two partial
outputs are the two column blocks of Y, so concatenating them gives Y.

    python src/ch6/column_parallelism.py
"""
import torch

X = torch.tensor([[0, 1, 2, 3],
                  [4, 5, 6, 7]])          # (2, 4)
A = torch.tensor([[10, 14],
                  [11, 15],
                  [12, 16],
                  [13, 17]])              # (4, 2)

A1, A2 = A.chunk(2, dim=1)                # (4, 1) each: one column per device
Y1 = X @ A1                               # (2, 1) on device 1
Y2 = X @ A2                               # (2, 1) on device 2
Y = torch.cat([Y1, Y2], dim=1)            # (2, 2): concatenate the columns
print(Y)

if not torch.equal(Y, X @ A):
    raise SystemExit("column-parallel product differs from X @ A")
