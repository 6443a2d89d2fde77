"""Checkpoints: the run's state beside the weights, atomic saves (every rank writes, the main process renames),
damage checks, rotation, choosing what to resume, the data position across a changed batch layout or mixture, and
the final Hugging Face model.

It owns the checkpoint format on disk; it must not decide when to save (the loop does).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import CheckpointError, UsageError, first_line
from pretrain.base.faults import launch_attempt
from pretrain.base.state import TrainState
from pretrain.checkpointing.background_save import sync_to_disk
from pretrain.checkpointing.universal import UNIVERSAL, load_universal, universal_copy
from pretrain.data.mixture import Mixture, resume_mixture
from pretrain.distributed.launch import zero_stage_of
from pretrain.optim.schedule import peak_rates, take_up_schedule

logger = logging.getLogger("train_loop")

BRANCH_MANIFEST = "branch.json"  # where a branch (pretrain/checkpointing/branch.py) comes from
BRANCH_UNIVERSAL = "branch_universal"  # a branch's conversion of its parent's checkpoint, in the branch's folder
# What a run writes before its first checkpoint.
RUN_FILES = {"metrics.jsonl", "run_config.json", "swanlog", "tensorboard", "wandb", "logs", "run.lock", "eval_tasks",
             BRANCH_MANIFEST, BRANCH_UNIVERSAL}
WATCHDOG_FILES = re.compile(r"^(hang|error)-rank\d+\.txt$")  # pretrain/resilience/watchdog.py's, from a run that failed
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed from their temporary name), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(checkpoint: Path) -> int:
    """The step a complete checkpoint folder (checkpoint-N) was saved at."""
    return int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint folder, comparing it to the manifest written when it was completed."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return "unreadable manifest"
    for relative, size in manifest.items():
        path = checkpoint / relative
        if not path.is_file():
            return f"missing {relative}"
        if path.stat().st_size != size:
            return f"truncated {relative} ({path.stat().st_size} of {size} bytes)"
    return None


def save_checkpoint(accelerator, state: TrainState, args: TrainArguments, writer) -> Path:
    """Every rank writes its part into checkpoint-N.tmp (now, or from a snapshot in the background: `writer`, a
    pretrain.checkpointing.background_save.CheckpointWriter); the main process then renames it into place."""
    output_dir = Path(args.output_dir)
    final = output_dir / f"checkpoint-{state.step}"
    temporary = output_dir / f"checkpoint-{state.step}.tmp"
    writer.wait()  # the previous save is complete (a background write ends its work before this one starts)
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with writer.snapshots():
            accelerator.save_state(str(temporary))  # DeepSpeed's save has a barrier inside: every rank must call it
    except (OSError, RuntimeError, SafetensorError) as error:  # a full disk or a failing filesystem
        shutil.rmtree(temporary, ignore_errors=True)
        complete = [c.name for c in list_checkpoints(output_dir) if checkpoint_damage(c) is None]
        then = f"it resumes from {complete[-1]}" if complete else "there is no complete checkpoint yet, so it starts afresh"
        raise CheckpointError(f"--output_dir {output_dir}: writing {temporary.name} failed ({first_line(error)}; the "
                              f"disk has {shutil.disk_usage(output_dir).free / 1e6:.1f} MB free); free space or fix "
                              f"the folder, then rerun the same command: {then}") from None
    trainer_state = json.dumps(asdict(state), indent=1)  # as it is now: the loop goes on while a background write runs
    writer.finish(state.step, temporary,
                  lambda: complete_checkpoint(temporary, final, trainer_state, args.save_total_limit))
    return final


def complete_checkpoint(temporary: Path, final: Path, trainer_state: str, save_total_limit: int | None) -> None:
    """On the main process, once every rank's files are written: the state and the manifest go in, everything is
    forced to disk, and the folder is renamed into place (the moment resume can see it)."""
    (temporary / TRAINER_STATE).write_text(trainer_state)
    files = {str(p.relative_to(temporary)): p.stat().st_size for p in temporary.rglob("*") if p.is_file()}
    (temporary / MANIFEST).write_text(json.dumps(files, indent=1))
    follow_umask(temporary.rglob("*.safetensors"))
    for relative in files:
        sync_to_disk(temporary / relative)
    sync_to_disk(temporary / MANIFEST)
    if final.exists():
        remove_checkpoint(final)
    os.rename(temporary, final)
    sync_to_disk(final.parent)
    prune_checkpoints(final.parent, save_total_limit)
    logger.info(f"saved {final}")


def follow_umask(paths) -> None:
    """safetensors writes each file as a temporary file of mode 0600 renamed into place: give the weights the mode
    that every other file of the run gets from the umask (0644 under the usual 022), or nobody else on a shared
    filesystem can read the model."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, for every thread, while it reads)."""
    try:
        return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration):  # not Linux: set and restore at once
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - limit)] if limit else []:
        remove_checkpoint(old)


def remove_checkpoint(checkpoint: Path) -> None:
    """Renamed out of resume's sight first: a run killed half-way through the deletion leaves a folder that resume
    ignores (and the next start removes), never a damaged checkpoint-N."""
    doomed = checkpoint.with_name(checkpoint.name + ".deleting")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def find_resume_checkpoint(args: TrainArguments) -> Path | None:
    """The checkpoint to resume from, after refusing an output_dir that holds foreign files."""
    output_dir = Path(args.output_dir)
    leftovers = [*output_dir.glob("checkpoint-*.tmp"), *output_dir.glob("checkpoint-*.deleting")] \
        if output_dir.is_dir() else []
    for leftover in leftovers:  # the output lock says that no run is writing them
        shutil.rmtree(leftover, ignore_errors=True)
        logger.info(f"removed {leftover.name}, left by a save or a deletion that did not finish")
    requested = args.resume_from_checkpoint
    # A restart (--max_restarts) goes on from where the attempt before got, whatever the flags say.
    newest = next((path for path in reversed(list_checkpoints(output_dir)) if checkpoint_damage(path) is None),
                  None) if launch_attempt() > 0 else None
    if newest is not None:
        return newest
    if requested and requested != "latest":
        path = Path(requested)
        if not path.is_dir():
            raise UsageError(f"--resume_from_checkpoint {requested}: no such checkpoint folder")
        damage = checkpoint_damage(path)
        if damage:
            raise UsageError(f"--resume_from_checkpoint {requested}: damaged checkpoint ({damage}); pick another")
        return path
    if args.overwrite_output_dir:
        return None  # resume() deletes the checkpoints, once every check before the data build has passed
    for checkpoint in reversed(list_checkpoints(output_dir)):
        damage = checkpoint_damage(checkpoint)
        if damage is None:
            return checkpoint
        logger.warning(f"checkpoint {checkpoint} is damaged ({damage}); falling back to the previous one")
    if requested == "latest":
        raise UsageError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
    foreign = [p.name for p in output_dir.iterdir() if p.name not in RUN_FILES and not p.name.startswith("checkpoint-")
               and not WATCHDOG_FILES.match(p.name)] if output_dir.is_dir() else []
    if foreign:
        raise UsageError(f"--output_dir {output_dir} holds other files ({', '.join(sorted(foreign)[:3])}) and no "
                         f"checkpoint; pass --overwrite_output_dir or choose another folder")
    return Path(args.branch_from) if args.branch_from else None  # a branch without a checkpoint of its own yet


def is_branch_point(args: TrainArguments, checkpoint: Path | None) -> bool:
    """Whether the checkpoint a run loads is its --branch_from, in another run's folder (not the branch's own)."""
    return bool(args.branch_from) and checkpoint is not None and \
        checkpoint.resolve().parent != Path(args.output_dir).resolve()


def choose_checkpoint(accelerator, args: TrainArguments) -> Path | None:
    """The main process decides; every rank gets the same answer, or the same one-line refusal: a foreign
    --output_dir, a missing or damaged --resume_from_checkpoint, a checkpoint of another launch layout."""
    from accelerate.utils import broadcast_object_list

    choice: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            choice = [find_resume_checkpoint(args)]
        except UsageError as error:
            choice = [error]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    if isinstance(choice[0], UsageError):
        raise choice[0]
    if choice[0] is not None:
        saved = TrainState(**json.loads((choice[0] / TRAINER_STATE).read_text()))
        current = TrainState(distributed_type=accelerator.distributed_type.value, zero_stage=zero_stage_of(accelerator),
                             optim=args.optim)
        problem = layout_mismatch(saved, current, choice[0])
        if problem:
            raise UsageError(f"checkpoint {choice[0]} {problem}; {start_afresh_advice(args)}")
    return choice[0]


def resume(accelerator, checkpoint: Path | None, state: TrainState, args: TrainArguments, scheduler,
           mixture: Mixture | None = None) -> TrainState:
    """Load the checkpoint (from choose_checkpoint) into the prepared objects and return its state, mapped onto this
    launch (and, with a mixture, the mixture's blend onto the checkpoint's). None: start afresh, deleting the
    checkpoints first with --overwrite_output_dir."""
    if checkpoint is None:
        if args.overwrite_output_dir and accelerator.is_main_process:
            for old in list_checkpoints(Path(args.output_dir)):
                remove_checkpoint(old)
        return state
    saved = TrainState(**json.loads((checkpoint / TRAINER_STATE).read_text()))
    reshard = saved.distributed_type == "DEEPSPEED" and saved.num_processes != state.num_processes
    # ZeRO shards are cut for their world size: another one loads them through DeepSpeed's universal format.
    into = Path(args.output_dir) / BRANCH_UNIVERSAL / UNIVERSAL if is_branch_point(args, checkpoint) else None
    universal = universal_copy(accelerator, checkpoint, checkpoint_damage, into) if reshard else None
    peaks = peak_rates(scheduler)  # this run's, which the load replaces with the checkpoint's
    try:
        if universal is not None:
            load_universal(accelerator, universal)
        else:
            accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, ValueError, KeyError, AssertionError) as error:  # another model shape, etc.
        raise UsageError(f"checkpoint {checkpoint} does not fit this run ({' '.join(str(error).split())[:240]}); "
                         f"rerun with the flags it was saved with, or use another --output_dir") from None
    # Accelerate restores its count of micro-batches, the saved run's: under another accumulation (another process
    # count) the optimizer steps would fall between this run's boundaries. Every resume starts at a boundary.
    accelerator.step = 0
    logger.info(f"resumed from {checkpoint} at step {saved.step} (epoch {saved.epoch}, step {saved.step_in_epoch})"
                + (f", resharded from {saved.num_processes} to {state.num_processes} processes" if reshard else ""))
    # At its branch point a branch says in its own line which rate it goes on from (checkpointing.branch)
    take_up_changed_schedule(saved, state, scheduler, peaks,
                             accelerator.is_main_process and not is_branch_point(args, checkpoint))
    logged_epoch = saved.epochs_done() if saved.train_blocks and saved.global_batch_blocks else None
    changed = carry_mixture_position(saved, state, mixture) if mixture is not None else None
    if mixture is None:
        carry_data_position(saved, state)
    for launch_field in ("num_processes", "distributed_type", "zero_stage", "global_batch_blocks", "train_blocks",
                         "schedule", "mixture"):
        setattr(saved, launch_field, getattr(state, launch_field))
    if accelerator.is_main_process:  # a lower --save_total_limit than the run had: before the next save needs room
        prune_checkpoints(Path(args.output_dir), args.save_total_limit)
    if logged_epoch is not None:  # another epoch length (a changed mixture or corpus) counts on from where it was
        saved.epoch_offset += logged_epoch - saved.epochs_done()
    if changed and accelerator.is_main_process:
        logger.warning(f"{changed}; the logged epoch goes on from {logged_epoch:.4f}, now in epochs of "
                       f"{mixture.epoch_source} read once ({len(mixture)} blocks)")
    return saved


def layout_mismatch(saved: TrainState, current: TrainState, checkpoint: Path) -> str | None:
    """Why a checkpoint's shards cannot load in this launch, or None."""
    zero = saved.distributed_type == "DEEPSPEED"
    if zero != (current.distributed_type == "DEEPSPEED"):
        return (f"was written {'with' if zero else 'without'} DeepSpeed and this launch runs "
                f"{'without' if zero else 'with'} it; resume with the accelerate config it was saved with"
                + (f" (or take its weights with {checkpoint}/zero_to_fp32.py)" if zero else ""))
    if saved.optim is not None and saved.optim != current.optim:
        return (f"was trained with --optim {saved.optim} and this run has --optim {current.optim}; resume with "
                f"--optim {saved.optim}")
    if zero and saved.zero_stage is not None and saved.zero_stage != current.zero_stage:
        return (f"holds ZeRO-{saved.zero_stage} shards and this launch runs ZeRO-{current.zero_stage}; resume with "
                f"accelerate_configs/zero{saved.zero_stage}.yaml")
    return None


def start_afresh_advice(args: TrainArguments) -> str:
    if args.branch_from:
        return "a branch is launched as its parent was (its accelerate config and --optim)"
    if args.resume_from_checkpoint not in (None, "latest"):
        return "or pass another --resume_from_checkpoint"
    return (f"or start a new run with another --output_dir (or --overwrite_output_dir, which deletes the "
            f"checkpoints in {args.output_dir})")


def take_up_changed_schedule(saved: TrainState, current: TrainState, scheduler, peaks: list[float] | None,
                             main_process: bool) -> None:
    """A resume with another learning rate, schedule, warmup or length trains at this run's schedule evaluated at the
    checkpoint's step (docs/schedules.md), and says so once, with the rate the next step gets. An unchanged
    schedule is left as the checkpoint restored it, to the bit. A DeepSpeed config's own scheduler is left alone."""
    if saved.schedule is None or saved.schedule == current.schedule:
        return
    def change(key: str) -> str:
        if key not in saved.schedule:
            return f"{key} {current.schedule[key]} (new)"
        if key not in current.schedule:
            return f"{key} {saved.schedule[key]} (gone)"
        return f"{key} {saved.schedule[key]} -> {current.schedule[key]}"

    keys = [*current.schedule, *(key for key in saved.schedule if key not in current.schedule)]
    changes = ", ".join(change(key) for key in keys if saved.schedule.get(key) != current.schedule.get(key))
    if peaks is None:
        taken = ("the DeepSpeed config's 'scheduler' block sets the learning rate (DeepSpeed restores its step count "
                 "and takes its other settings from the config)")
    else:
        rate = take_up_schedule(scheduler, peaks)
        taken = (f"step {saved.step + 1} trains at {rate:.4g}, this run's schedule at step {saved.step} (the "
                 f"checkpoint's schedule gave {saved.lr:.4g})")
    if main_process:
        logger.warning(f"the learning-rate schedule changed since the checkpoint ({changes}): {taken}")


def carry_data_position(saved: TrainState, current: TrainState) -> None:
    """Map the checkpoint's place in its epoch onto this run's data and global batch.

    Every global batch size reads the same (seed, epoch) permutation of the blocks, so a new batch size resumes
    after the blocks already read (repeating fewer than one batch of them). Different data has no such place:
    its epoch starts from the beginning.
    """
    if saved.train_blocks and saved.train_blocks != current.train_blocks:
        logger.warning(f"the training data has {current.train_blocks} blocks, the checkpoint's had "
                       f"{saved.train_blocks}: the data changed, so epoch {saved.epoch} starts from its beginning")
        saved.step_in_epoch = 0
    elif saved.global_batch_blocks != current.global_batch_blocks:
        blocks_read = saved.step_in_epoch * saved.global_batch_blocks
        saved.step_in_epoch = blocks_read // current.global_batch_blocks
        resume_at = saved.step_in_epoch * current.global_batch_blocks
        logger.warning(f"global batch changed from {saved.global_batch_blocks} to {current.global_batch_blocks} "
                       f"blocks: epoch {saved.epoch} resumes at block {resume_at} of its order "
                       f"({blocks_read} were read)")
    if saved.step_in_epoch >= current.steps_per_epoch():
        saved.epoch, saved.step_in_epoch = saved.epoch + 1, 0


def carry_mixture_position(saved: TrainState, current: TrainState, mixture: Mixture) -> str | None:
    """Map the checkpoint's position onto this launch's epochs of the mixture, and continue its blend there (from
    the blocks read: a new global batch re-reads fewer than one batch). Returns what changed in the mixture, if
    anything, to be said once."""
    steps = saved.position() // current.global_batch_blocks
    changed = resume_mixture(mixture, saved.mixture, steps * current.global_batch_blocks)
    saved.epoch, saved.step_in_epoch = divmod(steps, current.steps_per_epoch())
    current.mixture = mixture.state(steps * current.global_batch_blocks)
    return changed


def save_final_model(accelerator, model, tokenizer, args: TrainArguments) -> None:
    """A complete Hugging Face model (safetensors) under ZeRO-2/3 too: the state dict is gathered on every rank.

    Stored as `save_pretrained` stores it: a tied weight once (the gathered state dict holds a separate copy under
    each name, which save_pretrained would write twice), tied back by `from_pretrained`."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        for tied_copy in getattr(unwrapped, "all_tied_weights_keys", None) or {}:
            state_dict.pop(tied_copy, None)
        unwrapped.config.use_cache = True
        try:
            unwrapped.save_pretrained(args.output_dir, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(args.output_dir)
            follow_umask(Path(args.output_dir).glob("*.safetensors"))
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"--output_dir {args.output_dir}: writing the final model failed "
                                  f"({first_line(error)}); the last checkpoint is complete: free space or fix the "
                                  f"folder, then rerun the same command to write the model again") from None
        logger.info(f"saved the final model to {args.output_dir}")
    accelerator.wait_for_everyone()


def launch_state(accelerator, global_batch_blocks: int, train_blocks: int, schedule: dict[str, Any],
                 mixture: Mixture | None = None, optim: str = "adamw") -> TrainState:
    """A fresh state that records this launch's layout, schedule, mixture and optimizer, to which a checkpoint's is
    compared on resume."""
    return TrainState(num_processes=accelerator.num_processes, distributed_type=accelerator.distributed_type.value,
                      global_batch_blocks=global_batch_blocks, train_blocks=train_blocks,
                      zero_stage=zero_stage_of(accelerator), schedule=schedule,
                      mixture=mixture.state(0) if mixture is not None else None, optim=optim)
