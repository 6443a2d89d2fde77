"""An explicit causal-LM pretraining loop on Hugging Face Accelerate (+ DeepSpeed ZeRO), readable top to bottom.

    python train_loop.py --max_steps 2                                     # one process, debugger-friendly
    accelerate launch --config_file accelerate_configs/zero2.yaml train_loop.py [flags]

`main()` is the outline of a run; each stage is a short function below it, and `train()` is the loop itself:
forward, backward, clip, step, schedule, log, evaluate, save. What supports it (flags, the launch, checkpoints,
metrics, the chunked loss, stop signals) lives in the `pretrain/` package, one concern per module.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

import data_utils
from pretrain.base.arguments import DataArguments, ModelArguments, TrainArguments, demo_defaults_in_use, \
    is_demo, order_seed, parse_args, split_seed
from pretrain.base.errors import SEEN_BY_EVERY_RANK, CheckpointError, DataError, Diverged, NonFiniteLoss, UsageError, \
    exit_with, first_line
from pretrain.base.faults import FaultInjector
from pretrain.base.state import TrainState
from pretrain.checkpointing.background_save import CheckpointWriter
from pretrain.checkpointing.branch import check_branch, start_branch
from pretrain.checkpointing.checkpoints import choose_checkpoint, launch_state, resume, save_checkpoint, \
    save_final_model
from pretrain.checkpointing.output_lock import hold_output_dir
from pretrain.data.demo_corpus import print_sample
from pretrain.data.document_mask import BlockCollator, use_document_mask
from pretrain.data.mixture import Mixture
from pretrain.distributed.launch import build_accelerator, create_output_dirs, deepspeed_config, \
    fill_deepspeed_config, run_program, warn_if_precision_is_emulated
from pretrain.distributed.restarts import say_restart
from pretrain.evaluation.heldout import eval_blocks, evaluate_sources, token_byte_lengths, validation_sets
from pretrain.evaluation.tasks import Task, load_tasks, score_tasks
from pretrain.model.chunked_loss import compute_loss_in_chunks, losses_of
from pretrain.model.loading import build_config, load_config, load_tokenizer, load_weights, resolve_block_size
from pretrain.model.speedups import apply_liger_kernel, compile_layers
from pretrain.optim.gradients import clip_gradients, grad_norm_after_step
from pretrain.optim.optimizers import build_optimizer
from pretrain.optim.schedule import build_scheduler, check_schedule, schedule_of
from pretrain.preflight import describe_model, describe_run
from pretrain.resilience.run_control import RunControl, ensure_finite, ensure_savable
from pretrain.resilience.step_guard import StepGuard, rewind
from pretrain.telemetry.layer_stats import LayerTelemetry
from pretrain.telemetry.metrics import LogWindow, MetricsLogger, device_peak_tflops, flops_per_token, throughput
from pretrain.telemetry.tracking import check_tracker

logger = logging.getLogger("train_loop")


@dataclass
class Prepared:
    """What `accelerator.prepare` returned: the wrapped model, optimizer, schedule and loaders."""
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loaders: dict[str, Any]  # by source name ("" for one corpus); empty without evaluation


@dataclass
class RunPlan:
    """The run's constants, fixed before the first step."""
    total_steps: int
    steps_per_epoch: int
    tokens_per_step: int  # over all processes and micro-steps
    flops_per_token: int
    peak_tflops: float | None  # of one device, for MFU
    block_size: int
    mixture: Mixture | None  # --train_mixture's blend, whose reads per source are logged
    token_bytes: torch.Tensor  # the text bytes of each token id, for eval_bpb
    tasks: list[Task]  # --eval_tasks, encoded
    max_length: int  # the model's context, to which a task's prompt is cut on the left
    schedule: dict[str, Any]  # what shapes the learning rate, resolved to steps (pretrain.optim.schedule)


def main(argv: list[str] | None = None) -> str:
    # Parse: every flag and folder is checked before any work.
    model_args, data_args, args = parse_args(argv)
    check_tracker(args)
    check_schedule(args)
    check_branch(args)  # before the output folder is made: it must not be in the parent's
    create_output_dirs(args)
    demo = is_demo(model_args, data_args)  # before load_tokenizer_and_config points the demo at its corpus

    # Accelerator: this process joins the launch (DeepSpeed plugin, process group, logging).
    accelerator = build_accelerator(args)
    with hold_output_dir(accelerator, args.output_dir):  # one run per folder: a second one is refused
        torch.manual_seed(args.seed)
        if demo and accelerator.is_main_process:  # its defaults are not the ones --help shows
            logger.info(f"the built-in demo, with its own defaults for the flags not given: "
                        f"{demo_defaults_in_use(data_args, args)}")

        # What the run resumes from, the tokenizer, the tasks and the model come before the data build, so that a
        # foreign --output_dir, a bad task file or a model that cannot be built is refused before that work.
        checkpoint = choose_checkpoint(accelerator, args)
        tokenizer, config = load_tokenizer_and_config(model_args, data_args)
        tasks = load_tasks(args.eval_tasks, args.eval_tasks_num_fewshot, tokenizer)
        model = build_model(model_args, config, tokenizer, args)

        # Data, optimizer and schedule, all prepared for the launch's layout.
        data = load_data(accelerator, tokenizer, data_args, args)
        train_loader, eval_loaders, global_batch_blocks = build_loaders(accelerator, data, tokenizer, model_args, args)
        plan = plan_run(model, tokenizer, data.train, global_batch_blocks, data_args.block_size, args, tasks)
        optimizer = build_optimizer(model, args, deepspeed_config(accelerator))
        run = prepare(accelerator, model, optimizer, train_loader, eval_loaders, args, plan.schedule)

        # Resume from the newest complete checkpoint, if any (or a branch's --branch_from).
        state = launch_state(accelerator, global_batch_blocks, len(data.train), plan.schedule, plan.mixture,
                             args.optim)
        state = resume(accelerator, checkpoint, state, args, run.scheduler, plan.mixture)
        start_branch(accelerator, checkpoint, args, state, run.scheduler, plan.schedule, plan.mixture)  # --branch_from
        describe_run(accelerator, accelerator.unwrap_model(run.model), model_args, args, state, plan.total_steps,
                     plan.steps_per_epoch, plan.mixture)

        # The loop.
        run_config = {"model": asdict(model_args), "data": asdict(data_args), "train": asdict(args),
                      "num_processes": accelerator.num_processes, "total_steps": plan.total_steps}
        # RunControl exits first: when a rank is gone, a background write waits for its part in vain (one line instead).
        with MetricsLogger(accelerator, args, plan.total_steps, state, run_config) as metrics, \
                CheckpointWriter(accelerator, run.model, args.save_in_background) as writer, \
                RunControl(args, accelerator.num_processes, accelerator.process_index,
                           accelerator.local_process_index) as control:
            say_restart(accelerator, metrics, checkpoint, state.step)  # an attempt that torch elastic restarted
            ended = train(accelerator, run, plan, state, args, metrics, control, writer)
        if ended != "done":
            if accelerator.is_main_process:
                logger.warning(f"stopped by {ended} at step {state.step}; checkpoint saved in {args.output_dir}: "
                               f"rerun the same command to resume")
            return ended

        # Save the final Hugging Face model.
        save_final_model(accelerator, run.model, tokenizer, args)
        if demo:
            print_sample(accelerator.unwrap_model(run.model), tokenizer, accelerator)
        accelerator.end_training()
        return ended


# ======================================================================================================================
# The stages main() calls
# ======================================================================================================================

def load_tokenizer_and_config(model_args: ModelArguments, data_args: DataArguments):
    """The tokenizer and the model config with --config_overrides, and the block size that follows from it."""
    config = load_config(model_args)
    tokenizer = load_tokenizer(model_args, data_args, config)
    config = build_config(model_args, tokenizer, config)
    resolve_block_size(data_args, config)
    return tokenizer, config


def load_data(accelerator, tokenizer, data_args: DataArguments, args: TrainArguments):
    """Packed blocks (every rank helps build them, waiting on files, not in a collective)."""
    if data_args.train_mixture:
        data = data_utils.prepare_mixture(data_args, tokenizer, split_seed(args), order_seed(args),
                                          show_progress=accelerator.is_main_process)
    else:
        data = data_utils.prepare_data(data_args, tokenizer, seed=split_seed(args),
                                       show_progress=accelerator.is_main_process)
    logger.info(f"data: {json.dumps(data.stats)}")
    return data


def build_loaders(accelerator, data, tokenizer, model_args: ModelArguments, args: TrainArguments):
    """The train loader (global batches of whole blocks) and the eval loaders (one per mixture source), not yet
    prepared; with --attn_mask_type block_causal their batches carry positions that restart at each document."""
    global_batch_blocks = args.per_device_train_batch_size * accelerator.num_processes * \
        args.gradient_accumulation_steps
    pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    block_causal = model_args.attn_mask_type == "block_causal"
    collate = BlockCollator(data_utils.eos_token_id(tokenizer) if block_causal else None,
                            model_args.keep_boundary_targets)
    train_loader = data_utils.build_train_dataloader(data.train, args.per_device_train_batch_size, global_batch_blocks,
                                                     order_seed(args), args.dataloader_num_workers, pin_memory, collate)
    held_out, shares = validation_sets(data)
    eval_loaders = {}
    for name, validation in held_out.items() if args.eval_strategy != "no" else ():
        blocks = eval_blocks(args, len(validation), global_batch_blocks, len(data.train) // global_batch_blocks,
                             accelerator.num_processes, name, shares[name])
        eval_loaders[name] = data_utils.build_eval_dataloader(validation[:blocks], args.per_device_eval_batch_size,
                                                              args.dataloader_num_workers, pin_memory, collate)
    return train_loader, eval_loaders, global_batch_blocks


def plan_run(model, tokenizer, train, global_batch_blocks: int, block_size: int, args: TrainArguments,
             tasks: list[Task]) -> RunPlan:
    """The run's length (--max_steps, else --max_tokens, else epochs) and what its throughput is measured against.
    `train`: the training blocks, or a mixture (whose epoch is its epoch source read once); `tasks`: --eval_tasks."""
    steps_per_epoch = len(train) // global_batch_blocks
    tokens_per_step = global_batch_blocks * block_size
    if args.max_steps > 0:
        total_steps = args.max_steps
    elif args.max_tokens:
        total_steps = math.ceil(args.max_tokens / tokens_per_step)
    else:
        total_steps = math.ceil(args.num_train_epochs * steps_per_epoch)
    logger.info(f"{describe_model(model, block_size)}; {total_steps} steps of {global_batch_blocks} blocks "
                f"({steps_per_epoch} per epoch)")
    return RunPlan(total_steps, steps_per_epoch, tokens_per_step, flops_per_token=flops_per_token(model, block_size),
                   peak_tflops=device_peak_tflops(args), block_size=block_size,
                   mixture=train if isinstance(train, Mixture) else None,
                   token_bytes=token_byte_lengths(tokenizer, model.config.vocab_size),
                   tasks=tasks,
                   max_length=model.config.max_position_embeddings,
                   schedule=schedule_of(args, total_steps, tokens_per_step))


def build_model(model_args: ModelArguments, config, tokenizer, args: TrainArguments):
    """The weights (loaded or initialised), then what training changes about the model."""
    warn_if_precision_is_emulated(args)
    model = load_weights(model_args, config, tokenizer, args.seed)
    if model_args.attn_mask_type == "block_causal":
        use_document_mask(model)
    if args.use_liger_kernel:
        apply_liger_kernel(model, args)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    if args.loss_chunk_size:
        compute_loss_in_chunks(model, args.loss_chunk_size)
    if args.torch_compile:  # last, so that the compiled layers include the changes above
        compile_layers(model, args.torch_compile_backend, args.torch_compile_mode)
    return model


def prepare(accelerator, model, optimizer, train_loader, eval_loaders: dict[str, Any], args: TrainArguments,
            schedule: dict[str, Any]) -> Prepared:
    """Wrap everything for the launch's layout (DDP, ZeRO-2/3 or one process)."""
    from accelerate.utils import DummyScheduler

    fill_deepspeed_config(accelerator, args)
    warmup, total_steps = schedule["warmup_steps"], schedule["total_steps"]
    if warmup >= total_steps and accelerator.is_main_process:
        logger.warning(f"the warmup ({warmup} steps) is as long as the run ({total_steps} "
                       f"steps): the learning rate never reaches --learning_rate nor decays; lower --warmup_steps or "
                       f"--warmup_ratio, or train longer")
    ds_scheduler = (deepspeed_config(accelerator) or {}).get("scheduler")
    if ds_scheduler is not None:  # the user's DeepSpeed config owns the schedule (the chapter's does)
        if ds_scheduler.get("type") == "WarmupLR":
            logger.warning("the DeepSpeed config's WarmupLR warms up and then never decays the learning rate; "
                           "remove its 'scheduler' block to use --lr_scheduler_type")
        scheduler = DummyScheduler(optimizer, total_num_steps=total_steps, warmup_num_steps=warmup)
        model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        # Built on the prepared optimizer, whose parameter groups ZeRO-3 has rebuilt. With
        # step_scheduler_with_optimizer=False, Accelerate's wrapper steps it exactly once per call.
        scheduler = accelerator.prepare_scheduler(build_scheduler(optimizer, schedule))
    eval_loaders = {name: accelerator.prepare_data_loader(loader) for name, loader in eval_loaders.items()}
    return Prepared(model, optimizer, scheduler, train_loader, eval_loaders)


# ======================================================================================================================
# The loop
# ======================================================================================================================

def train(accelerator, run: Prepared, plan: RunPlan, state: TrainState, args: TrainArguments,
          metrics: MetricsLogger, control: RunControl, writer: CheckpointWriter) -> str:
    """Optimizer steps until plan.total_steps; returns why the loop ended: 'done' or the stop signal's name."""
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    window = LogWindow(accelerator.device, len(plan.mixture.names) if plan.mixture else 0)
    guard = StepGuard(accelerator, optimizer, args, state, accelerator.unwrap_model(model).config.vocab_size)
    faults = FaultInjector(accelerator.unwrap_model(model), accelerator.process_index)
    telemetry = LayerTelemetry(accelerator, model, optimizer, args)  # per-layer norms every --telemetry_steps
    stopping = False
    model.train()
    for micro_batches in optimizer_steps(accelerator, run.train_loader, state, plan, window, faults):
        # Forward and backward on each micro-batch; at the last one the gradients are reduced and clipped, and the
        # guard decides whether the step is applied (under DeepSpeed it decides inside the engine's step).
        skipped = False
        telemetry.start(state.step + 1)
        for batch in micro_batches:
            sources = batch.pop("source", None)  # a mixture's blocks name their source, which is no model input
            with accelerator.accumulate(model):
                with window.timed_forward():  # this rank's own compute, before the step's first collective
                    loss, block_sums = losses_of(model, batch, sources, chunked=args.loss_chunk_size > 0)
                    loss = faults.loss(loss, state)  # only under PRETRAIN_FAULT (pretrain/base/faults.py)
                guard.add_loss(loss, last=accelerator.sync_gradients)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    telemetry.gradients()  # before clipping
                    clip_norm = clip_gradients(accelerator, model, args.max_grad_norm)
                    skipped = guard.skips(clip_norm)
                if not skipped:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window.add_loss(loss, sources, block_sums)
        telemetry.finish(metrics)  # on its steps: one all-gather, values for this step's record

        # Schedule and bookkeeping: a skipped step keeps the schedule going; an fp16 overflow makes it wait.
        if skipped or not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        epoch_done = state.advance(plan.tokens_per_step, plan.steps_per_epoch)
        window.end_step(skipped)
        metrics.advance()
        control.step_done(state.step)
        last = state.step == plan.total_steps
        if skipped:
            guard.say_skipped(state, metrics)
        if guard.needs_rewind(args):  # skips in a row: back to the newest checkpoint before them, past the data
            with window.set_aside("save_s"), control.paused():
                writer.wait_everywhere()  # a checkpoint still being written may be the one to go back to
                rewind(accelerator, scheduler, state, args, guard, plan.mixture)
                metrics.log({"step": state.step, "event": "rewind", **guard.records["rewinds"][-1]})
        guard.stop_if_diverged(accelerator, args, state.step, scheduler.get_last_lr()[0], metrics, writer)

        # Log: the loss over the window's micro-batches and processes (and per source of a mixture), throughput, memory.
        if is_due(args.logging_strategy, args.logging_steps, state, epoch_done) or last or telemetry.due:
            record = log_window(accelerator, window, plan, state, args, metrics, lr=scheduler.get_last_lr()[0],
                                grad_norm=grad_norm_after_step(accelerator, model, clip_norm, args.optim))
            control.warn_if_a_stop_cannot_save(record["step_time_s"])

        # Once any rank was asked to stop, only the save is left: the launcher kills workers 30 s after a signal.
        stopping = control.stop.agreed()

        # Evaluate: loss and bits per byte on the held-out blocks, and the multiple-choice tasks.
        blocks_due, tasks_due = evaluations_due(args, run, plan, state, epoch_done, last)
        if (blocks_due or tasks_due) and not stopping:
            with window.set_aside("eval_s"), control.paused():
                record = evaluate_sources(accelerator, model, run.eval_loaders, plan.mixture, args.loss_chunk_size,
                                          plan.token_bytes) if blocks_due else {}
                if tasks_due:
                    record.update(score_tasks(accelerator, model, plan.tasks, args.per_device_eval_batch_size,
                                              plan.max_length, args.output_dir, state.step))
                metrics.log({"step": state.step, **record})

        # Save. The last step is saved too, so that rerunning a finished command (or raising --max_steps) resumes
        # from the end rather than redoing the tail after the last save_steps checkpoint.
        if is_due(args.save_strategy, args.save_steps, state, epoch_done) or stopping or \
                (last and args.save_strategy != "no"):
            with window.set_aside("save_s"), control.paused():
                ensure_savable(accelerator, model, window.loss_sum, state.step, args)
                state.lr = scheduler.get_last_lr()[0]
                state.mixture = plan.mixture.state(state.position()) if plan.mixture else None
                save_checkpoint(accelerator, state, args, writer)
        if stopping:
            break
    with window.set_aside("save_s"), control.paused():
        writer.wait(last=True)  # the last checkpoint is complete before the run ends
    return (control.stop.signal_name or "signal on another rank") if stopping else "done"


def optimizer_steps(accelerator, train_loader, state: TrainState, plan: RunPlan, window: LogWindow,
                    faults: FaultInjector):
    """The micro-batches of each optimizer step still to take, from the state's place in its epoch onwards.

    Each epoch sets the sampler's epoch and skips the batches a checkpoint had already read (by index: the skipped
    blocks are never loaded). The loop advances `state` between steps, and an epoch's roll-over shows here.
    """
    accumulation = accelerator.gradient_accumulation_steps
    if state.step >= plan.total_steps:
        logger.info(f"the checkpoint is at step {state.step} of {plan.total_steps}: nothing left to train")
    while state.step < plan.total_steps:
        epoch, start = state.epoch, state.step_in_epoch
        train_loader.set_epoch(epoch)
        batches = faults.slow_reads(iter(accelerator.skip_first_batches(train_loader, start * accumulation)
                                         if start else train_loader), state)  # PRETRAIN_FAULT=slow_data delays them
        steps_left = min(plan.steps_per_epoch - start, plan.total_steps - state.step)
        for taken in range(1, steps_left + 1):
            yield step_batches(batches, accumulation, window, state)
            expected = (epoch, start + taken) if start + taken < plan.steps_per_epoch else (epoch + 1, 0)
            if (state.epoch, state.step_in_epoch) != expected:
                break  # a rewind moved the data position: read on from there


def step_batches(batches, accumulation: int, window: LogWindow, state: TrainState):
    """One optimizer step's micro-batches, read one at a time as the forward asks for them."""
    for _ in range(accumulation):
        batch = window.timed_next(batches)
        if batch is None:
            raise RuntimeError(f"the data loader ended inside step {state.step + 1} (epoch {state.epoch}, step "
                               f"{state.step_in_epoch} of it): the data position is inconsistent")
        yield batch


def evaluations_due(args: TrainArguments, run: Prepared, plan: RunPlan, state: TrainState, epoch_done: bool,
                    last: bool) -> tuple[bool, bool]:
    """Whether the held-out blocks, and the tasks, are evaluated after this step (the tasks at each evaluation unless
    --eval_tasks_steps says otherwise); both at the last step."""
    evaluation = args.eval_strategy != "no" and (
        is_due(args.eval_strategy, args.eval_steps or args.save_steps, state, epoch_done) or last)
    every = args.eval_tasks_steps
    return bool(run.eval_loaders) and evaluation, bool(plan.tasks) and (
        is_due("steps", every, state, epoch_done) or last if every else evaluation)


def is_due(strategy: str, every: int, state: TrainState, epoch_done: bool) -> bool:
    """Whether a 'steps' or 'epoch' strategy (--logging/eval/save_strategy) acts after this step."""
    return (strategy == "steps" and state.step % every == 0) or (strategy == "epoch" and epoch_done)


def log_window(accelerator, window: LogWindow, plan: RunPlan, state: TrainState, args: TrainArguments,
               metrics: MetricsLogger, lr: float, grad_norm: float | None) -> dict[str, Any]:
    """The log record of the steps since the last one (the loss is gathered across processes with every rank's
    timings, for the straggler fields: one sync). A mixture's loss is token-weighted over every source, and each
    source's loss, blocks and tokens seen are added."""
    summed = metrics.stragglers.gather(accelerator, window.by_source if plan.mixture else
                                       window.loss_sum / max(window.micro_steps, 1), window.per_step())
    if plan.mixture is None:
        mean_loss, by_source = (summed / accelerator.num_processes).item(), {}
    else:
        mean_loss, by_source = plan.mixture.source_losses(summed, state.position(), plan.block_size)
    if window.micro_steps == 0:
        mean_loss = None  # every step of the window was skipped
    else:
        ensure_finite(mean_loss, state.step, args)
    state.elapsed_s += window.wall_seconds()
    record = {"step": state.step, "epoch": round(state.epochs_done(), 4), "loss": mean_loss,
              "lr": lr, "grad_norm": grad_norm, "tokens_seen": state.tokens_seen,
              "elapsed_s": round(state.elapsed_s, 3), "skipped_steps": (state.guard or {}).get("skipped_steps", 0),
              **throughput(window, plan.tokens_per_step, accelerator.num_processes, plan.flops_per_token,
                           plan.peak_tflops), **by_source, **metrics.stragglers.fields(state.step)}
    metrics.log(record)
    window.reset()
    return record


def cli(argv: list[str] | None = None) -> None:
    """main() with the errors a user can fix turned into one line (and exit status 1) instead of a traceback."""
    try:
        main(argv)
    except (UsageError, DataError, NonFiniteLoss, Diverged, CheckpointError) as error:
        exit_with(f"error: {error}", every_rank_has_it=isinstance(error, SEEN_BY_EVERY_RANK))
    except torch.OutOfMemoryError as error:  # the most common bad input on a GPU: a batch that does not fit
        what = ". ".join(first_line(error).split(". ")[:2])  # "CUDA out of memory. Tried to allocate 9.27 GiB"
        exit_with(f"error: out of memory ({what}); lower --per_device_train_batch_size (raise "
                  f"--gradient_accumulation_steps to keep the global batch), or add --gradient_checkpointing or "
                  f"--loss_chunk_size 4096, or shard with accelerate_configs/zero2.yaml; rerunning resumes from the "
                  f"last checkpoint", every_rank_has_it=False)


if __name__ == "__main__":
    run_program(cli)
