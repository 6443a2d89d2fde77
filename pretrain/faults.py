"""The fault-injection hook, for tests and for trying the loop's defences by hand: off unless PRETRAIN_FAULT is set.

    PRETRAIN_FAULT="KIND@WHEN[,KIND@WHEN...]"

KIND is what goes wrong:
  spike     the loss is multiplied by 1000 before backward (a loss and gradient spike)
  nan_loss  the loss is NaN (so is every gradient)
  nan_grad  one gradient (the input embedding's) is NaN, the loss stays finite
WHEN is when: `step=K` or `step=K-L` (optimizer steps as logged, from 1), or `batch=K` / `batch=K-L` (the global
batches of the data order, from 1: what a poisoned stretch of the corpus would do, which a rewind skips past).

It only multiplies what it is told to; it never runs unless the variable is set.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from pretrain.errors import UsageError
from pretrain.state import TrainState

KINDS = ("spike", "nan_loss", "nan_grad")
SPIKE_FACTOR = 1000.0
SPEC = re.compile(r"^(\w+)@(step|batch)=(\d+)(?:-(\d+))?$")


@dataclass
class Fault:
    kind: str
    counted_in: str  # "step" or "batch"
    first: int
    last: int


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = SPEC.match(item)
        if not match or match.group(1) not in KINDS:
            raise UsageError(f"PRETRAIN_FAULT: '{item}' is not KIND@step=K[-L] or KIND@batch=K[-L] with KIND one of "
                             f"{', '.join(KINDS)}; unset it for a normal run")
        kind, counted_in, first, last = match.groups()
        faults.append(Fault(kind, counted_in, int(first), int(last or first)))
    return faults


class FaultInjector:
    """Applies PRETRAIN_FAULT to each micro-batch's loss (and, for nan_grad, to one gradient) of the steps it names."""

    def __init__(self, model):
        self.faults = parse_faults(os.environ.get("PRETRAIN_FAULT", ""))
        self.now: set[str] = set()  # the kinds that apply to the step under way
        if any(fault.kind == "nan_grad" for fault in self.faults):
            model.get_input_embeddings().weight.register_hook(
                lambda grad: grad * float("nan") if "nan_grad" in self.now else grad)

    def loss(self, loss: torch.Tensor, state: TrainState) -> torch.Tensor:
        """The micro-batch's loss, changed as the fault of the step under way says."""
        if not self.faults:
            return loss
        where = {"step": state.step + 1, "batch": state.position() // state.global_batch_blocks + 1}
        self.now = {fault.kind for fault in self.faults if fault.first <= where[fault.counted_in] <= fault.last}
        if "spike" in self.now:
            loss = loss * SPIKE_FACTOR
        if "nan_loss" in self.now:
            loss = loss * float("nan")
        return loss
