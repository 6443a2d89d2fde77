"""The fault-injection hook, for tests and for trying the loop's defences by hand: off unless PRETRAIN_FAULT is set.

    PRETRAIN_FAULT="KIND@WHEN[@rank=R][@attempt=A][,KIND@WHEN...]"

KIND is what goes wrong:
  spike     the loss is multiplied by 1000 before backward (a loss and gradient spike)
  nan_loss  the loss is NaN (so is every gradient)
  nan_grad  one gradient (the input embedding's) is NaN, the loss stays finite
  hang      the process sleeps for an hour before its backward (a stuck filesystem, a deadlock), saying so first
  kill      the process sends itself SIGKILL before its backward (the out-of-memory killer), saying so first
  slow_write  the background write of the checkpoint saved at that step starts 5 s late (a slow disk: room to
            see training go on, or to kill the run mid-write)
  slow_compute  each micro-batch's forward takes 0.2 s longer (a throttled GPU, a busy host): a straggler that
            the all-reduce hides in every rank's step time
  slow_data   each micro-batch is read from the data loader 0.2 s late (a slow disk or loader worker): a straggler
            whose wait shows in its data wait
WHEN is when: `step=K` or `step=K-L` (optimizer steps as logged, from 1), or `batch=K` / `batch=K-L` (the global
batches of the data order, from 1: what a poisoned stretch of the corpus would do, which a rewind skips past).
`@rank=R` limits the fault to the process of global rank R (default: every rank). `@attempt=A` limits it to attempt A
of a launch with in-job restarts (`accelerate launch --max_restarts N`: 0 is the first, torch elastic's
TORCHELASTIC_RESTART_COUNT); by default it fires at every attempt that reaches its step, as a deterministic fault does.

It only multiplies what it is told to; it never runs unless the variable is set.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from pretrain.base.errors import UsageError
from pretrain.base.state import TrainState

logger = logging.getLogger("train_loop")

KINDS = ("spike", "nan_loss", "nan_grad", "hang", "kill", "slow_write", "slow_compute", "slow_data")
SPIKE_FACTOR = 1000.0
HANG_S = 3600.0
SLOW_WRITE_S = 5.0
SLOW_S = 0.2  # slow_compute and slow_data, per micro-batch: well above the straggler verdict's floor
SPEC = re.compile(r"^(\w+)@(step|batch)=(\d+)(?:-(\d+))?(?:@rank=(\d+))?(?:@attempt=(\d+))?$")


@dataclass
class Fault:
    kind: str
    counted_in: str  # "step" or "batch"
    first: int
    last: int
    rank: int | None  # None: every rank
    attempt: int | None = None  # None: every attempt of a launch that restarts its workers


def launch_attempt() -> int:
    """Which attempt of the launch this process belongs to: 0, or the restarts torch elastic has made so far."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def parse_faults(text: str, rank: int) -> list[Fault]:
    """The faults PRETRAIN_FAULT names for the process of this rank in this attempt."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = SPEC.match(item)
        if not match or match.group(1) not in KINDS:
            raise UsageError(f"PRETRAIN_FAULT: '{item}' is not KIND@step=K[-L] or KIND@batch=K[-L], optionally "
                             f"followed by @rank=R and @attempt=A, with KIND one of {', '.join(KINDS)}; unset it for "
                             f"a normal run")
        kind, counted_in, first, last, only_rank, only_attempt = match.groups()
        faults.append(Fault(kind, counted_in, int(first), int(last or first),
                            *(None if value is None else int(value) for value in (only_rank, only_attempt))))
    return [fault for fault in faults if fault.rank in (None, rank) and fault.attempt in (None, launch_attempt())]


class FaultInjector:
    """Applies PRETRAIN_FAULT to each micro-batch's loss (and, for nan_grad, to one gradient) and to the data
    loader's reads (slow_data) of the steps it names."""

    def __init__(self, model, rank: int = 0):
        self.faults = parse_faults(os.environ.get("PRETRAIN_FAULT", ""), rank)
        self.rank = rank
        self.now: set[str] = set()  # the kinds that apply to the step under way
        if any(fault.kind == "nan_grad" for fault in self.faults):
            model.get_input_embeddings().weight.register_hook(
                lambda grad: grad * float("nan") if "nan_grad" in self.now else grad)

    def loss(self, loss: torch.Tensor, state: TrainState) -> torch.Tensor:
        """The micro-batch's loss, changed as the fault of the step under way says."""
        if not self.faults:
            return loss
        self.now = self.kinds_now(state)
        if "spike" in self.now:
            loss = loss * SPIKE_FACTOR
        if "nan_loss" in self.now:
            loss = loss * float("nan")
        if "hang" in self.now:
            logger.warning(f"PRETRAIN_FAULT: rank {self.rank} hangs at step {state.step + 1}")
            time.sleep(HANG_S)
        if "kill" in self.now:
            logger.warning(f"PRETRAIN_FAULT: rank {self.rank} is killed (SIGKILL) at step {state.step + 1}")
            os.kill(os.getpid(), signal.SIGKILL)
        if "slow_compute" in self.now:
            time.sleep(SLOW_S)
        return loss

    def kinds_now(self, state: TrainState) -> set[str]:
        """The kinds that apply to the step under way (the one after state.step)."""
        where = {"step": state.step + 1, "batch": state.position() // state.global_batch_blocks + 1}
        return {fault.kind for fault in self.faults if fault.first <= where[fault.counted_in] <= fault.last}

    def slow_reads(self, batches: Iterator, state: TrainState) -> Iterator:
        """The loader's batches, each handed over SLOW_S late in the steps slow_data names; the batches themselves
        when it names none."""
        if not any(fault.kind == "slow_data" for fault in self.faults):
            return batches
        return self._late(batches, state)

    def _late(self, batches: Iterator, state: TrainState) -> Iterator:
        for batch in batches:
            if "slow_data" in self.kinds_now(state):
                time.sleep(SLOW_S)
            yield batch


def write_delay(step: int, rank: int) -> float:
    """Seconds the background write of checkpoint-`step` waits on this rank (slow_write), said first; usually 0."""
    if not any(f.kind == "slow_write" and f.first <= step <= f.last
               for f in parse_faults(os.environ.get("PRETRAIN_FAULT", ""), rank)):
        return 0.0
    logger.warning(f"PRETRAIN_FAULT: rank {rank} starts writing checkpoint-{step} {SLOW_WRITE_S:.0f} s late")
    return SLOW_WRITE_S

