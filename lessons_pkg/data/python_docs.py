"""English text that ships with every Python: the docstrings of the standard library, read with ``ast``.

Used wherever a demo needs a corpus and no download may happen (chapter 5's
tiny GPT-2, chapter 6's pretraining corpus). Source files are parsed, never
imported, in sorted order, so the same Python gives the same texts.
"""
from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator

# folders of the standard library that hold tests, tools or third-party code, not documentation
SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(recursive: bool = True) -> Iterator[str]:
    """Paths of the standard library's ``.py`` files, in name order.

    ``recursive`` also walks the packages (folder by folder, sorted, skipping
    :data:`SKIPPED_DIRS`); otherwise only the top-level modules.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    for folder, subfolders, files in os.walk(stdlib):
        keep = sorted(d for d in subfolders if d not in SKIPPED_DIRS and not d.startswith("."))
        subfolders[:] = keep if recursive else []
        for file in sorted(f for f in files if f.endswith(".py")):
            yield os.path.join(folder, file)


def module_docstrings(path: str) -> Iterator[str]:
    """The docstrings of one source file (module, classes, functions), in ``ast.walk`` order; none if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring:
                yield docstring


def stdlib_docstrings(recursive: bool = True) -> Iterator[str]:
    """Every docstring of the standard library's files (see :func:`stdlib_files`)."""
    for path in stdlib_files(recursive):
        yield from module_docstrings(path)
