"""The learning-rate schedule: WSD's closed form for each decay shape, its decay lengths, transformers'
warmup_stable_decay beside it, and its flags. A resume that changes the schedule: tests/test_first_hour.py (one
process) and tests/test_distributed.py (ZeRO-2)."""

import math

import pytest
import torch

from pretrain.base.arguments import parse_args
from pretrain.base.errors import UsageError
from pretrain.optim.schedule import build_scheduler, check_schedule, schedule_of

PEAK, WARMUP, TOTAL, DECAY, FLOOR, TOKENS_PER_STEP = 3e-3, 5, 60, 12, 0.1, 128
SHAPES = ["linear", "cosine", "1-sqrt"]


def documented_rate(step, shape):
    """docs/schedules.md's closed form: the learning rate after `step` optimizer steps."""
    if step < WARMUP:
        return PEAK * step / WARMUP
    if step < TOTAL - DECAY:
        return PEAK
    progress = (step - (TOTAL - DECAY)) / DECAY
    falling = {"linear": 1 - progress, "cosine": (1 + math.cos(math.pi * progress)) / 2,
               "1-sqrt": 1 - math.sqrt(progress)}[shape]
    return PEAK * (FLOOR + (1 - FLOOR) * falling)


def wsd_schedule(*flags):
    args = parse_args(["--lr_scheduler_type", "wsd", "--learning_rate", str(PEAK), "--warmup_steps", str(WARMUP),
                       *map(str, flags)])[2]
    return schedule_of(args, TOTAL, TOKENS_PER_STEP)


def rates(scheduler, optimizer):
    """The rate after each step, stepped as the loop steps it (optimizer, then schedule); index 0 is before any."""
    found = [scheduler.get_last_lr()[0]]
    for _ in range(TOTAL):
        optimizer.step()
        scheduler.step()
        found.append(scheduler.get_last_lr()[0])
    assert found[-1] == optimizer.param_groups[0]["lr"]  # what the optimizer holds is what is logged
    return found


def run_schedule(schedule):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=schedule["learning_rate"])
    return rates(build_scheduler(optimizer, schedule), optimizer)


@pytest.mark.parametrize("shape", SHAPES)
def test_wsd_is_the_documented_closed_form_at_every_step(shape):
    found = run_schedule(wsd_schedule("--decay_steps", DECAY, "--decay_type", shape, "--min_lr_ratio", FLOOR))
    for step, rate in enumerate(found):
        assert rate == pytest.approx(documented_rate(step, shape), rel=1e-12, abs=0), step
    assert found[0] == 0 and set(found[WARMUP:TOTAL - DECAY + 1]) == {PEAK}  # the stable phase is the peak itself
    decay = found[TOTAL - DECAY:]
    assert all(later < earlier for earlier, later in zip(decay, decay[1:]))
    assert found[-1] == pytest.approx(PEAK * FLOOR, rel=1e-12) and found[-1] == min(found[WARMUP:])


def test_a_decay_length_as_a_fraction_as_steps_or_as_tokens_and_the_defaults():
    by_steps = wsd_schedule("--decay_steps", DECAY)
    assert by_steps["decay_steps"] == DECAY and by_steps["decay_type"] == "1-sqrt" and by_steps["min_lr_ratio"] == 0
    assert wsd_schedule("--decay_ratio", DECAY / TOTAL) == by_steps
    assert wsd_schedule() == by_steps  # 0.2 of the run by default
    assert wsd_schedule("--decay_tokens", DECAY * TOKENS_PER_STEP - TOKENS_PER_STEP + 1) == by_steps  # rounded up
    assert wsd_schedule("--decay_ratio", 0.001)["decay_steps"] == 1
    with pytest.raises(UsageError) as error:
        wsd_schedule("--decay_steps", TOTAL - WARMUP + 1)
    assert str(error.value) == (f"--decay_steps {TOTAL - WARMUP + 1}: the decay and the warmup ({WARMUP} steps) do "
                                f"not fit in the run's {TOTAL} steps; shorten one of them or train longer")


@pytest.mark.parametrize("shape", SHAPES)
def test_transformers_warmup_stable_decay_has_the_same_decay_and_floor_and_warms_up_from_the_floor(shape):
    from transformers import get_wsd_schedule

    ours = run_schedule(wsd_schedule("--decay_steps", DECAY, "--decay_type", shape, "--min_lr_ratio", FLOOR))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    theirs = rates(get_wsd_schedule(optimizer, WARMUP, DECAY, num_training_steps=TOTAL, decay_type=shape,
                                    min_lr_ratio=FLOOR), optimizer)
    assert ours[WARMUP:] == pytest.approx(theirs[WARMUP:], rel=1e-12, abs=0)
    for step in range(WARMUP):  # theirs rises from the floor, ours from 0 as every other warmup here
        assert theirs[step] == pytest.approx(PEAK * (FLOOR + (1 - FLOOR) * step / WARMUP), rel=1e-12)
        assert ours[step] == pytest.approx(PEAK * step / WARMUP, rel=1e-12, abs=0)


@pytest.mark.parametrize("flags, expected", [
    (["--decay_steps", "3"], "--decay_steps goes with --lr_scheduler_type wsd"),
    (["--lr_scheduler_type", "cosine", "--min_lr_ratio", "0.1"], "--min_lr_ratio goes with --lr_scheduler_type wsd"),
    (["--lr_scheduler_type", "wsd", "--decay_ratio", "0.1", "--decay_tokens", "9"],
     "--decay_ratio and --decay_tokens: give one length of the decay"),
    (["--lr_scheduler_type", "wsd", "--decay_ratio", "0"], "--decay_ratio must be in (0, 1]"),
    (["--lr_scheduler_type", "wsd", "--decay_steps", "0"], "--decay_steps and --decay_tokens must be at least 1"),
    (["--lr_scheduler_type", "wsd", "--min_lr_ratio", "1"], "--min_lr_ratio must be in [0, 1)"),
    (["--lr_scheduler_type", "wsd", "--decay_type", "step"], "invalid choice: 'step' (choose from 'linear', 'cosine', '1-sqrt')"),
    (["--lr_scheduler_type", "wsd", "--lr_scheduler_kwargs", "{}"], "--lr_scheduler_kwargs does not apply to wsd"),
])
def test_a_bad_wsd_flag_is_one_line(flags, expected):
    """Checked with the flags, before any work (train_loop.main calls check_schedule next to parse_args)."""
    with pytest.raises(UsageError) as error:
        check_schedule(parse_args(flags)[2])
    assert expected in str(error.value) and "\n" not in str(error.value)
