"""The errors a user can fix: each carries one line naming the flag or file and what to do.

`train_loop.cli` turns them (and `data_utils.DataError`) into `error: <line>` and exit status 1. This module
owns the kinds of error only; it raises nothing itself.
"""


class UsageError(ValueError):
    """A bad flag or combination of flags: a one-line message naming the flag and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous complete one is untouched."""


class NonFiniteLoss(RuntimeError):
    """The loss or the weights stopped being finite; nothing was saved over the last good checkpoint."""
