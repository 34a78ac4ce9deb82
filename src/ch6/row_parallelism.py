"""Row parallelism on one process: split X's columns and A's rows, multiply, sum.

    [X1 | X2] @ [A1 ; A2] = X1 @ A1 + X2 @ A2

Each "device" keeps half of X's columns and the matching half of A's rows; each
partial product has Y's full shape, and their sum is Y.

    python src/ch6/row_parallelism.py
"""
import torch

X = torch.tensor([[0, 1, 2, 3],
                  [4, 5, 6, 7]])          # (2, 4)
A = torch.tensor([[10, 14],
                  [11, 15],
                  [12, 16],
                  [13, 17]])              # (4, 2)

X1, X2 = X.chunk(2, dim=1)                # (2, 2) each: half of X's columns
A1, A2 = A.chunk(2, dim=0)                # (2, 2) each: the matching half of A's rows
Y1 = X1 @ A1                              # (2, 2) partial sum on device 1
Y2 = X2 @ A2                              # (2, 2) partial sum on device 2
Y = Y1 + Y2                               # (2, 2): add the partial sums
print(Y)

if not torch.equal(Y, X @ A):
    raise SystemExit("row-parallel product differs from X @ A")
