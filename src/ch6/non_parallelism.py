"""The product every warm-up demo reproduces: Y = X @ A, computed whole on one process.

    python src/ch6/non_parallelism.py
"""
import torch

X = torch.tensor([[0, 1, 2, 3],
                  [4, 5, 6, 7]])          # (2, 4)
A = torch.tensor([[10, 14],
                  [11, 15],
                  [12, 16],
                  [13, 17]])              # (4, 2)

Y = X @ A                                 # (2, 2)
print(Y)
