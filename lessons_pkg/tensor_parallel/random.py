"""The model-parallel random stream: one generator per tensor-parallel rank, seeded differently on each.

Dropout needs two kinds of randomness in a tensor-parallel model:

* on tensors every tensor rank holds whole and alike (the residual stream
  without sequence parallelism), every rank must drop the SAME elements, or
  the replicas drift apart: the default generator, seeded alike on the tensor
  ranks (``set_seed(seed + 100 * pipeline_rank)``, Megatron's seeding);
* on tensors whose elements differ between tensor ranks (with sequence
  parallelism, rank r holds tokens ``[r s/t, (r+1) s/t)`` of the residual
  stream), each rank must draw its OWN mask: with one shared stream every rank
  would drop the same pattern on its own tokens, a mask repeated ``t`` times
  along the sequence.

The second stream is Megatron-LM's "model-parallel-rng"
(``model_parallel_cuda_manual_seed``): a generator per device seeded with
``seed + 2718 + tensor_rank``, which leaves the default generator's stream
untouched (so a run with sequence parallelism initialises its weights from the
same numbers as one without). Checkpoints save its state with the default
generator's (``lessons_pkg.training.checkpointing``), so a resumed run draws
the masks it would have drawn.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

TENSOR_PARALLEL_SEED_OFFSET = 2718  # Megatron-LM's offset of the model-parallel seed

_generators: dict[str, torch.Generator] = {}
_seed: int | None = None


def model_parallel_manual_seed(seed: int, tp_rank: int) -> int:
    """Seed this process's model-parallel stream with ``seed + 2718 + tp_rank``; returns that seed.

    Generators already handed out are re-seeded in place (layers may hold them).
    """
    global _seed
    _seed = seed + TENSOR_PARALLEL_SEED_OFFSET + tp_rank
    for generator in _generators.values():
        generator.manual_seed(_seed)
    return _seed


def model_parallel_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """The model-parallel generator of ``device`` (created from the seed on first use).

    Seed it first with :func:`model_parallel_manual_seed` (the trainer does, from ``--seed``); an
    unseeded stream is an error, not a silent default that every rank would share.
    """
    device = torch.device(device)
    key = device.type if device.index is None else f"{device.type}:{device.index}"
    if key not in _generators:
        if _seed is None:
            raise RuntimeError("the model-parallel random stream is not seeded: call lessons_pkg.tensor_parallel."
                               "random.model_parallel_manual_seed(seed, tp_rank) before dropout under sequence "
                               "parallelism")
        _generators[key] = torch.Generator(device).manual_seed(_seed)
    return _generators[key]


def checkpoint_rng_contexts(device: torch.device | str = "cpu"):
    """``context_fn`` for ``torch.utils.checkpoint``: the recomputation draws the forward's masks again.

    ``checkpoint`` restores the default generator before recomputing a layer
    (``preserve_rng_state``), but knows nothing of this stream: without this a
    recomputed layer would drop other elements than its forward did, and its
    gradient would be wrong. Returns ``(forward context, recompute context)``;
    the second sets the stream to where the forward began and, after the
    recomputation, back to where it was. Megatron-LM's ``CheckpointFunction``
    does the same with its RNG tracker.
    """
    generator = model_parallel_generator(device) if _seed is not None else None
    saved: dict[str, torch.Tensor] = {}

    @contextmanager
    def forward():
        if generator is not None:
            saved["state"] = generator.get_state()
        yield

    @contextmanager
    def recompute():
        if generator is None:
            yield
            return
        now = generator.get_state()
        generator.set_state(saved["state"])
        try:
            yield
        finally:
            generator.set_state(now)

    return forward(), recompute()


def get_model_parallel_rng_state() -> dict[str, torch.Tensor] | None:
    """The states of the model-parallel generators in use, or None when the stream was never seeded."""
    if _seed is None:
        return None
    return {"seed": torch.tensor(_seed), **{key: g.get_state() for key, g in _generators.items()}}


def set_model_parallel_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`get_model_parallel_rng_state` returned (generators are created as needed)."""
    global _seed
    _seed = int(state["seed"])
    for key, value in state.items():
        if key != "seed":
            model_parallel_generator(key).set_state(value)
