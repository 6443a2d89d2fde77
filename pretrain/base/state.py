"""The run's state that a checkpoint carries besides the model, optimizer, schedule and RNG: the step, the place in the
data, the tokens seen, and the launch's layout that a resume is compared to.

Part of the package's base: it imports nothing from the project. It owns the arithmetic of one optimizer step's
progress; checkpoints.py writes and reads it, the loop advances it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    """Everything besides model/optimizer/schedule/RNG that a resumed run needs."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    swanlab_run_id: str | None = None
    num_processes: int = 1
    distributed_type: str = "NO"
    global_batch_blocks: int = 0
    train_blocks: int = 0
    zero_stage: int | None = None
    schedule: dict[str, Any] | None = None  # what shapes the learning rate: compared on resume
    lr: float = 0.0  # the learning rate of the last step taken
    mixture: dict[str, Any] | None = None  # --train_mixture: its sources, weights and where its blend started
    epoch_offset: float = 0.0  # added to the logged epoch: it never runs backwards when an epoch changes length
    guard: dict[str, Any] | None = None  # skipped steps and rewinds: rolling windows, counts, data skipped
    optim: str | None = None  # --optim; None in checkpoints from before the flag

    def advance(self, tokens: int, steps_per_epoch: int) -> bool:
        """Count one optimizer step of `tokens` tokens. Returns whether it ended an epoch; if so the state has already
        rolled over to the next one, so that a checkpoint saved now never points past its epoch's end."""
        self.step += 1
        self.tokens_seen += tokens
        self.step_in_epoch += 1
        if self.step_in_epoch < steps_per_epoch:
            return False
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return True

    def steps_per_epoch(self) -> int:
        """Global batches in one epoch of this launch's layout."""
        return self.train_blocks // self.global_batch_blocks

    def skip_data(self, steps: int) -> int:
        """Move the data position `steps` global batches on, without training on them; returns the new position."""
        self.epoch, self.step_in_epoch = divmod(self.epoch * self.steps_per_epoch() + self.step_in_epoch + steps,
                                                self.steps_per_epoch())
        return self.position()

    def position(self) -> int:
        """The blocks read so far in this launch's order of whole global batches: the place in a mixture's blend."""
        return (self.epoch * self.steps_per_epoch() + self.step_in_epoch) * self.global_batch_blocks

    def epochs_done(self) -> float:
        """Epochs trained so far, as a fraction (the logged `epoch`): the epochs of this launch's length, plus what
        earlier launches counted at theirs (a changed mixture or corpus changes the length; the count goes on)."""
        return self.epoch_offset + self.epoch + self.step_in_epoch / self.steps_per_epoch()
