"""Assemble a chapter notebook from its sections in chapters/<chapter>_parts/ (percent format).

    python scripts/build_notebook.py 06e            # write chapters/06e_after_training.ipynb (no outputs), then:
    jupyter nbconvert --to notebook --execute --inplace chapters/06e_after_training.ipynb
    python scripts/build_notebook.py 06e --run 00 10   # or: run some sections as one plain script (quick checks)

Chapters built this way: 06e (after training) and 06f (sequence and context parallelism).

Each part is a Python file whose cells start with ``# %%`` (code) or
``# %% [markdown]`` (markdown, each line prefixed with ``# ``), the format
jupytext calls "percent". Sections are written by different people in
parallel; the notebook is the concatenation of the parts in file-name order.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = {"06e": "06e_after_training.ipynb", "06f": "06f_sequence_and_context_parallelism.ipynb"}


def _paths(chapter: str) -> tuple[str, str]:
    """(parts folder, notebook path) of ``chapter``."""
    return os.path.join(ROOT, "chapters", f"{chapter}_parts"), os.path.join(ROOT, "chapters", NOTEBOOKS[chapter])


def cells_of(path: str) -> list[tuple[str, str]]:
    """``[(kind, source)]`` of one part file."""
    cells, kind, lines = [], None, []
    for line in open(path, encoding="utf-8").read().splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                cells.append((kind, lines))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
            continue
        if kind is None:
            continue
        if kind == "markdown":
            line = line[2:] if line.startswith("# ") else line[1:] if line.startswith("#") else line
        lines.append(line)
    if kind is not None:
        cells.append((kind, lines))
    out = []
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if lines:
            out.append((kind, "\n".join(lines)))
    return out


def parts(chapter: str, selected: list[str] | None = None) -> list[str]:
    folder = _paths(chapter)[0]
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py"))
    if selected:
        names = [n for n in names if any(n.startswith(s) for s in selected)]
    return [os.path.join(folder, n) for n in names]


def build(chapter: str) -> None:
    import nbformat

    notebook = _paths(chapter)[1]
    nb = nbformat.v4.new_notebook()
    for path in parts(chapter):
        for kind, source in cells_of(path):
            nb.cells.append(nbformat.v4.new_markdown_cell(source) if kind == "markdown"
                            else nbformat.v4.new_code_cell(source))
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}  # as JupyterLab writes it
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, notebook)
    print(f"wrote {os.path.relpath(notebook, ROOT)}: {len(nb.cells)} cells from {len(parts(chapter))} parts")


def run(chapter: str, selected: list[str]) -> None:
    os.chdir(ROOT)
    namespace: dict = {"__name__": "__main__"}
    for path in parts(chapter, selected):
        for kind, source in cells_of(path):
            if kind == "code":
                start = time.perf_counter()
                exec(compile(source, path, "exec"), namespace)  # noqa: S102 - our own notebook cells
                print(f"  [{os.path.basename(path)}: cell ran in {time.perf_counter() - start:.1f} s]", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("chapter", choices=sorted(NOTEBOOKS))
    p.add_argument("--run", nargs="*", help="run these parts (prefixes, e.g. 00 10) as one script instead")
    ns = p.parse_args()
    if ns.run is not None:
        run(ns.chapter, ns.run)
    else:
        build(ns.chapter)
    sys.exit(0)
