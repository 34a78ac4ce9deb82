"""AdamW with Megatron's weight-decay rules, data-parallel gradient averaging and global-norm clipping.

``get_optimizer(named_params, args, groups)`` returns

* :class:`Optimizer` (default): every data-parallel rank keeps the full Adam
  state; gradients are all-reduced (averaged) over the data-parallel group;
* :class:`~lessons_pkg.training.distributed_optimizer.DistributedOptimizer`
  (``--use-distributed-optimizer``, ZeRO-1): each data-parallel rank keeps and
  updates 1/DP of it.

Both expose ``step() -> grad norm (None if the step was skipped)``,
``zero_grad()``, ``param_groups`` (for the learning-rate scheduler) and
``state_dict()``/``load_state_dict()``.

Weight decay (decoupled, AdamW, as Megatron's Adam with ``adam_w_mode``) applies
to weight matrices only: biases and 1-D parameters (LayerNorm) get none.
"""
from __future__ import annotations

import torch

from lessons_pkg.errors import CheckpointError
from lessons_pkg.training import grads as G
from lessons_pkg.training.loss_scaler import DynamicLossScaler
from lessons_pkg.training.param_groups import (  # noqa: F401  (Groups, no_weight_decay: part of this module's API)
    Groups,
    adam_kwargs,
    load_adam_state,
    no_weight_decay,
    param_names,
    split_by_weight_decay,
)


class Optimizer:
    """AdamW on the full (local shard of the) model; gradients all-reduced over data-parallel ranks."""

    def __init__(self, named_params, args, groups: Groups, loss_scaler: DynamicLossScaler | None = None):
        named_params = list(named_params)
        decay, no_decay = split_by_weight_decay(named_params)
        self.params = decay + no_decay
        self.names = param_names(self.params, named_params)
        self.groups, self.clip_grad, self.loss_scaler = groups, args.clip_grad, loss_scaler
        self.adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            **adam_kwargs(args, self.params[0].device if self.params else "cpu"))

    @property
    def param_groups(self):
        return self.adam.param_groups

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> float | None:
        G.allreduce_data_parallel_grads(self.params, self.groups.dp_group)  # sum / DP
        grads = [p.grad for p in self.params]
        if self.loss_scaler is not None:
            found_inf = self.loss_scaler.unscale_and_check(grads)
            self.loss_scaler.update(found_inf)
            if found_inf:
                return None
        norm = G.global_grad_norm(self.params, self.groups.tp_rank, self.groups.tp_group, self.groups.pp_group)
        G.clip_grads(grads, norm, self.clip_grad)
        self.adam.step()
        return norm

    def state_dict(self) -> dict:
        state = {"adam": self.adam.state_dict(), "param_names": self.names}
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("param_names", self.names)
        if saved != self.names:
            bad = next(((a, b) for a, b in zip(saved, self.names) if a != b), (len(saved), len(self.names)))
            raise CheckpointError(f"optimizer state was saved for other parameters: {bad[0]!r} where this model has "
                             f"{bad[1]!r} (a checkpoint of another layout must be resharded, see lessons_pkg.checkpoint)")
        load_adam_state(self.adam, state["adam"], self.params[0].device if self.params else "cpu")
        if self.loss_scaler is not None and "loss_scaler" in state:
            self.loss_scaler.load_state_dict(state["loss_scaler"])


def get_optimizer(named_params, args, groups: Groups):
    """The optimizer ``args`` ask for (see the module docstring)."""
    scaler = DynamicLossScaler(args.initial_loss_scale, args.loss_scale_window) if args.fp16 else None
    if args.use_distributed_optimizer:
        from lessons_pkg.training.distributed_optimizer import DistributedOptimizer

        return DistributedOptimizer(named_params, args, groups, loss_scaler=scaler)
    return Optimizer(named_params, args, groups, loss_scaler=scaler)
