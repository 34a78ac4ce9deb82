"""ZeRO-1: the Adam state sharded over data-parallel ranks (``--use-distributed-optimizer``).

Adam keeps two float32 tensors (``exp_avg``, ``exp_avg_sq``) per parameter: with
plain data parallelism every replica stores and updates all of them. Here the
parameters are laid out in one flat buffer, padded to a multiple of DP, and
data-parallel rank ``d`` owns the slice ``[d * S, (d + 1) * S)``::

    flat buffer   | decay params ............ | no-decay params ... | pad |
    DP rank 0     [=========)
    DP rank 1               [=========)
    DP rank 2                         [=========)
    DP rank 3                                   [=========)

One step:

1. **reduce-scatter** the flat gradient: rank ``d`` receives the data-parallel
   mean of ITS slice only (the first half of an all-reduce's traffic);
2. global gradient norm: squares of the slice (each element weighted 1 if it
   counts, see :func:`~lessons_pkg.training.grads.counts_in_norm`, else 0),
   summed over data-parallel, tensor and pipeline ranks; clip;
3. AdamW on the slice (so Adam state for ``S`` elements instead of all);
4. **all-gather** the updated slices: every replica has the full new parameters
   (the second half: reduce-scatter + all-gather move as many bytes as one all-reduce).

Adam is elementwise, so updating a slice gives the same numbers as updating
the whole (a test checks the losses match the plain optimizer). A checkpoint
holds each rank's slice of the state: ``distrib_optim_dp_rank_XXX.pt`` per
data-parallel rank, so it resumes with the same data-parallel size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lessons_pkg.errors import CheckpointError
from lessons_pkg.training import grads as G
from lessons_pkg.training.loss_scaler import DynamicLossScaler
from lessons_pkg.training.param_groups import Groups, adam_kwargs, load_adam_state, param_names, split_by_weight_decay


class DistributedOptimizer:
    def __init__(self, named_params, args, groups: Groups, loss_scaler: DynamicLossScaler | None = None):
        named_params = list(named_params)
        decay, no_decay = split_by_weight_decay(named_params)
        self.params = decay + no_decay
        self.names = param_names(self.params, named_params)
        self.groups, self.clip_grad, self.loss_scaler = groups, args.clip_grad, loss_scaler
        self.dp_size = dist.get_world_size(groups.dp_group)
        self.dp_rank = dist.get_rank(groups.dp_group)

        numels = [p.numel() for p in self.params]
        total = sum(numels)
        self.shard_size = -(-total // self.dp_size)                     # ceil(total / DP)
        padded = self.shard_size * self.dp_size
        self.start = self.dp_rank * self.shard_size
        self.end = self.start + self.shard_size
        device = self.params[0].device

        # 1 where an element enters the global norm, 0 for replicas and padding
        norm_mask = torch.zeros(padded, device=device)
        offset = 0
        for p, n in zip(self.params, numels):
            norm_mask[offset:offset + n] = float(G.counts_in_norm(p, groups.tp_rank))
            offset += n
        self.norm_mask = norm_mask[self.start:self.end]                 # [S]

        flat = torch.zeros(padded, device=device)
        flat[:total] = torch.cat([p.detach().reshape(-1).float() for p in self.params])
        self.main_shard = flat[self.start:self.end].clone()             # [S] float32 master copy of my slice
        self.grad_shard = torch.zeros_like(self.main_shard)             # [S]

        # my slice cut where decay params end: at most two Adam params, one per weight-decay group
        n_decay = sum(p.numel() for p in decay)
        cut = min(max(n_decay - self.start, 0), self.shard_size)
        parts = [(0, cut, args.weight_decay), (cut, self.shard_size, 0.0)]
        adam_groups = []
        for lo, hi, wd in parts:
            if hi > lo:
                shard_param = torch.nn.Parameter(self.main_shard[lo:hi])  # a view: Adam updates main_shard
                shard_param.grad = self.grad_shard[lo:hi]
                adam_groups.append({"params": [shard_param], "weight_decay": wd})
            else:  # keep two groups on every rank, so param_groups look alike everywhere
                adam_groups.append({"params": [], "weight_decay": wd})
        self.adam = torch.optim.AdamW(adam_groups, **adam_kwargs(args, self.main_shard.device))
        self._padded, self._total, self._numels = padded, total, numels

    @property
    def param_groups(self):
        return self.adam.param_groups

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _flat_grads(self) -> torch.Tensor:
        flat = torch.zeros(self._padded, device=self.main_shard.device)
        flat[:self._total] = torch.cat([G.ensure_grads([p])[0].reshape(-1).float() for p in self.params])
        return flat                                                      # [DP * S]

    @torch.no_grad()
    def step(self) -> float | None:
        # 1. reduce-scatter: the data-parallel mean of my slice of the gradient
        flat = self._flat_grads().div_(self.dp_size)
        if self.dp_size > 1:
            dist.reduce_scatter_tensor(self.grad_shard, flat, group=self.groups.dp_group)  # [DP*S] -> [S]
        else:
            self.grad_shard.copy_(flat)
        if self.loss_scaler is not None:
            found_inf = self.loss_scaler.unscale_and_check([self.grad_shard])
            self.loss_scaler.update(found_inf)
            if found_inf:
                return None
        # 2. global norm over (data, tensor, pipeline) ranks, each element once; clip
        squares = (self.grad_shard * self.norm_mask).pow(2).sum()
        if self.dp_size > 1:
            dist.all_reduce(squares, group=self.groups.dp_group)
        norm = G.sum_across_model_parallel(squares, self.groups.tp_group, self.groups.pp_group).sqrt().item()
        G.clip_grads([self.grad_shard], norm, self.clip_grad)
        # 3. Adam on my slice only
        self.adam.step()
        # 4. all-gather every rank's updated slice, copy into the model's parameters
        full = torch.empty(self._padded, device=self.main_shard.device)
        if self.dp_size > 1:
            dist.all_gather_into_tensor(full, self.main_shard, group=self.groups.dp_group)  # [S] -> [DP*S]
        else:
            full.copy_(self.main_shard)
        offset = 0
        for p, n in zip(self.params, self._numels):
            p.copy_(full[offset:offset + n].view_as(p))
            offset += n
        return norm

    def state_dict(self) -> dict:
        """This data-parallel rank's slice of the Adam state (and where the slice lies)."""
        state = {"adam": self.adam.state_dict(), "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                 "shard": [self.start, self.end], "param_names": self.names, "numels": self._numels,
                 "shapes": [list(p.shape) for p in self.params]}
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "dp_rank" not in state:  # the plain per-parameter form (a resharded checkpoint): cut my slice of it
            self._load_full_state(state)
            return
        if (state["dp_size"], state["dp_rank"]) != (self.dp_size, self.dp_rank):
            raise CheckpointError(f"distributed-optimizer state of data-parallel rank {state['dp_rank']} of "
                             f"{state['dp_size']} cannot be loaded on rank {self.dp_rank} of {self.dp_size}")
        load_adam_state(self.adam, state["adam"], self.main_shard.device)
        if self.loss_scaler is not None and "loss_scaler" in state:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        self.reload_model_params()

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the float32 master slice from the model's parameters (after a checkpoint was loaded)."""
        flat = torch.zeros(self._padded, device=self.main_shard.device)
        flat[:self._total] = torch.cat([p.detach().reshape(-1).float() for p in self.params])
        self.main_shard.copy_(flat[self.start:self.end])

    @torch.no_grad()
    def _load_full_state(self, state: dict) -> None:
        """Load Adam's moments from per-parameter tensors (any data-parallel size saved them)."""
        from lessons_pkg.checkpoint.reshard import moments_by_name

        moments = moments_by_name(state)
        missing = [n for n in self.names if n not in moments]
        if missing:
            raise CheckpointError(f"optimizer state has no moments for {missing[:3]} ({len(missing)} parameters)")
        template = self.adam.state_dict()
        flat = {}
        for k in ("exp_avg", "exp_avg_sq"):
            full = torch.zeros(self._padded)
            full[:self._total] = torch.cat([moments[n][k].reshape(-1).float() for n in self.names])
            flat[k] = full[self.start:self.end]                          # [S]: my slice
        step = moments[self.names[0]]["step"]
        new_state, offset = {}, 0
        for group, live in zip(template["param_groups"], self.adam.param_groups):
            for i, p in zip(group["params"], live["params"]):
                n = p.numel()
                new_state[i] = {"step": step.clone(), "exp_avg": flat["exp_avg"][offset:offset + n].clone(),
                                "exp_avg_sq": flat["exp_avg_sq"][offset:offset + n].clone()}
                offset += n
        groups = [dict(saved, params=t["params"]) for saved, t in zip(state["adam"]["param_groups"],
                                                                       template["param_groups"])]
        load_adam_state(self.adam, {"state": new_state, "param_groups": groups}, self.main_shard.device)
        if self.loss_scaler is not None and "loss_scaler" in state:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        self.reload_model_params()
