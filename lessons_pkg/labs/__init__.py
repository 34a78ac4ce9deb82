"""Lab exercises and their checkers: ``python -m lessons_pkg.labs list | check ch6.1``.

Each exercise is a small Python file under ``labs/<chapter>/`` that a learner
edits (the starting point raises ``NotImplementedError`` or holds ``None``
where an answer goes). Its checker imports that file, runs what it defines
against the course's own implementation or against one process, and says
pass or fail and why. Reference solutions live in ``labs/solutions/``; no
checker reads them (the tests hand a solution's path to a checker explicitly).

A checker is a function ``check(module) -> list[str]``: it returns the lines
that explain a pass, and raises :class:`Fail` (or lets the learner's own
error propagate) to fail.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class Fail(Exception):
    """The learner's answer is wrong; the message says how."""


@dataclass(frozen=True)
class Exercise:
    id: str           # "ch6.1"
    title: str        # one line
    file: str         # relative to the labs folder: "ch6/g_backward.py"
    run: str          # how a learner runs or explores it (laptop or cluster)
    check: Callable   # check(module) -> list[str]


@dataclass
class Result:
    exercise: Exercise
    passed: bool
    lines: list[str]

    def report(self) -> str:
        head = f"{self.exercise.id} {self.exercise.title}: {'PASS' if self.passed else 'FAIL'}"
        return "\n".join([head] + [f"  {line}" for line in self.lines])


_counter = itertools.count()
CHAPTERS = ("ch5", "ch6", "ch6b", "ch6c", "ch6d", "ch6e", "ch6f")  # the modules lessons_pkg/labs/<chapter>.py, in the course's order


def load(path: str | os.PathLike):
    """Import the file at ``path`` as a fresh module (a learner's edits are always seen)."""
    spec = importlib.util.spec_from_file_location(f"_lab_{next(_counter)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_labs_dir() -> Path:
    """``$LESSONS_LABS_DIR``, else ``./labs`` when it exists, else the ``labs/`` beside this package."""
    if os.environ.get("LESSONS_LABS_DIR"):
        return Path(os.environ["LESSONS_LABS_DIR"])
    if Path("labs").is_dir():
        return Path("labs")
    return Path(__file__).resolve().parents[2] / "labs"


def run_check(exercise: Exercise, path: str | os.PathLike | None = None) -> Result:
    """Check the learner's file (``path``, default ``labs/<exercise.file>``); never raises."""
    path = Path(path) if path is not None else default_labs_dir() / exercise.file
    if not path.exists():
        return Result(exercise, False, [f"no file {path}"])
    try:
        module = load(path)
        lines = exercise.check(module)
        return Result(exercise, True, [f"file: {path}"] + list(lines))
    except Fail as e:
        return Result(exercise, False, [f"file: {path}"] + str(e).splitlines())
    except NotImplementedError as e:
        return Result(exercise, False, [f"file: {path}", f"not written yet: {e}"])
    except Exception as e:  # noqa: BLE001 - the learner's code may raise anything; show where
        tb = traceback.extract_tb(e.__traceback__)
        mine = [f for f in tb if Path(f.filename) == path.resolve() or f.filename == str(path)]
        where = f" (line {mine[-1].lineno} of your file)" if mine else ""
        return Result(exercise, False, [f"file: {path}", f"your code raised {type(e).__name__}{where}: {e}"])


def exercises() -> list[Exercise]:
    """Every exercise, chapter by chapter."""
    import importlib

    return [e for chapter in CHAPTERS for e in importlib.import_module(f"lessons_pkg.labs.{chapter}").EXERCISES]


def find(selector: str) -> list[Exercise]:
    """``ch6.1`` -> that exercise; ``ch6`` -> the chapter's; ``all`` -> every one. Unknown: ValueError naming the ids."""
    every = exercises()
    if selector == "all":
        return every
    chosen = [e for e in every if e.id == selector or e.id.split(".")[0] == selector]
    if not chosen:
        raise ValueError(f"no exercise {selector!r}; known: {', '.join(e.id for e in every)} (or a chapter, or 'all')")
    return chosen


def expect_close(name: str, got, expected, rtol: float, atol: float, why: str) -> str:
    """Compare tensors (NaN/inf fail); return a line for the report or raise :class:`Fail` naming the largest error."""
    import torch

    got = torch.as_tensor(got)
    expected = torch.as_tensor(expected)
    if got.shape != expected.shape:
        raise Fail(f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if not torch.isfinite(got).all():
        raise Fail(f"{name}: contains NaN or inf")
    err = (got.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    if not bool((err <= bound).all()):
        worst = int((err - bound).argmax())
        ratio = (got.double().flatten()[worst] / expected.double().flatten()[worst]).item() \
            if expected.flatten()[worst] != 0 else float("nan")
        raise Fail(f"{name}: differs from the reference by up to {err.max().item():.3g} "
                   f"(allowed {atol:g} + {rtol:g}*|ref|; {why}); at the worst element yours / reference = {ratio:.4g}")
    return f"{name}: matches the reference (max error {err.max().item():.2g}, allowed {atol:g} + {rtol:g}*|ref|: {why})"
