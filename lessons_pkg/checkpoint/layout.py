"""Where a Megatron-LM checkpoint keeps its files, and checking that they are all there.

::

    <root>/latest_checkpointed_iteration.txt          "5000" (or "release")
    <root>/iter_0005000/mp_rank_00/model_optim_rng.pt               PP = 1: mp_rank_{tp:02d}
    <root>/iter_0005000/mp_rank_01_003/model_optim_rng.pt           PP > 1: mp_rank_{tp:02d}_{pp:03d}
    <root>/iter_0005000/mp_rank_01_003/distrib_optim_dp_rank_002.pt  ZeRO-1: one per data-parallel rank
    <root>/release/mp_rank_00/model_optim_rng.pt                    when the tracker says "release"

:func:`find_checkpoint` reads the tracker and the folder names and refuses,
naming what is wrong, a folder that is not a checkpoint, a tracker pointing to
a missing or half-written iteration, and folders of mixed layouts. Megatron-LM's
newer ``torch_dist`` format (``--ckpt-format torch_dist``, its default since
2024: one ``torch.distributed.checkpoint`` folder per iteration holding
``metadata.json``, ``common.pt`` and ``*.distcp`` shards) is not read; it is
refused with a message that says so and how to get the legacy format.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from lessons_pkg.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"


def iteration_dirname(iteration: int | None) -> str:
    """``iter_0005000``, or ``release`` for ``None``."""
    return "release" if iteration is None else f"iter_{iteration:07d}"


def mp_rank_dirname(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def checkpoint_dir(root: str, iteration: int | None, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(root, iteration_dirname(iteration), mp_rank_dirname(tp_rank, pp_rank, pp_size))


def read_tracker(root: str) -> int | str | None:
    """The tracker's iteration (``int``), ``"release"``, or ``None`` when ``root`` holds no tracker."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if text == "release":
        return "release"
    if not text.isdigit():
        raise CheckpointError(f"{path} should hold an iteration number or 'release', found {text!r}")
    return int(text)


@dataclass(frozen=True)
class CheckpointFiles:
    """One complete saved iteration: its folder and its (tensor, pipeline) grid."""
    root: str
    iteration: int | None          # None for a "release" checkpoint
    tp: int
    pp: int

    @property
    def folder(self) -> str:
        return os.path.join(self.root, iteration_dirname(self.iteration))

    def rank_dir(self, tp_rank: int, pp_rank: int) -> str:
        return checkpoint_dir(self.root, self.iteration, tp_rank, pp_rank, self.pp)

    def model_file(self, tp_rank: int, pp_rank: int) -> str:
        return os.path.join(self.rank_dir(tp_rank, pp_rank), MODEL_FILE)

    def zero_files(self, tp_rank: int, pp_rank: int) -> list[str]:
        """The ``distrib_optim_dp_rank_XXX.pt`` files of one (tensor, pipeline) rank, by data-parallel rank."""
        folder = self.rank_dir(tp_rank, pp_rank)
        names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"distrib_optim_dp_rank_\d{3}\.pt", n))
        return [os.path.join(folder, n) for n in names]


def is_torch_dist(folder: str) -> bool:
    """A ``torch_dist`` (``torch.distributed.checkpoint``) iteration folder: ``metadata.json`` or ``*.distcp`` files."""
    return os.path.isdir(folder) and any(n == "metadata.json" or n.endswith(".distcp") for n in os.listdir(folder))


def _refuse_torch_dist(folder: str) -> None:
    if is_torch_dist(folder):
        raise CheckpointError(f"{folder} is a Megatron-LM torch_dist checkpoint (metadata.json and *.distcp shards of "
                         "torch.distributed.checkpoint), which this course does not read. Save with "
                         "--ckpt-format torch (the legacy format: one model_optim_rng.pt per tensor and pipeline "
                         "rank), or convert it with Megatron-LM itself: load it and pass --ckpt-convert-format torch "
                         "--ckpt-convert-save <folder>")


def find_checkpoint(root: str, iteration: int | None | str = "latest") -> CheckpointFiles:
    """The checkpoint under ``root`` that the tracker (or ``iteration``) names, checked complete."""
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: no such checkpoint folder")
    if iteration == "latest":
        iteration = read_tracker(root)
        if iteration is None:
            _refuse_torch_dist(root)
            entries = sorted(os.listdir(root))[:10]
            if any(re.fullmatch(r"mp_rank_\d{2}(_\d{3})?", n) for n in os.listdir(root)):
                raise CheckpointError(f"{root} is one iteration of a checkpoint (it holds {entries}), not a checkpoint "
                                 f"folder: pass its parent, the folder with {TRACKER}")
            raise CheckpointError(f"{root} is not a Megatron checkpoint folder: no {TRACKER} (it holds {entries})")
        if iteration == "release":
            iteration = None
    folder = os.path.join(root, iteration_dirname(iteration))
    if not os.path.isdir(folder):
        raise CheckpointError(f"{root}: {TRACKER} names {iteration_dirname(iteration)}, but there is no such folder")
    names = sorted(n for n in os.listdir(folder) if n.startswith("mp_rank_"))
    matches = [re.fullmatch(r"mp_rank_(\d{2})(?:_(\d{3}))?", n) for n in names]
    _refuse_torch_dist(folder)
    if not names:
        raise CheckpointError(f"{folder} holds no mp_rank_XX[_YYY] folders: it is empty or half-written")
    if not all(matches):
        raise CheckpointError(f"{folder}: unexpected folders {[n for n, m in zip(names, matches) if not m]}")
    with_pp = {m.group(2) is not None for m in matches}
    if len(with_pp) > 1:
        raise CheckpointError(f"{folder} mixes layouts: both mp_rank_XX (PP=1) and mp_rank_XX_YYY (PP>1) folders: {names}")
    tps = sorted({int(m.group(1)) for m in matches})
    pps = sorted({int(m.group(2)) if m.group(2) else 0 for m in matches})
    files = CheckpointFiles(root, iteration, len(tps), len(pps))
    missing = []
    for t in range(files.tp):
        for p in range(files.pp):
            if not os.path.isfile(files.model_file(t, p)):
                missing.append(os.path.relpath(files.model_file(t, p), root))
    if tps != list(range(len(tps))) or pps != list(range(len(pps))) or missing:
        raise CheckpointError(f"{folder} is incomplete (half-written or mixed layouts): folders {names}, "
                         f"missing {missing or 'rank numbers ' + str((tps, pps))}")
    return files
