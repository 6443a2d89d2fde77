"""Branches (`--branch_from PARENT/checkpoint-N`): a new run in its own --output_dir that starts from another run's
checkpoint (weights, optimizer, step, RNG and data position, through the ordinary resume) while that run goes on,
e.g. a cooldown from the stable phase, on new data if --train_mixture changes. docs/mid-training.md.

The parent's folder is only read: the branch's lock, metrics, checkpoints, any conversion of the parent's
checkpoint and its manifest, branch.json, go to the branch's folder. Once the branch has a checkpoint of its own, the
same command resumes from it, and the parent's checkpoint is no longer needed.

It owns the branch's checks, its manifest and the continuity of the learning rate at the branch point; it must not
load checkpoints (checkpoints.resume does).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import UsageError
from pretrain.base.state import TrainState
from pretrain.checkpointing.checkpoints import BRANCH_MANIFEST, CHECKPOINT_PATTERN, MANIFEST, TRAINER_STATE, \
    checkpoint_damage, is_branch_point, list_checkpoints
from pretrain.data.mixture import Mixture
from pretrain.optim.schedule import continue_from

logger = logging.getLogger("train_loop")


def check_branch(args: TrainArguments) -> None:
    """Before any work, on every rank (reading only): the branch's folders are not the parent's nor inside it, a folder
    that already holds a run is this same branch, and the checkpoint it starts from is complete (needed only until
    the branch has a checkpoint of its own)."""
    if not args.branch_from:
        return
    checkpoint, output_dir = Path(args.branch_from).resolve(), Path(args.output_dir).resolve()
    flag = f"--branch_from {args.branch_from}"
    for name, folder in (("--output_dir", args.output_dir), ("--logging_dir", args.logging_dir)):
        if folder and checkpoint.parent in (Path(folder).resolve(), *Path(folder).resolve().parents):
            raise UsageError(f"{name} {folder} is in the folder of the run it branches from ({checkpoint.parent}), "
                             f"which a branch never writes; give the branch a new {name}")
    recorded = output_dir / BRANCH_MANIFEST
    own = [c for c in list_checkpoints(output_dir) if checkpoint_damage(c) is None]
    started_from = json.loads(recorded.read_text())["checkpoint"] if recorded.is_file() else str(checkpoint)
    if started_from != str(checkpoint):
        raise UsageError(f"--output_dir {args.output_dir} is a branch from {started_from}; rerun with that "
                         f"--branch_from to resume it, or give this branch a new --output_dir")
    if own and not recorded.is_file():
        raise UsageError(f"--output_dir {args.output_dir} holds a run that is not a branch ({own[-1].name}); give "
                         f"the branch a new --output_dir")
    if own:
        return  # the branch resumes from its own checkpoint
    if not checkpoint.is_dir() or not CHECKPOINT_PATTERN.match(checkpoint.name):
        raise UsageError(f"{flag}: no such checkpoint folder (a run's checkpoint-N)")
    damage = checkpoint_damage(checkpoint)
    if damage:
        raise UsageError(f"{flag}: incomplete checkpoint ({damage}); branch from another one")
    if parent_state(checkpoint).lr <= 0:
        raise UsageError(f"{flag}: the checkpoint's learning rate is 0 (its decay has ended): there is no rate to "
                         f"decay from; branch from an earlier checkpoint")


def parent_state(checkpoint: Path) -> TrainState:
    return TrainState(**json.loads((checkpoint / TRAINER_STATE).read_text()))


def start_branch(accelerator, checkpoint: Path | None, args: TrainArguments, state: TrainState, scheduler,
                 schedule: dict[str, Any], mixture: Mixture | None) -> None:
    """Once the branch point is loaded (a resume from the branch's own checkpoint does nothing here): the learning
    rate continuous with the checkpoint's, a warning when that checkpoint was already in its decay, a run of its own
    in the trackers (not more steps of the parent's run), and branch.json."""
    if not is_branch_point(args, checkpoint):
        return
    parent, main = parent_state(checkpoint), accelerator.is_main_process
    state.swanlab_run_id = None  # every tracker's run id: a new one is drawn
    own = continue_from(scheduler, parent.lr)
    peak = (parent.schedule or {}).get("learning_rate")
    if main and peak and parent.step >= parent.schedule["warmup_steps"] and parent.lr < peak * (1 - 1e-9):
        logger.warning(f"--branch_from {checkpoint}: the checkpoint is already in its decay (its rate after step "
                       f"{parent.step} is {parent.lr:.4g}, below its peak {peak:.4g}): the branch decays on from there;"
                       f" a cooldown from a checkpoint of the stable phase starts at the peak")
    if own is not None and main:
        logger.warning(f"--branch_from {checkpoint}: this schedule gives {own:.4g} at step {parent.step} and the "
                       f"checkpoint trained at {parent.lr:.4g}: the schedule is scaled by {parent.lr / own:.4g} so "
                       f"that the rate goes on from the checkpoint's")
    if main:
        write_manifest(checkpoint, args, parent, schedule, mixture)


def checkpoint_sha256(checkpoint: Path) -> str:
    """One sha256 over the files a complete checkpoint's manifest lists and the manifest itself, in name order (the
    files resume loads, whatever is added beside them later): the sha256 of the lines "NAME\\0FILE_SHA256\\n". The
    files are hashed on several threads (hashlib lets go of the GIL): a ZeRO checkpoint is a file per rank."""
    names = sorted(json.loads((checkpoint / MANIFEST).read_text())) + [MANIFEST]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(file_sha256, [checkpoint / name for name in names]))
    return hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in zip(names, digests)).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(checkpoint: Path, args: TrainArguments, parent: TrainState, schedule: dict[str, Any],
                   mixture: Mixture | None) -> None:
    """branch.json: where the branch starts (the parent's folder, checkpoint, step, tokens and the checkpoint's
    hash), the rate it goes on from, its schedule and its mixture beside the parent's. Written whenever the branch
    starts from that checkpoint, atomically; a resume from the branch's own checkpoints only checks it
    (check_branch)."""
    manifest = {"parent": str(checkpoint.resolve().parent), "checkpoint": str(checkpoint.resolve()),
                "step": parent.step, "tokens_seen": parent.tokens_seen,
                "checkpoint_sha256": checkpoint_sha256(checkpoint),
                "lr_at_branch": parent.lr, "schedule": schedule,
                "mixture": mixture.weight_of() if mixture is not None else None,
                "parent_mixture": {name: float(Fraction(source["weight"])) for name, source in
                                   parent.mixture["sources"].items()} if parent.mixture else None}
    path = Path(args.output_dir) / BRANCH_MANIFEST
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(temporary, path)
    logger.info(f"branched from {checkpoint} at step {parent.step} (sha256 {manifest['checkpoint_sha256'][:12]}, "
                f"rate {parent.lr:.4g}): {path}")
