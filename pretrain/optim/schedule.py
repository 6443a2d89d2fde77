"""The learning-rate schedule: the warmup, transformers' schedulers by name, and what a resume compares."""

from __future__ import annotations

import json
import math
from typing import Any

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import UsageError


def warmup_steps_of(args: TrainArguments, total_steps: int) -> int:
    return args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)


def schedule_of(args: TrainArguments, total_steps: int) -> dict[str, Any]:
    """What shapes the learning rate; a resume that changes it is warned about."""
    return {"lr_scheduler_type": args.lr_scheduler_type, "learning_rate": args.learning_rate,
            "total_steps": total_steps, "warmup_steps": warmup_steps_of(args, total_steps),
            "lr_scheduler_kwargs": args.lr_scheduler_kwargs}


def build_scheduler(optimizer, args: TrainArguments, total_steps: int):
    from transformers import get_scheduler

    kwargs = json.loads(args.lr_scheduler_kwargs) if args.lr_scheduler_kwargs else {}
    warmup = warmup_steps_of(args, total_steps)
    if args.lr_scheduler_type == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", max(1, (total_steps - warmup) // 10))
    try:
        return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--lr_scheduler_type {args.lr_scheduler_type} / --lr_scheduler_kwargs: {error}") from None


def check_schedule(args: TrainArguments) -> None:
    """Refuse a schedule that transformers cannot build (a missing or unknown --lr_scheduler_kwargs entry) before any
    work, by building it once over one parameter: the real one is built after the data, when the run's length is
    known."""
    import torch

    build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate), args, total_steps=2)
