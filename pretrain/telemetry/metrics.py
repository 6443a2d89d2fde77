"""Metrics: step timing, tokens/s, FLOPs per token and MFU, peak memory, and the logger that writes the console,
<output_dir>/metrics.jsonl and SwanLab on the main process (with the stragglers of a launch).

It owns what a logged record holds; it must not change training (it never synchronises the device by itself).
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import UsageError, moved_api
from pretrain.base.state import TrainState
from pretrain.telemetry.stragglers import Stragglers
from pretrain.telemetry.tracking import start_trackers

logger = logging.getLogger("train_loop")
TORCH_TESTED = "2.13.0"
CONSOLE_LEAVES_OUT = ("straggler/",)  # fields for the file and the trackers: a straggler is said in its own line

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (not the 2:4-sparsity figures), matched against the device name.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
               ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
               ("RTX 6000 Ada", 364.0), ("A6000", 155.0), ("4090", 165.0), ("3090", 71.0), ("V100", 125.0)]


def numel(parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (then it holds an empty placeholder)."""
    return getattr(parameter, "ds_numel", parameter.numel())


def flops_per_token(model, seq_len: int) -> int:
    """6 x matmul parameters (all but the input embedding; a tied output projection still counts) + attention."""
    config = model.config
    params = sum(map(numel, model.parameters()))
    embedding = numel(model.get_input_embeddings().weight)
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    matmul_params = params if tied else params - embedding
    return 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def device_peak_tflops(args: TrainArguments) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    """Console/progress bar, <output_dir>/metrics.jsonl and the --report_to trackers, on the main process only."""

    def __init__(self, accelerator, args: TrainArguments, total_steps: int, state: TrainState,
                 run_config: dict[str, Any]):
        self.enabled = accelerator.is_main_process
        self.accelerator = accelerator
        self.path = Path(args.output_dir) / "metrics.jsonl"
        self.progress = None
        self.losses: list[tuple[int, float]] = []  # (step, loss) of this process's logged steps
        self.compiling = args.torch_compile
        self.graphs_before = compiled_graphs() if self.compiling else 0
        self.first_graphs: int | None = None
        self.eval_every = args.eval_tasks_steps or args.eval_steps or args.save_steps
        self.eval_cost_said = args.eval_strategy != "steps"
        self.stragglers = Stragglers(accelerator.num_processes, self.enabled, self.log)
        self.staged: dict[str, Any] = {}  # per-layer telemetry, for the step's training record
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "run_config.json").write_text(json.dumps(run_config, indent=1, default=str))
        if state.step == 0 and self.path.exists():
            self.path.unlink()  # a fresh start: old metrics belong to a run that made no checkpoint
        self.progress = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                             disable=not sys.stderr.isatty())  # a log file gets the record lines, not redrawn bars
        start_trackers(accelerator, args, state, run_config)

    def stage(self, values: dict[str, Any]) -> None:
        """Values measured at this step (pretrain.telemetry.layer_stats), written with its training record."""
        if self.enabled:
            self.staged.update(values)

    def log(self, record: dict[str, Any], show: bool = True) -> None:
        """Write the record to metrics.jsonl and the trackers; `show`: as a line on the console too. A training
        record takes the values staged for its step."""
        if not self.enabled:
            return
        staged, self.staged = (self.staged, {}) if "loss" in record else ({}, self.staged)
        if record.get("loss") is not None:
            self.losses.append((record["step"], record["loss"]))
        if self.compiling:
            self.count_graphs(record)
        if not self.eval_cost_said and record.get("eval_s") and record.get("step_time_s"):
            self.say_eval_cost(record["eval_s"], record["step_time_s"])
        with open(self.path, "a") as handle:
            handle.write(json.dumps({**record, **staged}) + "\n")
        if show:
            self.progress.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in record.items() if not k.startswith(CONSOLE_LEAVES_OUT))
                                + (f" (+{len(staged)} per-layer values)" if staged else ""))
        self.accelerator.log({k: v for k, v in {**record, **staged}.items()
                              if k != "step" and isinstance(v, (int, float))}, step=record["step"])

    def say_eval_cost(self, eval_s: float, step_time_s: float) -> None:
        """Once, after the first evaluation: its share of the run's time at this cadence."""
        self.eval_cost_said = True
        share = eval_s / (eval_s + self.eval_every * step_time_s)
        logger.info(f"evaluation: {eval_s:.1f} s every {self.eval_every} steps of {step_time_s:.2f} s, {share:.1%} of "
                    f"the run's time (--max_eval_samples, --eval_steps and --eval_tasks_steps set it)")

    def count_graphs(self, record: dict[str, Any]) -> None:
        """Add the graphs torch.compile has made so far; warn once when recompiles pile up.

        Expected: the training graph(s) of the first step, and one or two more at the first evaluation (no_grad is a
        new guard, and a shorter last batch a new shape).
        Beyond twice the first step's graphs and two spare shapes, something changes between steps.
        """
        graphs = record["compiled_graphs"] = compiled_graphs() - self.graphs_before
        self.first_graphs = self.first_graphs or graphs
        if graphs > 2 * self.first_graphs + 2 and self.first_graphs > 0:
            logger.warning(f"--torch_compile: {graphs} graphs compiled by step {record['step']} (the first step made "
                           f"{self.first_graphs}); something changes between steps: see TORCH_LOGS=recompiles")
            self.first_graphs = graphs  # warn again only if it grows that much more

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(ended=error is None)

    def close(self, ended: bool = True) -> None:
        """Close the bar and the trackers; a run that ended (finished or stopped) says how its loss went."""
        if self.progress is not None:
            self.progress.close()
        if ended and len(self.losses) >= 2:
            (first_step, first), (last_step, last) = self.losses[0], self.losses[-1]
            logger.info(f"loss {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
        for tracker in self.accelerator.trackers:  # also when the run stops early; end_training then finds none
            tracker.finish()
        self.accelerator.trackers.clear()


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (a recompile adds one): a private counter of torch's."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        raise UsageError(moved_api("torch", TORCH_TESTED, "--torch_compile's graph count")) from None
    return counters["stats"]["unique_graphs"]


class LogWindow:
    """What one log line sums up: this process's micro-batch losses and the optimizer steps since the last line, their
    time and the part of it spent waiting for data. Evaluations and checkpoint saves are timed apart (`eval_s`,
    `save_s`) and never charged to the steps. It never synchronises the device, except for a GPU's forward timings
    at a logging step, whose loss read waits longer anyway."""

    def __init__(self, device, sources: int = 0):
        self.on_cuda = torch.device(device).type == "cuda"
        self.forward_events: list[tuple[Any, Any]] = []  # a GPU's (begin, end) of each forward, read at logging
        self.loss_sum = torch.zeros((), device=device)
        self.step_loss_sum = torch.zeros((), device=device)  # the step under way's, kept unless the step is skipped
        # A mixture's (loss sum, counted targets, blocks) per source, summed on the device
        self.by_source = torch.zeros((sources, 3), device=device) if sources else None
        self.step_by_source = torch.zeros((sources, 3), device=device) if sources else None
        self.step_micro_steps = 0
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        if self.by_source is not None:
            self.by_source.zero_()
        self.micro_steps = 0
        self.steps = 0
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.forward_s = 0.0
        self.forward_events.clear()
        self.aside = {"eval_s": 0.0, "save_s": 0.0}

    @contextlib.contextmanager
    def set_aside(self, name: str) -> Iterator[None]:
        """Time the block as `name` ('eval_s' or 'save_s'), outside the training steps' time."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.aside[name] += time.perf_counter() - begin

    def add_loss(self, loss: torch.Tensor, sources: torch.Tensor | None = None,
                 block_sums: torch.Tensor | None = None) -> None:
        """A micro-batch's loss; for a mixture also each block's source and (loss sum, counted targets)."""
        self.step_loss_sum += loss.detach()
        self.step_micro_steps += 1
        if sources is not None:
            counts = torch.ones_like(block_sums[:, :1])
            self.step_by_source.index_add_(0, sources, torch.cat([block_sums.to(self.by_source.dtype), counts], 1))

    def end_step(self, skipped: bool) -> None:
        """Count the optimizer step; its losses join the window's unless it was skipped."""
        self.steps += 1
        if not skipped:
            self.loss_sum += self.step_loss_sum
            self.micro_steps += self.step_micro_steps
            if self.by_source is not None:
                self.by_source += self.step_by_source
        self.step_loss_sum.zero_()
        self.step_micro_steps = 0
        if self.step_by_source is not None:
            self.step_by_source.zero_()

    def timed_next(self, iterator):
        """The iterator's next item (None at its end), its wait counted as data time."""
        begin = time.perf_counter()
        item = next(iterator, None)
        self.data_wait += time.perf_counter() - begin
        return item

    @contextlib.contextmanager
    def timed_forward(self) -> Iterator[None]:
        """Time a micro-batch's forward and loss, the part of a step before its first collective (on every layout but
        ZeRO-3): a rank slow in compute takes longer here, while the others' extra time is spent waiting later. A
        GPU's own clock (CUDA events, read at logging steps: no synchronisation in between), else the host's."""
        if self.on_cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self.forward_events.append((begin, end))
        else:
            begin = time.perf_counter()
            yield
            self.forward_s += time.perf_counter() - begin

    def per_step(self) -> list[float]:
        """This rank's step time, data wait and forward time, in seconds per optimizer step of the window."""
        if self.forward_events:
            self.forward_events[-1][1].synchronize()  # the loss read of this logging step waits for more
            self.forward_s += sum(begin.elapsed_time(end) for begin, end in self.forward_events) / 1000
            self.forward_events.clear()
        steps = max(self.steps, 1)
        return [self.seconds() / steps, self.data_wait / steps, self.forward_s / steps]

    def wall_seconds(self) -> float:
        """Since the last line, evaluations and saves included."""
        return time.perf_counter() - self.start

    def seconds(self) -> float:
        """Since the last line, in training steps only."""
        return max(self.wall_seconds() - sum(self.aside.values()), 1e-9)


def throughput(window: LogWindow, tokens_per_step: int, num_devices: int, flops_token: int,
               peak_tflops: float | None) -> dict[str, Any]:
    seconds = window.seconds()
    tokens_per_s = window.steps * tokens_per_step / seconds
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / num_devices,
        "step_time_s": seconds / max(window.steps, 1),
        "data_wait_share": window.data_wait / seconds,
        "peak_mem_gb": peak_memory_gb(),
        "mfu": flops_token * tokens_per_s / (num_devices * peak_tflops * 1e12) if peak_tflops else None,
        **{name: round(seconds, 3) for name, seconds in window.aside.items()},
    }
