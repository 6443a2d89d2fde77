"""In-job restarts (`accelerate launch --max_restarts N`): the process group of each attempt on keys of its own, what an
error line says comes next, and why the previous attempt ended.

torch elastic restarts every worker of a node when one fails, up to --max_restarts times. Its static rendezvous (the
one `accelerate launch` uses, on one node or several) serves one key-value store from node 0's launcher for the whole
launch, and every attempt's workers join their process group through it, under the same keys. The keys of the
attempt before are still there: a restarted rank reads a dead rank's address from them and gloo fails with
"connectFullMesh failed ... Connection refused", or waits on a counter that is already past. So each attempt joins
on keys of its own, `pretrain/attempt-N/`, and so do the watchdog's heartbeats and verdict (docs/restarts.md). A
restart first calls the roll, so that a node gone for good ends it in minutes, not at --ddp_timeout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from pretrain.base.errors import report_to_launcher
from pretrain.base.faults import launch_attempt

logger = logging.getLogger("train_loop")
REJOIN_S = 60.0  # a restart's processes all come back within this, beyond twice --heartbeat_timeout


def max_restarts() -> int:
    """--max_restarts of the launch (0 outside torch elastic)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def attempt_store(timeout: timedelta):
    """A client of the launch's store (MASTER_ADDR:MASTER_PORT, which torch elastic serves from node 0), whose keys are
    this attempt's own."""
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout, wait_for_workers=False)
    return dist.PrefixStore(f"pretrain/attempt-{launch_attempt()}", store)  # keys: pretrain/attempt-N/KEY


def join_process_group(backend: str, timeout: timedelta, heartbeat_timeout: float) -> None:
    """Under torch elastic, whose launcher serves the store: the default process group, joined on this attempt's keys
    (Accelerate and DeepSpeed then use it as it is), after a roll call on a restart. Elsewhere Accelerate joins as it
    always does."""
    import torch
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    store, world_size = attempt_store(timeout), int(os.environ["WORLD_SIZE"])
    if launch_attempt() > 0:
        roll_call(store, world_size, REJOIN_S + 2 * heartbeat_timeout)
    # NCCL bound to this rank's GPU at once, as DeepSpeed binds it
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else None
    dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size,
                            timeout=timeout, device_id=device)


def roll_call(store, world_size: int, limit_s: float) -> None:
    """On a restart, every process says it is back. Each node's launcher restarts its workers once its own have
    failed, up to --heartbeat_timeout after the others; a process still missing after `limit_s` is on a node that is
    gone for good, and the process group would wait for it until --ddp_timeout, at every restart left. One line
    instead, and exit status 1 (the next restart, if any, calls the roll again)."""
    store.add("back", 1)
    deadline = time.monotonic() + limit_s
    while (back := store.add("back", 0)) < world_size:
        if time.monotonic() > deadline:
            report_to_launcher(f"error: restart {launch_attempt()}: {back} of {world_size} processes came back within "
                               f"{limit_s:.0f} s; the others' node is gone or cannot restart them: "
                               f"{what_follows()}", printer=os.environ.get("LOCAL_RANK", "0") == "0")
            sys.exit(1)
        time.sleep(0.5)


def what_follows() -> str:
    """The end of a line that ends an attempt: what happens next, with the restarts left."""
    restarts, done = max_restarts(), launch_attempt()
    if not restarts:
        return "rerun every node's command to resume"
    if done < restarts:
        return f"the launcher restarts every worker to resume (restart {done + 1} of {restarts}, --max_restarts)"
    return (f"that was the last of {restarts + 1} attempts (--max_restarts {restarts}): rerun every node's command to "
            f"resume once the cause is fixed")


def why_the_last_attempt_ended() -> str:
    """What the processes of this node said as the previous attempt ended: the first line of each error file that
    torch elastic kept for it (`<log_dir>/attempt_<N>/<local_rank>/error.json`), local rank 0's first."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file or launch_attempt() == 0:
        return ""
    folder = Path(error_file).parents[1].with_name(f"attempt_{launch_attempt() - 1}")
    for path in sorted(folder.glob("*/error.json"), key=lambda path: path.parent.name.zfill(6)):
        try:
            message = json.loads(path.read_text())["message"]
        except (OSError, ValueError, KeyError):
            continue
        text = message.get("message", "") if isinstance(message, dict) else str(message)
        line = text.strip().splitlines()[0] if text.strip() else ""
        if line:  # our lines: "error: WHAT; the newest complete checkpoint is ...: what follows"
            return line.removeprefix("error: ").split("; ")[0]
    return ""


def say_restart(accelerator, metrics, checkpoint: Path | None, step: int) -> None:
    """On a restarted attempt: one line on the main process (which attempt, why the one before ended, where it resumed
    from) and the same as a record in metrics.jsonl."""
    if launch_attempt() == 0 or not accelerator.is_main_process:
        return
    why = why_the_last_attempt_ended() or ("no process of this node said why: one was killed by a signal (SIGKILL, the "
                                           "out-of-memory killer) or failed without a line")
    where = f"resumed from {checkpoint} at step {step}" if checkpoint else "started afresh: no complete checkpoint"
    logger.warning(f"restart {launch_attempt()} of {max_restarts()} (--max_restarts): the last attempt ended ({why}); "
                   f"{where}")
    metrics.log({"step": step, "event": "restart", "restart": launch_attempt(), "max_restarts": max_restarts(),
                 "previous_attempt_ended": why, "resumed_from": str(checkpoint) if checkpoint else None}, show=False)
