"""Steps that would hurt the run are not taken, and repeated trouble is rewound past, with no person at hand.

A step whose global-batch loss or gradient norm is more than --spike_sigma standard deviations above the mean of
the last --spike_window steps (OLMo-core's SkipStepOptimizer rule), or is not finite, is skipped: weights,
optimizer moments and the optimizer's step count stay as they were. --rewind_after_skips skips in a row reload the
newest checkpoint from before them (PaLM's answer to spikes) and move the data --rewind_margin_steps global batches
past the stretch read since then. Trouble again within --spike_window steps of a rewind stops the run in one line,
and so does a loss that stays above both a uniform guess and twice the run's lowest for --divergence_steps steps.

Every rank decides alike from the same numbers: the loss is all-reduced once per optimizer step, and the gradient
norm is the reduced one (clip_grad_norm_'s, or the one DeepSpeed computes inside its step before the update, where
this module hooks in). It owns the decision and the rewind; the loop asks and logs.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import Diverged, NonFiniteLoss, private_api
from pretrain.base.state import TrainState
from pretrain.checkpointing.checkpoints import TRAINER_STATE, checkpoint_damage, checkpoint_step, list_checkpoints, \
    remove_checkpoint
from pretrain.distributed.launch import deepspeed_config

logger = logging.getLogger("train_loop")
DEEPSPEED_TESTED = "0.19.8"


def fresh_records() -> dict[str, Any]:
    """What the guard keeps in the checkpoint (TrainState.guard): the rolling windows, the counts and the rewinds,
    and for the divergence verdict the lowest step loss and the steps in a row above the line."""
    return {"losses": [], "norms": [], "skipped_steps": 0, "in_a_row": 0, "rewinds": [], "lowest_loss": None,
            "above": 0}


class StepGuard:
    """Decides, once per optimizer step and before its update, whether the step is applied."""

    def __init__(self, accelerator, optimizer, args: TrainArguments, state: TrainState, vocab_size: int):
        self.enabled = args.skip_bad_steps
        self.divergence_steps, self.vocab_size = args.divergence_steps, vocab_size
        self.sigma, self.window = args.spike_sigma, args.spike_window
        self.accelerator = accelerator
        state.guard = {**fresh_records(), **(state.guard or {})}  # a checkpoint from before a record was added
        self.records = state.guard
        self.step_loss = torch.zeros((), device=accelerator.device)
        self.micro_steps = 0
        self.loss: float | None = None  # the global-batch loss of the step under way
        self.skipped: str | None = None  # why the step under way was skipped
        self.inside_engine = self.enabled and deepspeed_config(accelerator) is not None
        if self.inside_engine:
            # Under ZeRO-2's Muon, DeepSpeed's norm covers the orthogonalized updates, no gradient: the loss decides
            decide_inside_deepspeed(optimizer.optimizer, self, norm_is_the_gradients=args.optim != "muon")

    def add_loss(self, loss: torch.Tensor, last: bool) -> None:
        """A micro-batch's loss; at the step's last one, the global-batch loss (one all-reduce per step)."""
        if not self.enabled and not self.divergence_steps:
            return
        self.step_loss += loss.detach()
        self.micro_steps += 1
        if last:
            self.loss = self.accelerator.reduce(self.step_loss / self.micro_steps, reduction="mean").item()
            self.step_loss.zero_()
            self.micro_steps = 0
            self.skipped = None

    def skips(self, grad_norm) -> bool:
        """Whether the step under way is skipped: decided here from the loss and the clipped gradients' norm, or
        under DeepSpeed already inside its step (grad_norm None)."""
        if not self.enabled:
            return False
        if not self.inside_engine:
            self.judge(None if grad_norm is None else float(grad_norm))
        return self.skipped is not None

    def judge(self, grad_norm: float | None) -> bool:
        """Decide the step from its loss and gradient norm, and count it; True when it is skipped. Every finite value
        joins the window, a skipped step's too, as in OLMo-core: a change of level (the one-process demo's gradient
        norm, 0.9 to 7-9 at step 199) is absorbed within a few steps, where a window of applied steps alone skipped
        every step after it until a rewind threw away data that was fine."""
        self.skipped = self.why_skip(self.loss, grad_norm)
        for name, value in (("losses", self.loss), ("norms", grad_norm)):
            if value is not None and math.isfinite(value):
                self.records[name] = (self.records[name] + [value])[-self.window:]
        if self.skipped is None:
            self.records["in_a_row"] = 0
        else:
            self.records["skipped_steps"] += 1
            self.records["in_a_row"] += 1
        return self.skipped is not None

    def why_skip(self, loss: float | None, grad_norm: float | None) -> str | None:
        for name, value, history in (("loss", loss, self.records["losses"]),
                                     ("gradient norm", grad_norm, self.records["norms"])):
            if value is None:
                continue
            if not math.isfinite(value):
                return f"{name} {value}"
            if self.sigma > 0 and len(history) >= max(2, self.window // 2):
                mean, std = statistics.fmean(history), statistics.stdev(history)
                if value > mean + self.sigma * std:
                    return (f"{name} {value:.4g} is {(value - mean) / max(std, 1e-12):.0f} sigma above the mean of "
                            f"the last {len(history)} steps ({mean:.4g})")
        return None

    def say_skipped(self, state: TrainState, metrics) -> None:
        """One line and one metrics record for a skipped step."""
        if self.accelerator.is_main_process:
            logger.warning(f"step {state.step} skipped ({self.skipped}): weights and optimizer state unchanged; "
                           f"{self.records['in_a_row']} in a row, {self.records['skipped_steps']} in the run")
        metrics.log({"step": state.step, "event": "skipped", "why": self.skipped,
                     "skipped_steps": self.records["skipped_steps"]})

    def stop_if_diverged(self, accelerator, args: TrainArguments, step: int, lr: float, metrics, writer) -> None:
        """Count the step's loss against the line (a uniform guess over the vocabulary, or twice the run's lowest
        loss when higher); after --divergence_steps steps in a row above it, stop the run in one line, as every rank
        does alike from the same all-reduced loss, and delete the checkpoints saved since the stretch began."""
        if not self.divergence_steps or self.loss is None:
            return
        records, loss = self.records, self.loss
        if math.isfinite(loss) and (records["lowest_loss"] is None or loss < records["lowest_loss"]):
            records["lowest_loss"] = loss
        uniform = math.log(self.vocab_size)
        line = max(uniform, 2 * (records["lowest_loss"] or 0.0))
        records["above"] = records["above"] + 1 if loss > line else 0  # NaN: the non-finite checks' to stop
        if records["above"] < self.divergence_steps:
            return
        first = step - records["above"] + 1
        metrics.log({"step": step, "event": "diverged", "step_loss": loss, "line": line, "lr": lr,
                     "since_step": first})
        writer.wait_everywhere()  # a checkpoint of the stretch may still be being written
        forget_checkpoints_after(accelerator, args, first - 1)
        raise Diverged(f"the run diverged: its loss stayed above {line:.4g} (a uniform guess over {self.vocab_size:,} "
                       f"tokens scores {uniform:.4g}, the run's lowest was {records['lowest_loss']:.4g}) over steps "
                       f"{first}-{step}, and was {loss:.4g} at step {step} at learning rate {lr:.3g}; lower "
                       f"--learning_rate or raise --warmup_steps, and run again (checkpoints from step {first} on "
                       f"were deleted)")

    def needs_rewind(self, args: TrainArguments) -> bool:
        return self.enabled and 0 < args.rewind_after_skips <= self.records["in_a_row"]


def decide_inside_deepspeed(zero_optimizer, guard: StepGuard, norm_is_the_gradients: bool = True) -> None:
    """Under DeepSpeed the update happens inside the engine's step. Its ZeRO optimizer computes the gradient norm,
    then calls `_update_scale(overflow)` and, on an overflow, clears the gradients and returns before any update
    (the fp16 overflow path, which leaves weights, moments and the optimizer's step count untouched). The guard
    judges there and turns a bad step into such an overflow; the loss scaler still sees only a real overflow."""
    update_scale = private_api(zero_optimizer, "_update_scale", "deepspeed", DEEPSPEED_TESTED, "skipping bad steps")
    norm_of = "scaled_global_norm" if hasattr(zero_optimizer, "scaled_global_norm") else "_get_norm_groups"
    compute_norm = private_api(zero_optimizer, norm_of, "deepspeed", DEEPSPEED_TESTED, "skipping bad steps")
    seen: dict[str, Any] = {}

    def norm_seen(*args, **kwargs):
        seen["norm"] = compute_norm(*args, **kwargs)
        return seen["norm"]

    def judged_update_scale(has_overflow: bool = False):
        update_scale(has_overflow)
        if has_overflow:
            norm = float("inf")  # a real overflow: DeepSpeed computed no norm
        else:
            norm = seen.pop("norm", None)
            if isinstance(norm, list):  # ZeRO-3: the norms of the parameter groups
                from deepspeed.runtime.utils import combine_grad_norm_groups
                norm = combine_grad_norm_groups(norm)
            norm = None if norm is None else float(norm) / zero_optimizer.loss_scale
            if not norm_is_the_gradients and math.isfinite(norm or 0.0):
                norm = None  # a non-finite norm still says a gradient was not finite
        if norm is not None and not math.isfinite(norm) and any_nan_gradient(zero_optimizer, guard.accelerator):
            norm = float("nan")  # DeepSpeed reports a NaN gradient as an infinite norm
        if guard.judge(norm):
            zero_optimizer.overflow = True  # DeepSpeed's own skip path from here on

    setattr(zero_optimizer, norm_of, norm_seen)
    zero_optimizer._update_scale = judged_update_scale
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.addFilter(not_deepspeeds_overflow_line)  # the guard's own line says it (added once)


def not_deepspeeds_overflow_line(record: logging.LogRecord) -> bool:
    """Drop DeepSpeed's "OVERFLOW! Skipping step" of a non-finite gradient in fp32 and bf16, beside the guard's
    "step N skipped (gradient norm nan)". fp16's line, which also says how the loss scale changes, stays."""
    return "OVERFLOW! Skipping step. Gradients are non-finite" not in record.getMessage()


def any_nan_gradient(zero_optimizer, accelerator) -> bool:
    """Whether a NaN is in any rank's gradient partition: DeepSpeed turns NaN and inf alike into an overflow and an
    infinite norm. Called on every rank, and only at a non-finite norm, which every rank sees alike."""
    parts = []
    for value in getattr(zero_optimizer, "averaged_gradients", {}).values():
        parts += value if isinstance(value, (list, tuple)) else [value]
    found = torch.tensor(float(any(part is not None and bool(part.isnan().any()) for part in parts)),
                         device=accelerator.device)
    return accelerator.reduce(found, reduction="sum").item() > 0


def rewind(accelerator, scheduler, state: TrainState, args: TrainArguments, guard: StepGuard, mixture=None) -> None:
    """Reload the newest checkpoint from before the skips in a row, keep the step count and the schedule where they
    are, and move the data position --rewind_margin_steps global batches further. Stops the run in one line when
    there is no such checkpoint, or when the last rewind was fewer than --spike_window steps ago."""
    records = guard.records
    first_bad = state.step - records["in_a_row"] + 1
    tried = f"steps {first_bad}-{state.step} were skipped (the last: {guard.skipped})"
    target = next((c for c in reversed(list_checkpoints(Path(args.output_dir)))
                   if checkpoint_step(c) < first_bad and checkpoint_damage(c) is None), None)
    if target is None:
        forget_checkpoints_after(accelerator, args, first_bad - 1)
        raise NonFiniteLoss(f"{tried}, and {args.output_dir} has no complete checkpoint from before step {first_bad} "
                            f"to rewind to; lower --learning_rate, or check the data the run read there")
    last = records["rewinds"][-1] if records["rewinds"] else None
    if last and state.step - last["at_step"] <= guard.window:  # within a window of the last rewind: it came back
        forget_checkpoints_after(accelerator, args, checkpoint_step(Path(last["checkpoint"])))
        raise NonFiniteLoss(f"{tried}, after a rewind at step {last['at_step']} to {last['checkpoint']} that skipped "
                            f"blocks {last['from_block']}-{last['to_block']}: the trouble came back; lower "
                            f"--learning_rate, or check the data from block {last['from_block']} on")
    saved = TrainState(**json.loads((target / TRAINER_STATE).read_text()))
    schedule = scheduler.state_dict()
    accelerator.load_state(str(target))  # weights, optimizer and RNG as they were then
    scheduler.load_state_dict(schedule)  # the learning rate stays a function of the step count, which goes on
    start, end = saved.position(), state.skip_data(args.rewind_margin_steps)
    skipped = {"at_step": state.step, "checkpoint": target.name, "from_block": start, "to_block": end}
    if mixture is not None:
        before, after = mixture.reads(start), mixture.reads(end)
        skipped["sources"] = {name: after[name] - before[name] for name in mixture.names}
    records.update(losses=saved.guard["losses"] if saved.guard else [], in_a_row=0, above=0,
                   norms=saved.guard["norms"] if saved.guard else [])
    records["rewinds"].append(skipped)
    forget_checkpoints_after(accelerator, args, saved.step)
    if accelerator.is_main_process:
        by_source = f" ({', '.join(f'{n} {c}' for n, c in skipped['sources'].items())})" if mixture else ""
        logger.warning(f"rewind: {tried}; reloaded {target.name} (step {saved.step}) and skipped blocks "
                       f"{start}-{end} of the data order{by_source}, {args.rewind_margin_steps} global "
                       f"batch{'es' if args.rewind_margin_steps != 1 else ''} past the trouble; training goes on at "
                       f"step {state.step + 1}")


def forget_checkpoints_after(accelerator, args: TrainArguments, step: int) -> None:
    """Delete the checkpoints saved after `step`, during the trouble, so that no resume picks one: on a rewind, and
    on the stops when it came back or had no checkpoint to go back to."""
    if accelerator.is_main_process:
        for newer in list_checkpoints(Path(args.output_dir)):
            if checkpoint_step(newer) > step:
                remove_checkpoint(newer)
    accelerator.wait_for_everyone()
