"""The errors a user can fix: each carries one line naming the flag or file and what to do.

`train_loop.cli` and `data_utils` turn them into `error: <line>` and exit status 1 with `exit_with`.
This module owns the kinds of error and how their line reaches the screen; it raises none of them itself. It is the
base of the package: it imports nothing from the project (and not torch: tokenizing workers import it).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


class DataError(ValueError):
    """Bad input data: the message is one line that names the file or flag and says what to do."""


class UsageError(ValueError):
    """A bad flag or combination of flags: a one-line message naming the flag and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous complete one is untouched."""


class NonFiniteLoss(RuntimeError):
    """The loss or the weights stopped being finite; nothing was saved over the last good checkpoint."""


class Diverged(RuntimeError):
    """The loss stayed far above where training had brought it (docs/spikes.md); no final model was saved."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".:") if text else type(error).__name__


def cannot_load(flag: str, name: str, error: BaseException) -> str:
    """The one-line message for a tokenizer, config or model that a Hub name or path did not give."""
    return f"{flag} {name}: cannot be loaded ({first_line(error)}); check the name, the path or the network"


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (created if missing), or None when they can."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        return error.strerror or str(error)
    return None


def private_api(owner: object, name: str, package: str, tested: str, what: str) -> object:
    """`owner.name`, a private API we depend on, or one line naming the installed version when it has moved."""
    if hasattr(owner, name):
        return getattr(owner, name)
    raise UsageError(moved_api(package, tested, what))


def moved_api(package: str, tested: str, what: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version(package)
    except PackageNotFoundError:
        installed = "(not installed)"
    return (f"{what} needs a private API of {package} that {package} {installed} does not have (tested with "
            f"{tested}); pip install {package}=={tested}")


# Errors from the flags, the files and the main process's broadcast decisions, and the all-reduced loss.
SEEN_BY_EVERY_RANK = (UsageError, DataError, NonFiniteLoss, Diverged)


def exit_with(line: str, every_rank_has_it: bool) -> None:
    """Exit with status 1 and `line`, printed once per launch where every rank has the same line."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        sys.exit(line)  # printed by Python on the way out
    report_to_launcher(line, printer=not every_rank_has_it or int(os.environ.get("RANK", "0")) == 0)
    sys.exit(1)


def report_to_launcher(line: str, printer: bool) -> None:
    """Print `line` where `printer`, and under torch elastic (`accelerate launch`, `torchrun`) write it to the
    worker's error file too, so that the launcher's failure report names it as the root cause instead of "To enable
    traceback see ..."."""
    if printer:
        print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with open(error_file, "w") as handle:
            json.dump({"message": line, "timestamp": str(int(time.time()))}, handle)
    if not printer:
        time.sleep(2)  # the launcher kills the other workers once one exits: let the printer print first
