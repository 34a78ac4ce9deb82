"""Why Megatron's MLP splits its first weight by columns: GeLU commutes with that split only.

Both splits are compared with the unsplit GeLU(X W), so a wrong split would print False:

Row split:    GeLU(X1 W1) + GeLU(X2 W2)  vs  GeLU(X W)  -> different
              GeLU(X1 W1 + X2 W2)        vs  GeLU(X W)  -> identical (all-reduce, then GeLU)
Column split: [GeLU(X W1) | GeLU(X W2)]  vs  GeLU(X W)  -> identical

GeLU is applied element by element, so it can be applied to each column block
separately; but it is not additive, so it cannot be applied to partial sums.
A row-parallel first layer would therefore need an all-reduce *before* the
GeLU; a column-parallel one needs no communication until the second layer.

    python src/ch6/megatron_mlp_gelu.py

Tolerance: the split matmuls add the same products in another order, so the
results differ from X @ W by float32 rounding (~1e-6 on values of O(1..10));
rtol=1e-5, atol=1e-5. The row split is off by O(0.1), far outside it.
"""
import torch
from torch.nn.functional import gelu

from lessons_pkg.utils import check_close

RTOL, ATOL = 1e-5, 1e-5
torch.manual_seed(0)
X = torch.randn(6, 6)
W = torch.randn(6, 6)
SERIAL = gelu(X @ W)  # the unsplit layer


def row_split_matches() -> tuple[bool, bool]:
    """(GeLU of each partial sum, added, matches; GeLU of the all-reduced sum matches)."""
    X1, X2 = X.chunk(2, dim=1)            # (6, 3) each
    W1, W2 = W.chunk(2, dim=0)            # (3, 6) each
    gelu_then_sum = gelu(X1 @ W1) + gelu(X2 @ W2)
    sum_then_gelu = gelu(X1 @ W1 + X2 @ W2)
    return check_close(gelu_then_sum, SERIAL, RTOL, ATOL), check_close(sum_then_gelu, SERIAL, RTOL, ATOL)


def column_split_matches() -> bool:
    W1, W2 = W.chunk(2, dim=1)            # (6, 3) each
    parallel = torch.cat([gelu(X @ W1), gelu(X @ W2)], dim=1)
    return check_close(parallel, SERIAL, RTOL, ATOL)


(row, row_reduced), column = row_split_matches(), column_split_matches()
print(f"Is GeLU in RowParallelLinear same with non-parallel = {row}")
print(f"Is GeLU after the all-reduce of the row split same with non-parallel = {row_reduced}")
print(f"Is GeLU in ColumnParallelLinear same with non-parallel = {column}")

if row or not row_reduced or not column:
    raise SystemExit("unexpected: GeLU should commute with the column split only")
