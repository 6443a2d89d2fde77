"""train_loop.py with torch.distributed's collectives counted, launched in its place by tests: each rank writes
<COUNT_FILE>-rank<N>.json, {optimizer steps finished when called: {collective: calls}}. Step k's forward, backward,
optimizer step and telemetry come under k - 1; its log, evaluation and save under k."""

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

import train_loop
from pretrain.distributed.launch import run_program
from pretrain.telemetry.metrics import MetricsLogger

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "reduce", "gather", "scatter",
               "all_to_all", "all_to_all_single")
calls: dict[int, Counter] = {}
steps_done = 0


def counted(name, original):
    def collective(*args, **kwargs):
        calls.setdefault(steps_done, Counter())[name] += 1
        return original(*args, **kwargs)
    return collective


def advance(self, original=MetricsLogger.advance):
    global steps_done
    steps_done += 1
    original(self)


def main():
    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))
    MetricsLogger.advance = advance
    try:
        train_loop.cli(sys.argv[1:])
    finally:
        Path(f"{os.environ['COUNT_FILE']}-rank{os.environ['RANK']}.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    run_program(main)
