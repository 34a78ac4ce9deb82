"""Exercise ch6c.3: which documents go to train/valid/test, and how many samples a run asks for.

1. ``--split 949,50,1``: Megatron normalises the weights, gives each split
   round(weight x size) documents, and takes any rounding excess off the end
   so that the last boundary is exactly ``size``. Return [0, train_end, valid_end, size].
   ("949,50,1" and "0.8/0.1/0.1" are both valid.)
2. The training loop asks the three datasets for a number of samples
   (sequences), not documents: training needs every iteration's global batch;
   validation runs eval_iters batches every eval_interval iterations AND once
   more at the end; test runs eval_iters batches once. Return [train, valid, test].
   (The lesson's log shows 3200/480/160 for 200 iterations of 16.)

Check: python -m lessons_pkg.labs check ch6c.3
"""


def split_bounds(split: str, size: int) -> list[int]:
    raise NotImplementedError("split_bounds(split, size)")


def target_samples(train_iters: int, global_batch_size: int, eval_interval: int, eval_iters: int) -> list[int]:
    raise NotImplementedError("target_samples(train_iters, global_batch_size, eval_interval, eval_iters)")
