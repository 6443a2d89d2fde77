"""Run control: stop signals agreed across ranks, the watchdog, the profiler, and non-finite checks before a save.

It owns when a run stops early and why; it must not save or log by itself.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path

import torch

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import SEEN_BY_EVERY_RANK, NonFiniteLoss
from pretrain.resilience.watchdog import Watchdog

logger = logging.getLogger("train_loop")

class StopRequest:
    """SIGTERM/SIGINT ask the loop to finish the current optimizer step, save and exit.

    Ranks agree through a CPU (gloo) all-reduce of one integer per optimizer step: host-to-host only, so the
    accelerator queue is never drained for it.
    """

    # Ctrl-C under `accelerate launch` reaches a worker twice: from the terminal, and forwarded by the launcher.
    FORWARDED_WITHIN_S = 3.0

    def __init__(self, num_processes: int, is_main_process: bool):
        import torch.distributed as dist

        self.signal_name: str | None = None
        self.is_main_process = is_main_process
        self.last_step = 0  # the last optimizer step finished, for the acknowledgement
        self.group = dist.new_group(backend="gloo") if num_processes > 1 else None
        self.previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self.first_at = signal.Signals(signum).name, now
            if self.is_main_process:  # at once: a long step would otherwise leave the request unanswered
                logger.warning(f"{self.signal_name}: stopping after step {self.last_step + 1}; saving a checkpoint "
                               f"then")
        elif signum == signal.SIGINT and now - self.first_at > self.FORWARDED_WITHIN_S:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled."""
        if self.group is None:
            return self.signal_name is not None
        import torch.distributed as dist

        flag = torch.tensor([int(self.signal_name is not None)])
        dist.all_reduce(flag, group=self.group)
        return bool(flag.item())


class StepProfiler:
    """torch.profiler over a few optimizer steps after a warm-up; does nothing without --profile_dir."""

    SKIP, WARMUP, ACTIVE = 4, 1, 3  # steps 1-4 unrecorded (compilation, allocator growth), 5 warms up, 6-8 recorded

    def __init__(self, folder: str | None, rank: int):
        self.folder, self.rank, self.profiler, self.written = folder, rank, None, False
        if folder is None:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities, on_trace_ready=self._write,
                                schedule=schedule(wait=self.SKIP, warmup=self.WARMUP, active=self.ACTIVE, repeat=1))
        self.profiler.start()

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def stop(self) -> None:
        if self.profiler is None:
            return
        self.profiler.stop()
        self.profiler = None
        if not self.written:
            logger.warning(f"--profile_dir: fewer than {self.SKIP + self.WARMUP + self.ACTIVE} steps ran in this "
                           f"launch, so nothing was profiled")

    def _write(self, profiler) -> None:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(folder / f"trace_rank{self.rank}.json"))
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=30)
        (folder / f"top_ops_rank{self.rank}.txt").write_text(table)
        self.written = True
        logger.info(f"profiled steps {self.SKIP + self.WARMUP + 1}-{self.SKIP + self.WARMUP + self.ACTIVE} of "
                    f"this launch: {folder}/trace_rank{self.rank}.json and top_ops_rank{self.rank}.txt")


def non_finite(what: str, step: int, args: TrainArguments) -> NonFiniteLoss:
    return NonFiniteLoss(f"non-finite {what} at step {step}: stopping without saving; lower --learning_rate or use "
                         f"--bf16, then resume from the last checkpoint in {args.output_dir}")


def ensure_finite(loss: float, step: int, args: TrainArguments) -> None:
    if not math.isfinite(loss):
        raise non_finite(f"loss ({loss})", step, args)


def ensure_savable(accelerator, model, loss_sum: torch.Tensor, step: int, args: TrainArguments) -> None:
    """Never write NaN or inf over a good checkpoint: check the unlogged losses and the weights (one sync). Each
    weight's smallest and largest values are NaN or infinite when any of its values is: one pass over the weights
    without a temporary, where counting the non-finite values took 0.9 s for 90M parameters on a CPU core."""
    local = [getattr(p, "ds_tensor", p).detach() for p in model.parameters()]  # ZeRO-3: this rank's partition
    ends = [end.float().to(loss_sum.device) for part in local if part.numel() for end in torch.aminmax(part)]
    bad = (~torch.isfinite(loss_sum)).sum().float()
    if ends:
        bad += (~torch.isfinite(torch.stack(ends))).sum()
    if accelerator.reduce(bad, reduction="sum").item():
        raise non_finite("loss or weights", step, args)


def launcher_grace_s() -> float | None:
    """Seconds torch elastic lets workers run after forwarding a signal before it SIGKILLs them (None when not
    launched by it)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))


class RunControl:
    """The stop request, the watchdog and the profiler of one launch, as a context: on exit the signal handlers are
    restored and the profile is written (or its absence explained), however the loop ended; when it ended in an
    error because a rank went away, the watchdog ends the process with the line that says so."""

    def __init__(self, args: TrainArguments, num_processes: int, rank: int, local_rank: int):
        self.stop = StopRequest(num_processes, is_main_process=rank == 0)
        self.watchdog = Watchdog(args, rank, num_processes, local_rank)
        self.profiler = StepProfiler(args.profile_dir, rank)
        self.grace_s = launcher_grace_s()
        self.grace_checked = False

    def step_done(self, step: int) -> None:
        self.stop.last_step = step
        self.watchdog.step_done(step)
        self.profiler.step()

    def paused(self):
        """An evaluation, a save or a rewind: no hang, however long it takes."""
        return self.watchdog.paused()

    def warn_if_a_stop_cannot_save(self, step_time_s: float) -> None:
        """Once, at the first logged step: a step longer than the launcher's grace period cannot end in a save."""
        if self.grace_checked or self.grace_s is None:
            return
        self.grace_checked = True
        if step_time_s > self.grace_s and self.stop.is_main_process:
            logger.warning(f"a step takes {step_time_s:.0f} s, longer than the {self.grace_s:.0f} s the launcher "
                           f"gives workers after a signal: a preemption or Ctrl-C would be killed before saving; "
                           f"launch with TORCH_ELASTIC_SHUTDOWN_TIMEOUT={int(4 * step_time_s)} (or make steps "
                           f"shorter)")

    def __enter__(self) -> RunControl:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if isinstance(error, Exception) and not isinstance(error, SEEN_BY_EVERY_RANK):
            self.watchdog.explain_failure(error)  # does not return when a rank went away
        self.watchdog.stop()
        self.profiler.stop()
        self.stop.restore()
