"""Why Megatron's MLP splits its first weight by columns: GeLU commutes with that split only.

Row split:    GeLU(X1 W1 + X2 W2)    vs  GeLU(X1 W1) + GeLU(X2 W2)      -> different
Column split: GeLU([X W1 | X W2])    vs  [GeLU(X W1) | GeLU(X W2)]      -> identical

GeLU is applied element by element, so it can be applied to each column block
separately; but it is not additive, so it cannot be applied to partial sums.
A row-parallel first layer would therefore need an all-reduce *before* the
GeLU; a column-parallel one needs no communication until the second layer.

    python src/ch6/megatron_mlp_gelu.py
"""
import torch
from torch.nn.functional import gelu

torch.manual_seed(0)
X = torch.randn(6, 6)
W = torch.randn(6, 6)


def row_split_matches() -> bool:
    X1, X2 = X.chunk(2, dim=1)            # (6, 3) each
    W1, W2 = W.chunk(2, dim=0)            # (3, 6) each
    parallel = gelu(X1 @ W1) + gelu(X2 @ W2)
    serial = gelu(X1 @ W1 + X2 @ W2)
    return torch.allclose(parallel, serial)


def column_split_matches() -> bool:
    W1, W2 = W.chunk(2, dim=1)            # (6, 3) each
    parallel = torch.cat([gelu(X @ W1), gelu(X @ W2)], dim=1)
    serial = gelu(torch.cat([X @ W1, X @ W2], dim=1))
    return torch.equal(parallel, serial)


row, column = row_split_matches(), column_split_matches()
print(f"Is GeLU in RowParallelLinear same with non-parallel = {row}")
print(f"Is GeLU in ColumnParallelLinear same with non-parallel = {column}")

if row or not column:
    raise SystemExit("unexpected: GeLU should commute with the column split only")
