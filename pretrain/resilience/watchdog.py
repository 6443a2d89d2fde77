"""The watchdog: a thread in every process that ends, with one line, a launch that can no longer train.

- A lost rank. Every rank adds one to its own counter in the launch's key-value store (the TCPStore at MASTER_ADDR,
  which torch elastic serves from node 0) each second, and rank 0 reads them all. A counter that has not moved for
  --heartbeat_timeout seconds, or for a few seconds once a collective has failed, is a rank gone: rank 0 posts the
  verdict, each node's first process prints it, and every process exits with status 1. When the store itself is gone,
  node 0 went away. Gloo notices a dead peer at the next collective, NCCL only at its timeout: both end here.
- A hang. When no optimizer step has finished for max(--hang_timeout, 10 x the median step) seconds, not counting
  evaluations, saves and rewinds (`paused`) nor the time before the first step (the data build, compilation), each
  rank writes every thread's Python stack to output_dir/hang-rank<N>.txt, and the run stops with one line naming them.

It owns noticing and ending; the loop tells it of finished steps (`step_done`) and of long waits that are no hang.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import statistics
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import first_line, report_to_launcher
from pretrain.base.faults import launch_attempt
from pretrain.checkpointing.checkpoints import checkpoint_damage, list_checkpoints
from pretrain.distributed.restarts import attempt_store, what_follows

logger = logging.getLogger("train_loop")

BEAT_S = 1.0  # how often each rank adds to its counter, and rank 0 reads them
AFTER_A_FAILED_COLLECTIVE_S = 3.0  # a collective already failed: a counter still this long is a rank gone
HANG_MULTIPLE = 10  # of the median step
FIRST_STEP_AFTER_A_RESTART_S = 60.0  # see Watchdog.__init__
FILES_WAIT_S = 5.0  # rank 0 waits this long for the other ranks' stack files before saying where they are
PREFIX = "pretrain_watchdog/"


class Watchdog:
    def __init__(self, args: TrainArguments, rank: int, world_size: int, local_rank: int):
        self.output_dir = Path(args.output_dir)
        self.hang_timeout, self.rank, self.world_size = args.hang_timeout, rank, world_size
        self.prints = local_rank == 0  # each node's first process says why the run ended
        self.ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        self.heartbeat_timeout = args.heartbeat_timeout if world_size > 1 else 0
        self.store = connect_to_store() if self.heartbeat_timeout > 0 else None
        self.step = 0
        # After a restart the first step is watched too, from the loop's start, with FIRST_STEP_AFTER_A_RESTART_S
        # more for what the attempt before had built (compiled graphs, DeepSpeed's set-up): a fault that comes back
        # in that step would otherwise hold every attempt until --ddp_timeout.
        self.first_step_grace_s = FIRST_STEP_AFTER_A_RESTART_S if launch_attempt() > 0 else 0.0
        # when the last step finished (or a pause ended); None before one, unless after a restart
        self.last_progress: float | None = time.monotonic() if self.first_step_grace_s else None
        self.step_seconds: deque[float] = deque(maxlen=101)
        self.pauses = 0
        self.collective_failed = threading.Event()
        self.stopped = threading.Event()
        if self.store is not None:
            self.store.add(f"{PREFIX}beat/{rank}", 1)
        self.thread = threading.Thread(target=self._watch, name="pretrain-watchdog", daemon=True)
        self.thread.start()

    # ---- what the loop tells it ----

    def step_done(self, step: int) -> None:
        now = time.monotonic()
        if self.last_progress is not None and not self.first_step_grace_s:
            self.step_seconds.append(now - self.last_progress)
        self.step, self.last_progress, self.first_step_grace_s = step, now, 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """An evaluation, a save or a rewind: however long it takes, it is no hang."""
        self.pauses += 1
        try:
            yield
        finally:
            self.pauses -= 1
            if self.last_progress is not None:
                self.last_progress = time.monotonic()

    def explain_failure(self, error: BaseException) -> None:
        """The loop raised: when a rank is gone, this never returns (the watchdog ends the process with its line
        and the traceback goes to a file); otherwise the error goes on as it came."""
        if self.store is None:
            return
        (self.output_dir / f"error-rank{self.rank}.txt").write_text("".join(traceback.format_exception(error)))
        self.collective_failed.set()
        time.sleep(AFTER_A_FAILED_COLLECTIVE_S + 3 * BEAT_S)

    def stop(self) -> None:
        self.stopped.set()

    # ---- the thread ----

    def _watch(self) -> None:
        moved: dict[int, tuple[int, float]] = {}  # rank 0: each rank's counter, and when it last changed
        while not self.stopped.wait(BEAT_S):
            if self.store is not None:
                try:
                    self._beat(moved)
                except Exception as error:  # the store is served from node 0: it is gone with it
                    if self.rank == 0 or self.stopped.is_set():
                        self.store = None
                        continue
                    self._end(f"node 0 (rank 0, which serves the launch's store) went away ({first_line(error)})")
            self._check_progress()

    def _beat(self, moved: dict[int, tuple[int, float]]) -> None:
        self.store.add(f"{PREFIX}beat/{self.rank}", 1)
        if self.rank != 0:
            if self.store.check([f"{PREFIX}verdict"]):
                self._end(self.store.get(f"{PREFIX}verdict").decode())
            return
        now = time.monotonic()
        if moved and now - max(seen for _, seen in moved.values()) > 3 * BEAT_S:
            moved.clear()  # this thread itself was held up: judge nobody on that
        for rank in range(self.world_size):
            count = self.store.add(f"{PREFIX}beat/{rank}", 0)  # adding 0 reads a counter that may not exist yet
            if moved.get(rank, (None, 0.0))[0] != count:
                moved[rank] = (count, now)
        limit = AFTER_A_FAILED_COLLECTIVE_S if self.collective_failed.is_set() else self.heartbeat_timeout
        gone = [rank for rank, (_, seen) in moved.items() if now - seen > limit]
        if gone:
            verdict = (f"rank {gone[0]} (node {gone[0] // self.ranks_per_node}) went away"
                       + (f", and {len(gone) - 1} more" if len(gone) > 1 else ""))
            self.store.set(f"{PREFIX}verdict", verdict)
            self._end(verdict)

    def limit_s(self) -> float:
        """The hang limit: --hang_timeout, or 10 x the median step when that is longer."""
        median = statistics.median(self.step_seconds) if self.step_seconds else 0.0
        return max(self.hang_timeout, HANG_MULTIPLE * median) + self.first_step_grace_s

    def _check_progress(self) -> None:
        # Once a collective has failed, a peer is gone: the heartbeats name it within seconds; it is no hang.
        if not self.hang_timeout or self.pauses or self.last_progress is None or self.collective_failed.is_set():
            return
        waited, limit = time.monotonic() - self.last_progress, self.limit_s()
        if waited <= limit:
            return
        stacks = self.output_dir / f"hang-rank{self.rank}.txt"
        with open(stacks, "w") as handle:
            handle.write(f"rank {self.rank}: no optimizer step finished for {waited:.1f} s {self.since()} "
                         f"(limit {limit:.1f} s); every thread's Python stack:\n")
            handle.flush()
            faulthandler.dump_traceback(handle, all_threads=True)
        if self.rank == 0:
            deadline = time.monotonic() + FILES_WAIT_S
            while time.monotonic() < deadline and not all(
                    (self.output_dir / f"hang-rank{rank}.txt").exists() for rank in range(self.world_size)):
                time.sleep(0.1)
        files = f"hang-rank{{0..{self.world_size - 1}}}.txt" if self.world_size > 1 else "hang-rank0.txt"
        self._end(f"no optimizer step finished for {waited:.1f} s {self.since()} (limit {limit:.1f} s, "
                  f"--hang_timeout): every rank's Python stack is in {self.output_dir / files}", hang=True)

    def since(self) -> str:
        return "since the restarted loop began" if self.first_step_grace_s else f"after step {self.step}"

    def _end(self, what: str, hang: bool = False) -> None:
        """Say why the run ends (each node's first process; rank 0 alone for a hang) and end this process."""
        newest = next((str(path) for path in reversed(list_checkpoints(self.output_dir))
                       if checkpoint_damage(path) is None), None)
        where = f"the newest complete checkpoint is {newest}" if newest else "there is no complete checkpoint yet"
        line = f"error: {what}{'' if hang else f' at step {self.step + 1}'}; {where}: {what_follows()}"
        printer = self.rank == 0 if hang else self.prints
        report_to_launcher(line, printer)
        os._exit(1)


def connect_to_store():
    """A client of its own to the launch's store, on this attempt's keys (distributed.restarts), with a short timeout:
    the default store's is the collectives' (--ddp_timeout), far too long to notice a lost node by."""
    if "MASTER_ADDR" not in os.environ:
        return None
    try:
        return attempt_store(timedelta(seconds=10))
    except Exception as error:  # a launcher whose store is elsewhere: train on, without this check
        logger.warning(f"no heartbeats: the launch's store at MASTER_ADDR:MASTER_PORT cannot be reached "
                       f"({first_line(error)}); a lost node is noticed only at --ddp_timeout")
        return None
