"""One run per output_dir: the main process holds <output_dir>/run.lock for the whole run.

The lock is an advisory `flock` on that file, released when the run ends and by the kernel when its holder dies
(SIGKILL and out-of-memory kills included), so a lock left behind by a dead run is simply taken over, with a
warning. The file also records the holder's host, pid and start time, which a refused second run names, and its
launcher's pid: an attempt that torch elastic restarted (--max_restarts) takes over its own launch's lock without a
warning, and waits a little for it while the attempt before is still going away (a process forked from its holder
holds the lock until it ends too). It owns that lock only; it must not touch checkpoints or metrics.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from pretrain.base.errors import UsageError
from pretrain.base.faults import launch_attempt

logger = logging.getLogger("train_loop")
LOCK_FILE = "run.lock"
RESTART_WAIT_S = 30.0  # a restart waits this long for the lock of the attempt before (torch elastic's kill grace)


@contextlib.contextmanager
def hold_output_dir(accelerator, output_dir: str) -> Iterator[None]:
    """Hold the lock on the main process for the block; every rank stops with the same line if it is taken."""
    from accelerate.utils import broadcast_object_list

    path, fd = Path(output_dir) / LOCK_FILE, None
    refusal: list[UsageError | None] = [None]
    if accelerator.is_main_process:
        try:
            fd = _acquire(path)
        except UsageError as error:
            refusal = [error]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise refusal[0]
    try:
        yield
    finally:
        if fd is not None:
            _release(path, fd)


def _acquire(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + RESTART_WAIT_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, earlier_attempt = _read_holder(fd), _same_launch(_record(fd))
            os.close(fd)
            if earlier_attempt and time.monotonic() < deadline:
                time.sleep(0.2)  # the attempt before this restart is still going away
                continue
            raise UsageError(f"--output_dir {path.parent}: another run is using it ({holder}); wait for it to end, "
                             f"or choose another --output_dir") from None
        if path.exists() and os.fstat(fd).st_ino == os.stat(path).st_ino:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    previous = _read_holder(fd)
    if previous != "holder unknown" and not _same_launch(_record(fd)):
        logger.warning(f"--output_dir {path.parent}: taking over the lock of a run that is gone ({previous})")
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "launcher": os.getppid()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def _record(fd: int) -> dict:
    """The holder's record; {} when unreadable."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _same_launch(record: dict) -> bool:
    """Whether the record is of an earlier attempt of this very launch: restarted by the same launcher, on this host."""
    return launch_attempt() > 0 and record.get("host") == socket.gethostname() and \
        record.get("launcher") == os.getppid()


def _read_holder(fd: int) -> str:
    record = _record(fd)
    try:
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except KeyError:
        return "holder unknown"


def _release(path: Path, fd: int) -> None:
    try:
        path.unlink()  # while still locked, so that no other run can lock the inode that is going away
    except FileNotFoundError:
        pass
    os.close(fd)
