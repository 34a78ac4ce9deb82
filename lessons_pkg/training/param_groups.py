"""What both optimizers share: the process groups they use, Megatron's weight-decay rule, Adam's settings.

:mod:`lessons_pkg.training.optimizer` (every data-parallel rank holds all of
Adam's state) and :mod:`lessons_pkg.training.distributed_optimizer` (ZeRO-1,
1/DP of it each) both import from here; the distributed one needs nothing of the other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Groups:
    """The process groups an optimizer needs, read once from ``parallel_state`` by the caller."""

    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    tp_rank: int = 0


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron's rule: no decay for biases and 1-D parameters (LayerNorm weight and bias)."""
    return name.endswith(".bias") or param.ndim == 1


def split_by_weight_decay(named_params) -> tuple[list, list]:
    """``(decay, no_decay)`` parameter lists, each in model order; a parameter shared by name appears once."""
    decay, no_decay, seen = [], [], set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    return decay, no_decay


def param_names(params: list, named_params) -> list[str]:
    """The name of each parameter of ``params`` (first name it has in ``named_params``): checkpoints key Adam by it."""
    names = {}
    for name, p in named_params:
        names.setdefault(id(p), name)
    return [names[id(p)] for p in params]


def adam_kwargs(args, device: torch.device | str = "cpu") -> dict:
    """AdamW's arguments. On a GPU ``fused=True`` (one kernel reads and writes each parameter's state once;
    ``foreach`` runs about ten passes, see docs/benchmarks.md); on the CPU ``foreach``, as the tests run it."""
    return dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, **_implementation(device))


def _implementation(device) -> dict:
    return {"fused": True, "foreach": None} if torch.device(device).type == "cuda" else {"fused": None, "foreach": True}


def load_adam_state(adam: torch.optim.Optimizer, state: dict, device) -> None:
    """``adam.load_state_dict(state)``, keeping this machine's implementation: torch copies every group
    setting from the checkpoint, ``fused``/``foreach`` included, so a GPU run resumed from a CPU
    checkpoint would otherwise fall back to ``foreach`` (and a CPU run try ``fused``)."""
    adam.load_state_dict(state)
    for group in adam.param_groups:
        group.update(_implementation(device))
