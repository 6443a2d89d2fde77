"""Stragglers: every rank's step time, data wait and forward time over a log window, gathered with the window's loss
in the record's one collective (on logging steps only); the slowest and fastest rank of each in the record, and a
rank that keeps the others waiting named in one line, once per episode (docs/resilience.md#stragglers).

Step time alone cannot find a rank slow in compute: the others wait for it inside the step's collectives, so every
rank's step lasts as long as the slowest one's. What tells the ranks apart is the time each spends on its own before
a collective: its wait for data and its forward (LogWindow.per_step).
"""

from __future__ import annotations

import logging
import statistics
from typing import Any, Callable

import torch

logger = logging.getLogger("train_loop")

KINDS = ("step_time", "data_wait", "forward")  # LogWindow.per_step's order
RATIO = 1.2  # a rank's own time against the median of the others': a fifth slower holds every rank back
FLOOR_S = 0.05  # and this much more per step: single-step records of tiny CPU steps beside other runs pass 50 ms
# in about 1 of 200, 20 ms in 1 of 6 (docs/resilience.md#the-verdict)
IN_A_ROW = 2  # records: one slow window (a checkpoint load, a page-cache miss) is no straggler


class Stragglers:
    """Gathers the per-rank timings with the record's loss and judges them; the verdict is rank 0's to say."""

    def __init__(self, num_processes: int, is_main_process: bool, log: Callable[[dict[str, Any]], None]):
        self.num_processes, self.is_main_process, self.log = num_processes, is_main_process, log
        self.in_a_row = [0] * num_processes  # records in a row in which each rank was slow
        self.rows: list[list[float]] = []  # the last window's per_step of every rank
        self.judged = False  # the launch's first record is not: it holds one-time work (allocation, compilation)

    def gather(self, accelerator, values: torch.Tensor, per_step: list[float]) -> torch.Tensor:
        """`values` summed over the ranks, from one all-gather that brings every rank's `per_step` along (none on one
        process, where the sum is the values)."""
        if self.num_processes == 1:
            return values
        row = torch.cat([values.reshape(-1), torch.tensor(per_step, dtype=values.dtype, device=values.device)])
        rows = accelerator.gather(row[None])
        self.rows = rows[:, values.numel():].tolist()
        return rows[:, :values.numel()].sum(0).reshape(values.shape)

    def fields(self, step: int) -> dict[str, Any]:
        """The record's straggler/ fields (none on one process); a rank slow for IN_A_ROW records is named."""
        if not self.rows:
            return {}
        record = {}
        for column, kind in enumerate(KINDS):
            values = [row[column] for row in self.rows]
            slowest, fastest = values.index(max(values)), values.index(min(values))
            record.update({f"straggler/{kind}_slowest_s": round(values[slowest], 4),
                           f"straggler/{kind}_slowest_rank": slowest,
                           f"straggler/{kind}_fastest_s": round(values[fastest], 4),
                           f"straggler/{kind}_fastest_rank": fastest})
        for rank in range(len(self.rows) if self.judged else 0):
            verdict = judge(self.rows, rank)
            self.in_a_row[rank] = self.in_a_row[rank] + 1 if verdict else 0
            if self.in_a_row[rank] == IN_A_ROW:  # once per episode: the count passes IN_A_ROW once
                self.name(step, rank, *verdict)
        self.judged = True
        return record

    def name(self, step: int, rank: int, slow_in: str, own: float, peers: float) -> None:
        """One line on rank 0's console and one record in metrics.jsonl (and the trackers)."""
        if self.is_main_process:
            where = "reading data" if slow_in == "data" else "compute"
            logger.warning(f"straggler: rank {rank} is slow in {where}: {own:.3f} s per step on its own (data wait "
                           f"+ forward) against {peers:.3f} s for the median of the other ranks, "
                           f"{own / max(peers, 1e-9):.1f}x, over the last {IN_A_ROW} records to step {step}; every "
                           f"rank waits for it (docs/resilience.md#stragglers)")
        self.log({"step": step, "event": "straggler", "straggler/rank": rank, "straggler/slow_in": slow_in,
                  "straggler/own_s": round(own, 4), "straggler/peers_s": round(peers, 4)})


def judge(rows: list[list[float]], rank: int) -> tuple[str, float, float] | None:
    """(slow_in, own, peers) when `rank`'s own time per step (data wait + forward) is over RATIO times the median of
    the other ranks' and FLOOR_S more; slow_in is 'data' or 'compute', whichever part is further above its median."""
    others = [row for index, row in enumerate(rows) if index != rank]
    data, forward = rows[rank][1], rows[rank][2]
    data_peers, forward_peers = (statistics.median(row[column] for row in others) for column in (1, 2))
    own, peers = data + forward, statistics.median(row[1] + row[2] for row in others)
    if own < RATIO * peers or own - peers < FLOOR_S:
        return None
    return ("data" if data - data_peers >= forward - forward_peers else "compute"), own, peers
