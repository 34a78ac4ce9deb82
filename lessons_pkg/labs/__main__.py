"""python -m lessons_pkg.labs list [CHAPTER] | check ID|CHAPTER|all [--file PATH]

    python -m lessons_pkg.labs list            # every exercise: id, title, the file to edit
    python -m lessons_pkg.labs check ch6.1     # check labs/ch6/g_backward.py: PASS or FAIL and why
    python -m lessons_pkg.labs check ch6       # every exercise of chapter 6
    python -m lessons_pkg.labs check ch6.1 --file my_copy.py

Exit status: 0 when every checked exercise passes, 1 otherwise, 2 for a bad command line.
"""
from __future__ import annotations

import argparse
import sys

from lessons_pkg.labs import default_labs_dir, find, run_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lessons_pkg.labs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="the exercises and the files to edit")
    ls.add_argument("selector", nargs="?", default="all")
    ck = sub.add_parser("check", help="check your answer")
    ck.add_argument("selector", help="an exercise (ch6.1), a chapter (ch6) or all")
    ck.add_argument("--file", default=None, help="check this file instead of labs/<chapter>/<name>.py (one exercise)")
    args = parser.parse_args(argv)
    try:
        chosen = find(args.selector)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "list":
        labs = default_labs_dir()
        for e in chosen:
            print(f"{e.id:7s} {e.title}\n        edit {labs / e.file}\n        {e.run}")
        return 0
    if args.file is not None and len(chosen) != 1:
        print(f"error: --file names one file, but {args.selector!r} selects {len(chosen)} exercises", file=sys.stderr)
        return 2
    results = [run_check(e, args.file) for e in chosen]
    for r in results:
        print(r.report(), flush=True)
    if len(results) > 1:
        print(f"{sum(r.passed for r in results)} of {len(results)} passed")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
