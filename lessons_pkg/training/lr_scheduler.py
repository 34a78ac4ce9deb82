"""Megatron-LM's learning-rate schedule: linear warm-up, then constant, linear or cosine decay to ``min_lr``.

With ``W`` warm-up iterations and ``D`` decay iterations (``--lr-decay-iters``),
the learning rate used at step ``n`` (``n`` optimizer steps already taken) is::

    n <= W:       lr * n / W                                     (warm-up from 0)
    W < n <= D:   min_lr + coeff(r) * (lr - min_lr),  r = (n - W) / (D - W)
                      cosine: coeff = (1 + cos(pi r)) / 2
                      linear: coeff = 1 - r
    n > D:        min_lr

so the first iteration of a run with warm-up uses a learning rate of 0, as in
Megatron (``--lr-warmup-fraction f`` sets ``W = f * D``).
"""
from __future__ import annotations

import math


def learning_rate(step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                  decay_style: str) -> float:
    """The learning rate after ``step`` optimizer steps (a pure function, see the module docstring)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return max_lr * step / warmup_steps
    if decay_style == "constant":
        return max_lr
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(decay_steps - warmup_steps, 1)
    if decay_style == "linear":
        coeff = 1.0 - ratio
    elif decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        raise ValueError(f"unknown lr decay style {decay_style!r} (constant, linear or cosine)")
    return min_lr + coeff * (max_lr - min_lr)


class OptimizerParamScheduler:
    """Sets ``lr`` on every param group of ``optimizer`` before each step; checkpointable.

    ``step()`` is called once per successful optimizer step; ``num_steps`` is the
    number taken so far, which is all the state a resumed run needs.
    """

    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                 decay_style: str):
        if not 0 <= warmup_steps <= decay_steps:
            raise ValueError(f"warm-up steps ({warmup_steps}) must be between 0 and decay steps ({decay_steps})")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = max_lr, min_lr
        self.warmup_steps, self.decay_steps, self.decay_style = warmup_steps, decay_steps, decay_style
        self.num_steps = 0
        self._apply()

    @classmethod
    def from_args(cls, optimizer, args) -> "OptimizerParamScheduler":
        if args.lr_warmup_fraction is not None:
            warmup = int(args.lr_warmup_fraction * args.lr_decay_iters)
        else:
            warmup = args.lr_warmup_iters
        return cls(optimizer, args.lr, args.min_lr, warmup, args.lr_decay_iters, args.lr_decay_style)

    def get_lr(self) -> float:
        return learning_rate(self.num_steps, self.max_lr, self.min_lr, self.warmup_steps, self.decay_steps,
                             self.decay_style)

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
                "decay_style": self.decay_style}

    def load_state_dict(self, state: dict) -> None:
        # the schedule itself comes from this run's arguments (as in Megatron); the position from the checkpoint
        self.num_steps = int(state["num_steps"])
        self._apply()
