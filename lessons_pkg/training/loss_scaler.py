"""Dynamic loss scaling for float16 training (Megatron's ``DynamicGradScaler``).

float16 gradients underflow below ~6e-8. The loss is multiplied by ``scale``
before ``backward`` (so are all gradients); the optimizer divides the gradients
by ``scale`` again before using them. If any gradient on any rank is inf/NaN
the step is skipped and the scale halved; after ``growth_interval`` clean steps
in a row it doubles. bfloat16 has float32's exponent range and needs none of this.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class DynamicLossScaler:
    def __init__(self, initial_scale: float = 2.0 ** 32, growth_interval: int = 1000, min_scale: float = 1.0,
                 backoff_factor: float = 0.5, growth_factor: float = 2.0):
        self.scale, self.min_scale = float(initial_scale), float(min_scale)
        self.growth_interval, self.backoff_factor, self.growth_factor = growth_interval, backoff_factor, growth_factor
        self.clean_steps = 0

    def unscale_and_check(self, grads: list[torch.Tensor], group=None) -> bool:
        """Divide ``grads`` by the scale in place; return True if any rank (of ``group``) found inf/NaN."""
        found = torch.zeros((), device=grads[0].device if grads else "cpu")
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
            found = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float()
        if dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
        return bool(found.item())

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
