"""WSD (warmup, stable, decay): a linear warmup from 0, the peak rate held, then a decay over the run's last steps
to a floor, in one of three shapes. docs/schedules.md gives the closed form this module computes.

A constant rate with a cooldown at the end matches a cosine of the same length, and the run can be extended or
branched into a cooldown from any checkpoint of its stable phase (Hägele et al. 2024, who found 1-sqrt the best
cooldown shape; MiniCPM; OLMo-core's WSD; torchtitan's `decay_ratio`, `decay_type`, `min_lr_factor`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

from pretrain.base.arguments import DEFAULT_DECAY_RATIO, TrainArguments
from pretrain.base.errors import UsageError


def decay_shape(decay_type: str, progress: float) -> float:
    """The decay's factor from 1 (progress 0) to 0 (progress 1), before the floor is applied."""
    if decay_type == "linear":
        return 1.0 - progress
    if decay_type == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # 1-sqrt


def wsd_factor(step: int, *, warmup_steps: int, decay_start: int, decay_steps: int, decay_type: str,
               min_lr_ratio: float) -> float:
    """The learning rate after `step` optimizer steps, as a fraction of the peak."""
    if step < warmup_steps:
        return step / warmup_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay_shape(decay_type, progress)


def check_wsd_flags(args: TrainArguments) -> None:
    """--lr_scheduler_type wsd's own flags: one decay length, values in range, and only with wsd."""
    names = ("decay_ratio", "decay_steps", "decay_tokens", "decay_type", "min_lr_ratio")
    given = [f"--{name}" for name in names if getattr(args, name) is not None]
    lengths = [flag for flag in given if flag[2:] in names[:3]]
    if given and args.lr_scheduler_type != "wsd":
        raise UsageError(f"{given[0]} goes with --lr_scheduler_type wsd")
    checks = [
        (args.lr_scheduler_type == "wsd" and args.lr_scheduler_kwargs, "--lr_scheduler_kwargs does not apply to "
         "wsd: use --decay_ratio, --decay_steps or --decay_tokens, --decay_type and --min_lr_ratio"),
        (len(lengths) > 1, f"{' and '.join(lengths)}: give one length of the decay"),
        (args.decay_ratio is not None and not 0 < args.decay_ratio <= 1, "--decay_ratio must be in (0, 1]"),
        (any(n is not None and n < 1 for n in (args.decay_steps, args.decay_tokens)),
         "--decay_steps and --decay_tokens must be at least 1"),
        (args.min_lr_ratio is not None and not 0 <= args.min_lr_ratio < 1, "--min_lr_ratio must be in [0, 1)"),
    ]
    for failed, message in checks:
        if failed:
            raise UsageError(message)


def wsd_settings(args: TrainArguments, total_steps: int, warmup_steps: int, tokens_per_step: int) -> dict[str, Any]:
    """The decay's length in steps (from --decay_steps, --decay_tokens rounded up to whole steps, or --decay_ratio
    of the run rounded to the nearest step), its shape and floor; refused in one line when the warmup and the decay
    do not fit in the run."""
    if args.decay_steps is not None:
        decay_steps, given = args.decay_steps, f"--decay_steps {args.decay_steps}"
    elif args.decay_tokens is not None:
        decay_steps = -(-args.decay_tokens // tokens_per_step)
        given = f"--decay_tokens {args.decay_tokens} ({decay_steps} steps of {tokens_per_step} tokens)"
    else:
        ratio = DEFAULT_DECAY_RATIO if args.decay_ratio is None else args.decay_ratio
        decay_steps = max(1, round(ratio * total_steps))
        given = f"--decay_ratio {ratio} ({decay_steps} steps)"
    if warmup_steps + decay_steps > total_steps:
        raise UsageError(f"{given}: the decay and the warmup ({warmup_steps} steps) do not fit in the run's "
                         f"{total_steps} steps; shorten one of them or train longer")
    return {"decay_steps": decay_steps, "decay_type": args.decay_type or "1-sqrt",
            "min_lr_ratio": args.min_lr_ratio or 0.0}


def wsd_scheduler(optimizer, schedule: dict[str, Any]) -> LambdaLR:
    """A LambdaLR over `schedule` (pretrain.optim.schedule.schedule_of's). The factor is a functools.partial of a
    module function, as transformers' schedulers are: LambdaLR saves a callable object's attributes and a resume
    would put the checkpoint's back over this run's, while a partial keeps its arguments out of the checkpoint."""
    factor = partial(wsd_factor, warmup_steps=schedule["warmup_steps"],
                     decay_start=schedule["total_steps"] - schedule["decay_steps"],
                     decay_steps=schedule["decay_steps"], decay_type=schedule["decay_type"],
                     min_lr_ratio=schedule["min_lr_ratio"])
    return LambdaLR(optimizer, factor)
