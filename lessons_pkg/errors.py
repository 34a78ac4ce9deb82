"""One error type for "the user gave us something wrong", and the one place that reports it.

A bad file, a bad value, a bad folder, a checkpoint of another model: the
message names what is wrong, and a traceback would only bury it. The tools
that take files and values from the user (``src/ch6``: preprocess_data,
train_tokenizer, megatron_datasets, pretrain_gpt, checkpoint_util, generate,
evaluate_gpt, the server and its client, the two warm-up demos; ``src/ch5``'s
scripts; ``python -m lessons_pkg.launch``) run their ``main`` through
:func:`run_cli`:

* :class:`UserError` (and its kinds: ``IndexFormatError``, ``CheckpointError``,
  the evaluation's ``DataError``, :class:`OutputError` for a failed write) and
  ``OSError`` (a folder that is read-only or full, a file where a folder goes,
  ...; named by its path) end in ONE line ``error: <message>`` on stderr and
  exit status 2, with no traceback; argparse's refusals (usage, then
  ``prog: error: ...``) are held and printed the same way;
* anything else is a bug of ours: its traceback is shown, as Python shows it.

Several ranks: the line is printed once per job. When every rank meets the
same error, rank 0 prints it (the others wait half a second before they claim the
report); when only one rank meets it, that rank prints it. The claim goes
through torchrun's own store (its agent hosts it, so it is there before any
process group exists and after rank 0 has gone) or, for ranks started
otherwise, through the default process group's store; with neither (ranks
started by hand, before their process group), every rank that meets the error
prints it: better twice than never. Every rank that meets it also writes
torchrun's error file (``TORCHELASTIC_ERROR_FILE``), so torchrun's failure
summary shows the line as the root cause instead of "To enable traceback see
...", and :func:`lessons_pkg.launch.torchrun` shows it alone instead of every
rank's log. A rank whose collective then fails because a peer stopped exits
quietly.
"""
from __future__ import annotations

import json
import os
import sys
import time

EXIT_USER_ERROR = 2  # argparse's status for a bad command line: the same kind of mistake
RANK_0_HEAD_START = 0.5  # seconds the other ranks wait before claiming the report


class UserError(ValueError):
    """The user gave us something wrong (a file, a value, a folder, a checkpoint); the message names it.

    A ``ValueError``, so code that refuses bad values with ``except ValueError`` keeps working.
    """


class CheckpointError(UserError):
    """A checkpoint folder or file that cannot be used as asked: missing, half-written, of another model."""


class OutputError(UserError):
    """A write that failed (a full disk, a read-only folder, a file where a folder goes); names the path."""


def describe(error: BaseException) -> str | None:
    """The one-line message of a user error or a filesystem error; ``None`` for anything else (a bug)."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError):
        if error.strerror is None:  # raised with a sentence (ours, or a library's), not an errno
            return str(error)
        if error.filename is None:
            return error.strerror
        if isinstance(error, FileExistsError) and os.path.isfile(error.filename):  # os.makedirs over a file
            return f"{error.filename} is a file, where a folder is needed"
        where = str(error.filename) + (f" -> {error.filename2}" if error.filename2 else "")
        return f"{where}: {error.strerror}"
    return None


def output_error(path: str, error: OSError) -> OutputError:
    """A failed write (``ENOSPC``, ``EFBIG``, read-only, ...) as an :class:`OutputError` naming ``path``."""
    reason = describe(error) if error.filename not in (None, path) else (error.strerror or str(error))
    return OutputError(f"cannot write {path}: {reason}")


def output_folder_problems(flag: str, folder: str, what: str = "") -> list[str]:
    """Why ``folder`` cannot be written to (it is a file, or where it would be made is read-only); [] if it can.

    For the argument checks of a tool that writes there later: better refused before hours of work.
    """
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        return [f"{flag} {folder}: {what + ' ' if what else ''}is a file, not a folder"]
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [f"{flag} {folder}: {existing} is a file, so no folder can be made under it"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{flag} {folder}: {existing} is not writable (read-only file system or no permission)"]
    return []


# --- report once per job -------------------------------------------------------------------------
STORE_TIMEOUT_S = 10.0  # a store that does not answer within this is taken as gone: the line is printed


def _key(name: str) -> str:  # per restart of the job: torchrun --max-restarts reuses its store
    return f"lessons_pkg/user_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def _store():
    """The job's key-value store, or None: torchrun's own (hosted by its agent, reachable before any
    process group exists and after rank 0 has gone), else the default process group's."""
    from datetime import timedelta

    try:
        import torch.distributed as dist

        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                 timeout=timedelta(seconds=STORE_TIMEOUT_S))
        if dist.is_available() and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
            return store
    except Exception:
        pass
    return None


def _claim(message: str) -> bool:
    """Whether this rank is the first of its job to report a user error (it then leaves the message)."""
    store = _store()
    if store is None:  # no store to agree through (e.g. ranks started by hand): better printed twice than never
        return True
    try:
        first = store.add(_key("claims"), 1) == 1
        if first:
            store.set(_key("message"), message)
        return first
    except Exception:  # the store is gone (its host exited): better printed twice than never
        return True


def reported_by_another_rank() -> str | None:
    """The message another rank of this job reported, if one did (a collective then fails here as a result)."""
    store = _store()
    if store is None:
        return None
    try:
        if store.check([_key("message")]):
            return store.get(_key("message")).decode()
    except Exception:
        pass
    return None


def _several_ranks() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _write_torchelastic_error_file(line: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:  # torchrun's "message as a string" form: shown as the failure's traceback
            json.dump({"message": line, "timestamp": str(int(time.time()))}, f)
    except OSError:
        pass


def report(message: str, line: str | None = None, before: str = "") -> None:
    """Print ``error: <message>`` (or ``line``, after ``before``) once for the whole job (module docstring)."""
    line = line or f"error: {message}"
    if _several_ranks():
        if os.environ["RANK"] != "0":
            time.sleep(RANK_0_HEAD_START)  # when every rank meets it, rank 0 speaks
        _write_torchelastic_error_file(line)  # every rank that fails names it to torchrun
        if not _claim(line):
            return
    print(f"{before}{line}", file=sys.stderr, flush=True)


class _ArgumentError(Exception):
    """argparse's refusal of a command line, held so that it is printed once per job like a user error."""

    def __init__(self, usage: str, line: str):
        super().__init__(line)
        self.usage, self.line = usage, line


def _argparse_error(parser, message):  # stands in for ArgumentParser.error while a tool's main runs
    raise _ArgumentError(parser.format_usage(), f"{parser.prog}: error: {message}")


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run a tool's ``main(argv)``: its status, or 2 after one ``error:`` line for a user error.

    ``raise SystemExit("error: ...")`` (a message, not a number) counts as a user error too. A rank
    whose collective fails because another rank stopped at a user error exits quietly with status 2.
    """
    import argparse

    error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _argparse_error
    try:
        status = main() if argv is None else main(argv)
    except _ArgumentError as e:  # argparse's usage and "prog: error: ...", once per job, status 2 as argparse's
        report(e.line, e.line, before=e.usage)
        return EXIT_USER_ERROR
    except SystemExit as e:
        if isinstance(e.code, str) and e.code.startswith("error: "):
            report(e.code[len("error: "):])
            return EXIT_USER_ERROR
        raise
    except Exception as e:
        message = describe(e)
        if message is not None:
            report(message)
            return EXIT_USER_ERROR
        if _several_ranks():
            other = reported_by_another_rank()
            if other is not None:  # e.g. gloo's "Connection closed by peer": a consequence, not news
                _write_torchelastic_error_file(other)
                return EXIT_USER_ERROR
        raise  # a bug: its traceback
    finally:
        argparse.ArgumentParser.error = error
    return 0 if status is None else status
