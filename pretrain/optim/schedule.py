"""The learning-rate schedule: the warmup, transformers' schedulers by name or our WSD, what a resume compares, and
how a resume with another schedule takes it up at the checkpoint's step, or a branch continues its checkpoint's rate."""

from __future__ import annotations

import json
import math
from typing import Any

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import UsageError
from pretrain.optim.wsd import check_wsd_flags, wsd_scheduler, wsd_settings


def schedule_of(args: TrainArguments, total_steps: int, tokens_per_step: int) -> dict[str, Any]:
    """Everything that shapes the learning rate, resolved to steps: the scheduler is built from it, and a resume
    whose schedule differs from the checkpoint's takes this one up (take_up_schedule)."""
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    schedule = {"lr_scheduler_type": args.lr_scheduler_type, "learning_rate": args.learning_rate,
                "total_steps": total_steps, "warmup_steps": warmup, "lr_scheduler_kwargs": args.lr_scheduler_kwargs}
    if args.lr_scheduler_type == "wsd":  # only then: other schedules compare equal to checkpoints from before wsd
        schedule.update(wsd_settings(args, total_steps, warmup, tokens_per_step))
    return schedule


def build_scheduler(optimizer, schedule: dict[str, Any]):
    from transformers import get_scheduler

    if schedule["lr_scheduler_type"] == "wsd":
        return wsd_scheduler(optimizer, schedule)
    kwargs = json.loads(schedule["lr_scheduler_kwargs"]) if schedule["lr_scheduler_kwargs"] else {}
    if schedule["lr_scheduler_type"] == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", max(1, (schedule["total_steps"] - schedule["warmup_steps"]) // 10))
    try:
        return get_scheduler(schedule["lr_scheduler_type"], optimizer, num_warmup_steps=schedule["warmup_steps"],
                             num_training_steps=schedule["total_steps"], scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--lr_scheduler_type {schedule['lr_scheduler_type']} / --lr_scheduler_kwargs: "
                         f"{error}") from None


def check_schedule(args: TrainArguments) -> None:
    """Refuse a schedule that cannot be built before any work: WSD's flags, transformers' schedule (a missing or
    unknown --lr_scheduler_kwargs entry), built once over one parameter, and a WSD decay that does not fit in
    --max_steps with the warmup. The real one is built after the data, when the run's length is known: a length
    from epochs or tokens, or a decay in tokens, is checked only then."""
    import torch

    check_wsd_flags(args)
    if args.lr_scheduler_type == "wsd":
        if args.max_steps > 0 and args.decay_tokens is None:
            schedule_of(args, args.max_steps, tokens_per_step=1)
        return
    build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate),
                    schedule_of(args, total_steps=2, tokens_per_step=1))


def lambda_schedule(scheduler):
    """The LambdaLR inside Accelerate's wrapper, or None for a DeepSpeed config's own scheduler."""
    inner = getattr(scheduler, "scheduler", scheduler)
    return inner if hasattr(inner, "lr_lambdas") else None


def peak_rates(scheduler) -> list[float] | None:
    """This run's peak rate of each parameter group, read before a checkpoint's schedule state replaces them."""
    inner = lambda_schedule(scheduler)
    return None if inner is None else list(inner.base_lrs)


def take_up_schedule(scheduler, peaks: list[float]) -> float:
    """After a checkpoint's schedule state was loaded: this run's schedule evaluated at the checkpoint's step count.

    The load restored the checkpoint's peak rates (LambdaLR's base_lrs) and its step count, and the optimizer's
    state put the checkpoint's rate in every parameter group, which the next step would train at; the factors are
    this run's (a checkpoint keeps none). So the peaks go back to this run's, and every group gets this run's rate
    at the step, computed as LambdaLR computes it. Returns the rate the next step trains at."""
    inner = lambda_schedule(scheduler)
    inner.base_lrs = list(peaks)
    rates = [peak * factor(inner.last_epoch) for factor, peak in zip(inner.lr_lambdas, inner.base_lrs)]
    for group, peak, rate in zip(inner.optimizer.param_groups, peaks, rates):
        group["initial_lr"], group["lr"] = peak, rate
    return rates[0]


def continue_from(scheduler, rate: float) -> float | None:
    """Scale this run's schedule so that the next step trains at `rate`, the rate a branch's checkpoint had: the peak
    of every parameter group and its rate scale alike, so the schedule keeps its shape and its floor stays the same
    fraction of the peak. Returns the rate this run's schedule gave there when it differed (None when it was `rate`
    already, left untouched to the bit, or for a DeepSpeed config's own scheduler)."""
    inner = lambda_schedule(scheduler)
    own = inner.optimizer.param_groups[0]["lr"] if inner is not None else rate
    if own == rate or own == 0:
        return None
    inner.base_lrs = [peak * rate / own for peak in inner.base_lrs]
    for group, peak in zip(inner.optimizer.param_groups, inner.base_lrs):
        group["initial_lr"], group["lr"] = peak, group["lr"] * rate / own
    return own
