"""Checkpoint files written while training goes on (--save_in_background, under DeepSpeed ZeRO).

A save takes a snapshot: DeepSpeed hands each file's state dict to `SnapshotEngine.save` (its checkpoint-engine
interface), which copies the tensors into CPU memory (pinned when they live on a GPU) and returns. A writer thread
then writes the files as DeepSpeed's torch engine does (the same torch.save format), past the page cache where the
filesystem allows it, forces them to disk, and marks this rank's part written. The main process's writer waits for
every rank's mark and completes the checkpoint as a synchronous save does (trainer state, manifest, rename), so
resume sees it only when it is whole: a crash during the write resumes from the previous checkpoint.

The next save, a rewind and the end of the loop (a stop signal's too) wait for the write. Each snapshot is copied
into the buffers of the one before (StagingBuffers), so only the first save allocates. A snapshot that the free
memory cannot hold is written synchronously, with one line. One process and DDP always save synchronously:
Accelerate writes their files itself, with no engine to hand the state to, and theirs are the small runs.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import logging
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy
import psutil
import torch

from pretrain.base.errors import CheckpointError, first_line
from pretrain.base.faults import write_delay

logger = logging.getLogger("train_loop")

MEMORY_HEADROOM = 0.8  # of the available memory a snapshot may take, leaving the rest to the data loader and the OS
DIRECT_CHUNK = 64 << 20  # bytes gathered before each direct write (a multiple of every disk's block size)


def sync_to_disk(path: Path) -> None:
    """Force a written file (or a folder's entries) to the disk: a checkpoint is complete only once it is there."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class DirectFile(io.RawIOBase):
    """A file written with O_DIRECT, past the page cache, for torch.save: writing through the page cache and
    flushing it costs the CPU several times what the same bytes cost written directly (bench/README.md, "Saves in
    the background"), CPU that training needs. The bytes gather in an aligned buffer; the last, partial block is
    written padded and the file cut to its size. Raises OSError at once where the filesystem has no O_DIRECT."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
        self.buffer, self.used, self.size = mmap.mmap(-1, DIRECT_CHUNK), 0, 0
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        source = numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data  # read-only buffers too
        done = 0
        while done < len(view):
            take = min(len(view) - done, DIRECT_CHUNK - self.used)
            # A foreign call, which releases the GIL while it copies (a slice assignment would hold it, and stall
            # the training thread between its operations).
            ctypes.memmove(self.address + self.used, source + done, take)
            self.used, done = self.used + take, done + take
            if self.used == DIRECT_CHUNK:
                self.flush_buffer(DIRECT_CHUNK)
        return len(view)

    def flush_buffer(self, length: int) -> None:
        written = os.write(self.descriptor, memoryview(self.buffer)[:length])
        if written != length:
            raise OSError(f"wrote {written} of {length} bytes")
        self.size, self.used = self.size + min(self.used, length), 0

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.used:
                size = self.size + self.used
                self.flush_buffer(-(-self.used // 4096) * 4096)  # whole blocks, the padding cut off below
                os.ftruncate(self.descriptor, size)
            os.fsync(self.descriptor)
        finally:
            os.close(self.descriptor)
            super().close()


def write_state(engine, state: dict[str, Any], path: str) -> None:
    """One file of the snapshot, as DeepSpeed's torch engine writes it (the same torch.save format), directly to
    the disk where the filesystem allows it; any other engine writes it its own way. Forced to disk either way."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine) is TorchCheckpointEngine:
        try:
            target = DirectFile(path)
        except OSError:  # no O_DIRECT here (tmpfs, some network filesystems): through the page cache
            target = None
        if target is not None:
            with target:
                torch.save(state, target, _use_new_zipfile_serialization=engine.zipfile_serialization)
            return
    engine.save(state, path)
    sync_to_disk(Path(path))


def view_key(tensor: torch.Tensor) -> tuple:
    """What makes two tensor objects the same data: their storage and where and how they look into it."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def tensor_bytes(value: Any, seen: set | None = None) -> int:
    """The bytes of the tensors in a state dict, a view reached twice counted once (as a snapshot holds it)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        key = view_key(value)
        counted = key not in seen
        seen.add(key)
        return value.numel() * value.element_size() if counted else 0
    if isinstance(value, dict):
        return sum(tensor_bytes(item, seen) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item, seen) for item in value)
    return 0


class StagingBuffers:
    """The CPU tensors that snapshots are copied into, kept from one save for the next. A copy into memory touched
    before runs at memory speed; into a fresh allocation it first takes every page from the operating system, 4 KiB
    at a time, which made the copy several times slower and most of the time a save held training (bench/README.md,
    "Saves in the background"); pinned memory on a GPU machine is slower still to allocate. The price: a snapshot's
    size stays allocated between saves."""

    def __init__(self) -> None:
        self.spare: dict[tuple, list[torch.Tensor]] = {}  # by (shape, dtype, pinned): the last snapshot's buffers
        self.in_use: list[torch.Tensor] = []  # this snapshot's, until its write is done

    def take(self, shape: torch.Size, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        spare = self.spare.get((tuple(shape), dtype, pinned))
        buffer = spare.pop() if spare else torch.empty(shape, dtype=dtype, pin_memory=pinned)
        self.in_use.append(buffer)
        return buffer

    def spare_bytes(self) -> int:
        return tensor_bytes(self.spare)

    def written(self) -> None:
        """The snapshot is on disk: its buffers serve the next one; spares it did not use (another shape) go."""
        self.spare = {}
        for buffer in self.in_use:
            self.spare.setdefault((tuple(buffer.shape), buffer.dtype, buffer.is_pinned()), []).append(buffer)
        self.in_use = []


def snapshot(value: Any, memo: dict[Any, Any], staging: StagingBuffers) -> Any:
    """A copy of a state dict that training cannot change: tensors copied to CPU memory (a view only as large as
    itself; the same view reached twice, as a tied weight is, copied once, as torch.save stores it once),
    containers rebuilt, the rest deep-copied."""
    key = view_key(value) if isinstance(value, torch.Tensor) else id(value)
    if key in memo:
        return memo[key]
    if isinstance(value, torch.Tensor):
        copied = staging.take(value.shape, value.dtype, pinned=value.is_cuda)
        copied.copy_(value.detach(), non_blocking=value.is_cuda)
    elif isinstance(value, dict):
        copied = type(value)((key, snapshot(item, memo, staging)) for key, item in value.items())
    elif type(value) in (list, tuple):  # a namedtuple is deep-copied whole below
        copied = type(value)(snapshot(item, memo, staging) for item in value)
    else:
        copied = copy.deepcopy(value)
    memo[key] = copied
    return copied


class SnapshotEngine:
    """Stands in for the DeepSpeed engine's checkpoint engine during a save: `save` keeps a snapshot for the writer
    instead of writing. Everything else goes to DeepSpeed's engine."""

    def __init__(self, writer: "CheckpointWriter", engine) -> None:
        self.writer, self.engine = writer, engine

    def save(self, state_dict: dict[str, Any], path: str) -> None:
        self.writer.take(state_dict, path)

    def preserves_storage_sharing(self) -> bool:
        return False  # the snapshot copies each tensor on its own: DeepSpeed need not clone them first

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class CheckpointWriter:
    """Writes a save's files now, or from its snapshot in the background; `wait()` returns once the last save is
    complete on disk (and, on the main process, renamed into place)."""

    def __init__(self, accelerator, model, background: bool) -> None:
        self.accelerator = accelerator
        self.engine = model if background and accelerator.state.deepspeed_plugin is not None else None
        self.original = None  # DeepSpeed's checkpoint engine, which writes the files
        self.files: list[tuple[Any, str]] = []  # this save's snapshots and their paths
        self.files_bytes = 0  # their tensors' bytes
        self.staging = StagingBuffers()
        self.thread: threading.Thread | None = None
        self.error: CheckpointError | None = None
        self.too_big_said = False

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self.wait()
        except CheckpointError as failed:
            if error is None:
                raise
            logger.error(f"{failed}")  # the run already fails with another error: say this one too, do not hide that

    @property
    def background(self) -> bool:
        return self.engine is not None

    @contextlib.contextmanager
    def snapshots(self) -> Iterator[None]:
        """Around `accelerator.save_state`: DeepSpeed's files become snapshots, written later by `finish`."""
        if not self.background:
            yield
            return
        self.original = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = SnapshotEngine(self, self.original)
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.engine.checkpoint_engine = self.original
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies to pinned memory have landed
        if self.files and self.accelerator.is_main_process:
            logger.info(f"snapshot of {self.files_bytes / 1e9:.2f} GB (this process's part) taken in "
                        f"{time.perf_counter() - begin:.2f} s; writing it in the background")

    def take(self, state_dict: dict[str, Any], path: str) -> None:
        size, available = tensor_bytes(state_dict), psutil.virtual_memory().available
        if size - self.staging.spare_bytes() > MEMORY_HEADROOM * available:
            if not self.too_big_said:
                logger.warning(f"the snapshot of {Path(path).name} ({size / 1e9:.2f} GB) does not fit in the free "
                               f"memory ({available / 1e9:.2f} GB): saved synchronously")
                self.too_big_said = True
            self.original.save(state_dict, path)
            return
        self.files.append((snapshot(state_dict, {}, self.staging), path))
        self.files_bytes += size

    def finish(self, step: int, temporary: Path, complete: Callable[[], None]) -> None:
        """After `save_state`: write this rank's snapshots and mark them written; the main process then waits for
        every rank's mark and calls `complete` (the manifest and the rename). Synchronous saves do the same with
        barriers, before returning."""
        if not self.background:
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                complete()
            self.accelerator.wait_for_everyone()
            return
        files, self.files, self.files_bytes = self.files, [], 0
        rank, ranks = self.accelerator.process_index, self.accelerator.num_processes
        main = self.accelerator.is_main_process
        self.thread = threading.Thread(target=self.write, args=(files, step, temporary, rank, ranks, main, complete),
                                       name="checkpoint-writer", daemon=True)  # a crash abandons the write
        self.thread.start()

    def write(self, files: list[tuple[Any, str]], step: int, temporary: Path, rank: int, ranks: int, main: bool,
              complete: Callable[[], None]) -> None:
        begin = time.perf_counter()
        try:
            time.sleep(write_delay(step, rank))  # only under PRETRAIN_FAULT=slow_write (pretrain/base/faults.py)
            for state, path in files:
                write_state(self.original, state, path)
            (temporary / f".written-rank{rank}").touch()
            if main:
                marks = [temporary / f".written-rank{other}" for other in range(ranks)]
                while not all(mark.exists() or (temporary / f".failed-rank{i}").exists()
                              for i, mark in enumerate(marks)):
                    time.sleep(0.05)
                failed = sorted(p.read_text() for p in temporary.glob(".failed-rank*"))
                if failed:
                    raise OSError(failed[0])
                for mark in marks:
                    mark.unlink()
                complete()
                logger.info(f"written in the background in {time.perf_counter() - begin:.1f} s")
        except Exception as error:  # kept for wait(), which raises it in the training thread
            with contextlib.suppress(OSError):
                (temporary / f".failed-rank{rank}").write_text(f"rank {rank}: {first_line(error)}")
            self.error = CheckpointError(f"--output_dir {temporary.parent}: writing {temporary.name} in the "
                                         f"background failed ({first_line(error)}); free space or fix the folder, "
                                         f"then rerun the same command: it resumes from the newest complete "
                                         f"checkpoint")

    def wait_everywhere(self) -> None:
        """wait() on every rank, then a barrier: every rank then sees the last checkpoint renamed into place."""
        self.wait()
        self.accelerator.wait_for_everyone()

    def wait(self, last: bool = False) -> None:
        """Until the last save is written (and complete, on the main process); raises what its write raised.
        `last`: no save follows, so the memory kept for the next snapshot goes back."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            self.staging.written()
        if last:
            self.staging = StagingBuffers()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
