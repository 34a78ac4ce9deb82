"""One error type for "the user gave us something wrong", and the one place that reports it.

A bad file, a bad value, a bad folder, a checkpoint of another model: the
message names what is wrong, and a traceback would only bury it. So every
command-line tool of the course runs its ``main`` through :func:`run_cli`:

* :class:`UserError` (and its kinds: ``IndexFormatError``, ``CheckpointError``,
  the evaluation's ``DataError``) and ``OSError`` (a folder that is read-only
  or full, a file where a folder goes, ...; named by its path) end in ONE line
  ``error: <message>`` on stderr and exit status 2, with no traceback;
* anything else is a bug of ours: its traceback is shown, as Python shows it.

Several ranks: the message is printed once per job. When every rank meets the
same error, rank 0 prints it (the others wait a moment before they claim the
report, so rank 0 wins); when only one rank meets it, that rank prints it.
The claim goes through the job's ``torch.distributed`` store once a process
group exists, and through a file named after the job before that (one per
node: ranks on other nodes that fail before the process group exists each
print once for their node). The rank that reports also writes torchrun's
error file (``TORCHELASTIC_ERROR_FILE``), so torchrun's failure summary shows
the line as the root cause instead of "To enable traceback see ...", and
:func:`lessons_pkg.launch.torchrun` shows it alone instead of every rank's log.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

EXIT_USER_ERROR = 2  # argparse's status for a bad command line: the same kind of mistake
RANK_0_HEAD_START = 1.0  # seconds the other ranks wait before claiming the report


class UserError(ValueError):
    """The user gave us something wrong (a file, a value, a folder, a checkpoint); the message names it.

    A ``ValueError``, so code that refuses bad values with ``except ValueError`` keeps working.
    """


class CheckpointError(UserError):
    """A checkpoint folder or file that cannot be used as asked: missing, half-written, of another model."""


def describe(error: BaseException) -> str | None:
    """The one-line message of a user error or a filesystem error; ``None`` for anything else (a bug)."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError):
        if error.strerror is None:  # raised by our code with a sentence
            return str(error)
        if error.filename is None:
            return error.strerror
        if isinstance(error, FileExistsError) and os.path.isfile(error.filename):  # os.makedirs over a file
            return f"{error.filename} is a file, where a folder is needed"
        where = str(error.filename) + (f" -> {error.filename2}" if error.filename2 else "")
        return f"{where}: {error.strerror}"
    return None


def output_error(path: str, error: OSError) -> UserError:
    """A failed write (``ENOSPC``, ``EFBIG``, read-only, ...) as a :class:`UserError` naming ``path``."""
    reason = error.strerror or str(error)
    return UserError(f"cannot write {path}: {reason}")


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
CLAIM_KEY, MESSAGE_KEY = "lessons_pkg/user_error_reported", "lessons_pkg/user_error_message"


def _job_key() -> str:
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(var):
            return f"{os.environ[var]}-{os.environ.get('SLURM_STEP_ID', '')}"
    return f"{os.environ.get('MASTER_ADDR', '')}-{os.environ.get('MASTER_PORT', '')}"


def _store():
    """The job's ``torch.distributed`` store once a process group exists, else None."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:
        pass
    return None


def _claim(message: str) -> bool:
    """Whether this rank is the first of its job to report a user error (it then leaves the message)."""
    store = _store()
    if store is not None:
        try:
            first = store.add(CLAIM_KEY, 1) == 1
            if first:
                store.set(MESSAGE_KEY, message)
            return first
        except Exception:  # the store is gone (its host exited): better printed twice than never
            return True
    path = os.path.join(tempfile.gettempdir(), f"lessons-user-error-{_job_key()}".replace(os.sep, "_"))
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return time.time() - os.path.getmtime(path) > 3600  # a stale claim of an old job with the same key
    except OSError:
        return True


def reported_by_another_rank() -> str | None:
    """The message another rank of this job reported, if one did (a collective then fails here as a result)."""
    store = _store()
    if store is None:
        return None
    try:
        if store.check([MESSAGE_KEY]):
            return store.get(MESSAGE_KEY).decode()
    except Exception:
        pass
    return None


def _several_ranks() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _write_torchelastic_error_file(message: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:  # torchrun's "message as a string" form: shown as the failure's traceback
            json.dump({"message": f"error: {message}", "timestamp": str(int(time.time()))}, f)
    except OSError:
        pass


def report(message: str) -> None:
    """Print ``error: <message>`` once for the whole job (see the module docstring)."""
    if _several_ranks():
        if os.environ["RANK"] != "0":
            time.sleep(RANK_0_HEAD_START)  # when every rank meets it, rank 0 speaks
        _write_torchelastic_error_file(message)  # every rank that fails names it to torchrun
        if not _claim(message):
            return
    print(f"error: {message}", file=sys.stderr, flush=True)


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run a tool's ``main(argv)``: its status, or 2 after one ``error:`` line for a user error.

    ``raise SystemExit("error: ...")`` (a message, not a number) counts as a user error too. A rank
    whose collective fails because another rank stopped at a user error exits quietly with status 2.
    """
    try:
        status = main() if argv is None else main(argv)
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
    return 0 if status is None else status
