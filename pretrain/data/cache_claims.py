"""Sharing one build folder between processes, ranks, jobs and nodes with nothing but files.

It owns the claims (a file created with O_EXCL says who works on what; its owner touches it while alive, and a claim
whose owner died is taken over), atomic writes (write a temporary file, then rename), and the error files through
which one process stops all the others with the same line. It must not know what is built: no tokenizing, no
numpy, no torch.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

HEARTBEAT_S = 5.0  # a live owner touches its claim this often
STALE_AFTER_S = 60.0  # a claim untouched this long is abandoned (an owner on another host that died)
HOST = socket.gethostname()


def atomic_write(path: Path, data: bytes | str) -> None:
    """Readers see the whole file or none of it."""
    temporary = path.with_name(f"{path.name}.tmp-{HOST}-{os.getpid()}-{threading.get_ident()}")
    with open(temporary, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    os.replace(temporary, path)


def _owner_is_dead(text: str) -> bool:
    """True when the claim names a process of this host that no longer runs (zombies count as dead)."""
    try:
        host, pid = text.rsplit(" ", 1)
        pid = int(pid)
    except ValueError:
        return False  # half-written: judged by its age
    if host != HOST:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def is_stale(claim: Path) -> bool:
    try:
        text = claim.read_text()
        age = time.time() - claim.stat().st_mtime
    except FileNotFoundError:
        return False
    return _owner_is_dead(text) or age > STALE_AFTER_S


def try_claim(claim: Path) -> bool:
    """Create `claim` for this process; a stale claim is first moved aside (one rename wins a race for it)."""
    for _ in range(2):
        try:
            descriptor = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not is_stale(claim):
                return False
            try:
                os.rename(claim, claim.with_name(f"{claim.name}.stale-{HOST}-{os.getpid()}"))
            except FileNotFoundError:
                pass  # another process took it over first; try once more
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{HOST} {os.getpid()}")
        return True
    return False


def is_claimed(claim: Path) -> bool:
    """A live claim: someone works on it now."""
    return claim.exists() and not is_stale(claim)


def release(claim: Path) -> None:
    try:
        claim.unlink()
    except FileNotFoundError:
        pass


class Heartbeat:
    """Touches the current claim from a thread while the owner works, so that others know it is alive."""

    def __init__(self):
        self.current: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            claim = self.current
            if claim is not None:
                try:
                    os.utime(claim)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()


def write_error(folder: Path, name: str, message: str) -> None:
    """Leave a one-line error for every process that watches `folder`."""
    try:
        atomic_write(folder / f"{name}.error", message)
    except OSError:
        pass  # the folder is gone: the build finished elsewhere


def first_error(folder: Path) -> str | None:
    """The message of the first error file in `folder` (in name order, so every reader picks the same)."""
    try:
        names = sorted(name for name in os.listdir(folder) if name.endswith(".error"))
    except FileNotFoundError:
        return None
    for name in names:
        try:
            return (folder / name).read_text().strip()
        except FileNotFoundError:
            continue
    return None


def main_reports_first(message: str, wait_s: float = 30.0) -> None:
    """Under a launch, hold a rank other than the machine's first until that one has met the same error (it
    leaves a mark in the temporary folder), so that the rank that prints the line is not killed before it does:
    with every rank building, any of them may meet a bad line first."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return
    import hashlib
    import tempfile

    digest = hashlib.sha256(message.encode()).hexdigest()[:16]
    mark = Path(tempfile.gettempdir()) / f"pretrain_loop_error-{digest}-{os.getppid()}"  # ppid: the launcher
    if os.environ.get("LOCAL_RANK", "0") == "0":
        try:
            mark.touch()
        except OSError:
            pass
        return
    deadline = time.time() + wait_s
    while not mark.exists() and time.time() < deadline:
        time.sleep(0.1)


def clear_errors(folder: Path) -> None:
    """Forget errors of an earlier attempt: a piece that failed is retried, and fails again if the input is bad."""
    for name in os.listdir(folder):
        if name.endswith(".error"):
            release(folder / name)
