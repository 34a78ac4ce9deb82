"""Solution ch6c.3. 200 x 16 = 3200 train; (200 // 100 + 1) x 10 x 16 = 480 valid; 10 x 16 = 160 test."""


def split_bounds(split: str, size: int) -> list[int]:
    weights = [float(w) for w in split.replace("/", ",").split(",")]
    weights = (weights + [0.0, 0.0])[:3]
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * size)))
    excess = bounds[-1] - size
    return [bounds[0]] + [b - excess for b in bounds[1:]]


def target_samples(train_iters: int, global_batch_size: int, eval_interval: int, eval_iters: int) -> list[int]:
    return [train_iters * global_batch_size,
            (train_iters // eval_interval + 1) * eval_iters * global_batch_size,
            eval_iters * global_batch_size]
