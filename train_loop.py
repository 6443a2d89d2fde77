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
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

import data_utils
from data_utils import DataArguments, DataError
from pretrain.arguments import ModelArguments, TrainArguments, is_demo, parse_args
from pretrain.checkpoints import TrainState, choose_checkpoint, launch_state, resume, save_checkpoint, \
    save_final_model
from pretrain.chunked_loss import block_losses_in_chunks, compute_loss_in_chunks
from pretrain.errors import SEEN_BY_EVERY_RANK, CheckpointError, NonFiniteLoss, UsageError, exit_with, first_line
from pretrain.launch import build_accelerator, create_output_dirs, deepspeed_config, fill_deepspeed_config, \
    zero_stage_of
from pretrain.loading import build_config, load_tokenizer, load_weights, resolve_block_size
from pretrain.metrics import MetricsLogger, StepTimer, device_peak_tflops, flops_per_token, numel, throughput
from pretrain.output_lock import hold_output_dir
from pretrain.run_control import RunControl, ensure_finite, ensure_savable
from pretrain.speedups import apply_liger_kernel, compile_layers

logger = logging.getLogger("train_loop")


@dataclass
class Prepared:
    """What `accelerator.prepare` returned: the wrapped model, optimizer, schedule and loaders."""
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any | None


@dataclass
class RunPlan:
    """The run's constants, fixed before the first step."""
    total_steps: int
    global_batch_blocks: int  # blocks per optimizer step, over all processes and micro-steps
    block_size: int
    flops_per_token: int


def main(argv: list[str] | None = None) -> str:
    model_args, data_args, args = parse_args(argv)
    create_output_dirs(args)
    demo = is_demo(model_args, data_args)  # before load_data, which points the demo at its corpus
    accelerator = build_accelerator(args)
    with hold_output_dir(accelerator, args.output_dir):  # one run per folder: a second one is refused
        torch.manual_seed(args.seed)

        tokenizer, config, data = load_data(accelerator, model_args, data_args, args)
        train_loader, eval_loader, global_batch_blocks = build_loaders(accelerator, data, data_args, args)
        total_steps = count_steps(len(data.train), global_batch_blocks, args)

        model = build_model(model_args, config, tokenizer, args)
        logger.info(f"model: {sum(map(numel, model.parameters())) / 1e6:.2f}M parameters; {total_steps} steps "
                    f"of {global_batch_blocks} blocks ({len(data.train) // global_batch_blocks} per epoch)")
        plan = RunPlan(total_steps, global_batch_blocks, data_args.block_size,
                       flops_per_token(model, data_args.block_size))
        optimizer = build_optimizer(model, args, accelerator)
        run = prepare(accelerator, model, optimizer, train_loader, eval_loader, args, total_steps)

        state = launch_state(accelerator, global_batch_blocks, len(data.train), schedule_of(args, total_steps))
        state = resume(accelerator, choose_checkpoint(accelerator, args), state, args, run.scheduler)

        run_config = {"model": asdict(model_args), "data": asdict(data_args), "train": asdict(args),
                      "num_processes": accelerator.num_processes, "total_steps": total_steps}
        with MetricsLogger(accelerator, args, total_steps, state, run_config) as metrics, \
                RunControl(accelerator.num_processes, args.profile_dir, accelerator.process_index) as control:
            ended = train(accelerator, run, plan, state, args, metrics, control)
        if ended != "done":
            if accelerator.is_main_process:
                logger.warning(f"stopped by {ended} at step {state.step}; checkpoint saved in {args.output_dir}: "
                               f"rerun the same command to resume")
            return ended

        save_final_model(accelerator, run.model, tokenizer, args)
        if demo:
            print_sample(run.model, tokenizer, accelerator)
        accelerator.end_training()
        return ended


# ======================================================================================================================
# The stages main() calls
# ======================================================================================================================

def load_data(accelerator, model_args: ModelArguments, data_args: DataArguments, args: TrainArguments):
    """Tokenizer, config and packed blocks (every rank helps build them, waiting on files, not in a collective)."""
    tokenizer = load_tokenizer(model_args, data_args)
    config = build_config(model_args, tokenizer)
    resolve_block_size(data_args, config)
    data = data_utils.prepare_data(data_args, tokenizer, seed=args.seed, show_progress=accelerator.is_main_process)
    logger.info(f"data: {json.dumps(data.stats)}")
    return tokenizer, config, data


def build_loaders(accelerator, data, data_args: DataArguments, args: TrainArguments):
    """The train loader (global batches of whole blocks) and the optional eval loader, not yet prepared."""
    global_batch_blocks = args.per_device_train_batch_size * accelerator.num_processes * \
        args.gradient_accumulation_steps
    pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    train_loader = data_utils.build_train_dataloader(data.train, args.per_device_train_batch_size, global_batch_blocks,
                                                     args.seed, args.dataloader_num_workers, pin_memory)
    eval_loader = None
    if data.validation is not None and args.eval_strategy != "no":
        eval_loader = data_utils.build_eval_dataloader(data.validation[: args.max_eval_samples],
                                                       args.per_device_eval_batch_size,
                                                       args.dataloader_num_workers, pin_memory)
    return train_loader, eval_loader, global_batch_blocks


def count_steps(num_blocks: int, global_batch_blocks: int, args: TrainArguments) -> int:
    steps_per_epoch = num_blocks // global_batch_blocks
    return args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)


def build_model(model_args: ModelArguments, config, tokenizer, args: TrainArguments):
    """The weights (loaded or initialised), then what training changes about the model."""
    model = load_weights(model_args, config, tokenizer, args.seed)
    if args.use_liger_kernel:
        apply_liger_kernel(model, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if args.loss_chunk_size:
        compute_loss_in_chunks(model, args.loss_chunk_size)
    if args.torch_compile:  # last, so that the compiled layers include the changes above
        compile_layers(model, args.torch_compile_backend, args.torch_compile_mode)
    return model


def build_optimizer(model, args: TrainArguments, accelerator):
    """AdamW without weight decay on biases and norm weights (the 1-D parameters); fused kernels where available."""
    from accelerate.utils import DummyOptim

    low_precision = {p.dtype for p in model.parameters()} & {torch.bfloat16, torch.float16}
    if low_precision and deepspeed_config(accelerator) is None:
        logger.warning(f"the weights are {low_precision.pop()} and, without DeepSpeed, AdamW updates them in place: "
                       f"updates smaller than their precision are lost; keep --torch_dtype float32 and pass --bf16")
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            # ZeRO-3 may have partitioned the weights already: their full shape is ds_shape
            (decay if len(getattr(parameter, "ds_shape", parameter.shape)) >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    hyper = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if "optimizer" in (deepspeed_config(accelerator) or {}):
        return DummyOptim(groups, weight_decay=args.weight_decay, **hyper)
    return torch.optim.AdamW(groups, fused=True, **hyper)


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


def prepare(accelerator, model, optimizer, train_loader, eval_loader, args: TrainArguments,
            total_steps: int) -> Prepared:
    """Wrap everything for the launch's layout (DDP, ZeRO-2/3 or one process)."""
    from accelerate.utils import DummyScheduler

    fill_deepspeed_config(accelerator, args)
    warmup = warmup_steps_of(args, total_steps)
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
        scheduler = accelerator.prepare_scheduler(build_scheduler(optimizer, args, total_steps))
    eval_loader = accelerator.prepare_data_loader(eval_loader) if eval_loader is not None else None
    return Prepared(model, optimizer, scheduler, train_loader, eval_loader)


# ======================================================================================================================
# The loop
# ======================================================================================================================

def train(accelerator, run: Prepared, plan: RunPlan, state: TrainState, args: TrainArguments,
          metrics: MetricsLogger, control: RunControl) -> str:
    """Run optimizer steps until plan.total_steps; returns why it ended: 'done' or the signal name."""
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    steps_per_epoch = len(run.train_loader) // args.gradient_accumulation_steps
    tokens_per_step = plan.global_batch_blocks * plan.block_size
    peak_tflops = device_peak_tflops(args)
    uses_deepspeed = accelerator.state.deepspeed_plugin is not None
    eval_every = args.eval_steps or args.save_steps
    timer = StepTimer()
    loss_sum = torch.zeros((), device=accelerator.device)
    micro_steps = 0
    grad_norm = None
    model.train()
    if state.step >= plan.total_steps:
        logger.info(f"the checkpoint is at step {state.step} of {plan.total_steps}: nothing left to train")
    while state.step < plan.total_steps:
        run.train_loader.set_epoch(state.epoch)
        skip = state.step_in_epoch * args.gradient_accumulation_steps
        # Skipping works on batch indices only: the skipped blocks are never read.
        loader = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
        iterator = iter(loader)
        steps_before = state.step
        while state.step < plan.total_steps and (batch := timer.timed_next(iterator)) is not None:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = grad_norm_of(accelerator, model, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            micro_steps += 1
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:  # an fp16 overflow skips the step: the schedule waits
                scheduler.step()
            if uses_deepspeed:
                grad_norm = model.get_global_grad_norm()
            state.step += 1
            state.tokens_seen += tokens_per_step
            state.step_in_epoch += 1
            epoch = state.epoch + state.step_in_epoch / steps_per_epoch
            epoch_done = state.step_in_epoch == steps_per_epoch
            if epoch_done:  # roll over before any save, so that a checkpoint never points past its epoch's end
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            timer.steps += 1
            metrics.advance()
            control.profiler.step()
            last = state.step == plan.total_steps
            if should(args.logging_strategy, args.logging_steps, state.step, epoch_done) or last:
                mean_loss = accelerator.reduce(loss_sum / micro_steps, reduction="mean").item()
                ensure_finite(mean_loss, state.step, args)
                state.elapsed_s += time.perf_counter() - timer.start
                metrics.log({"step": state.step, "epoch": round(epoch, 4), "loss": mean_loss,
                             "lr": scheduler.get_last_lr()[0],
                             "grad_norm": None if grad_norm is None else float(grad_norm),
                             "tokens_seen": state.tokens_seen, "elapsed_s": round(state.elapsed_s, 3),
                             **throughput(timer, tokens_per_step, accelerator.num_processes, plan.flops_per_token,
                                          peak_tflops)})
                loss_sum.zero_()
                micro_steps = 0
                timer.reset()
            stopping = control.stop.agreed()  # then only the save: the launcher kills workers 30 s after a signal
            if run.eval_loader is not None and not stopping and \
                    (should(args.eval_strategy, eval_every, state.step, epoch_done) or last):
                metrics.log({"step": state.step,
                             **evaluate(accelerator, model, run.eval_loader, args.loss_chunk_size)})
            # The last step is saved too, so that rerunning a finished command (or raising --max_steps) resumes
            # from the end rather than redoing the tail after the last save_steps checkpoint.
            final_save = last and args.save_strategy != "no"
            if should(args.save_strategy, args.save_steps, state.step, epoch_done) or stopping or final_save:
                ensure_savable(accelerator, model, loss_sum, state.step, args)
                state.lr = scheduler.get_last_lr()[0]
                save_checkpoint(accelerator, state, args)
            if stopping:
                return control.stop.signal_name or "signal on another rank"
            if epoch_done:
                break
        if state.step == steps_before:
            raise RuntimeError(f"epoch {state.epoch} gave no optimizer step (skipped {skip} batches of "
                               f"{len(run.train_loader)}): the data position is inconsistent")
    return "done"


def grad_norm_of(accelerator, model, max_grad_norm: float):
    """Clip (plain/DDP) or read DeepSpeed's norm; returns a tensor or float that is read only when logged."""
    if accelerator.state.deepspeed_plugin is not None:
        return None  # DeepSpeed clips inside its step; the norm is read after it
    return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))


def should(strategy: str, every: int, step: int, epoch_done: bool) -> bool:
    return (strategy == "steps" and step % every == 0) or (strategy == "epoch" and epoch_done)


def evaluate(accelerator, model, eval_loader, chunk_size: int) -> dict[str, float]:
    """Mean token loss and perplexity over all validation blocks, gathered across processes."""
    model.eval()
    block_losses = []
    with torch.no_grad():
        for batch in eval_loader:
            losses = eval_block_losses(accelerator, model, batch["input_ids"], chunk_size)
            block_losses.append(accelerator.gather_for_metrics(losses))
    model.train()
    loss = torch.cat(block_losses).mean().item()
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def eval_block_losses(accelerator, model, input_ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Each block's mean next-token loss, in fp32 and never from a whole batch's fp32 logits (gigabytes at 150k)."""
    if chunk_size:  # not even one batch's logits: the output projection runs on chunks of tokens
        with accelerator.autocast():
            return block_losses_in_chunks(accelerator.unwrap_model(model), input_ids, chunk_size)
    logits = model(input_ids=input_ids).logits
    return torch.stack([torch.nn.functional.cross_entropy(block_logits[:-1].float(), ids[1:])
                        for block_logits, ids in zip(logits, input_ids)])


def print_sample(model, tokenizer, accelerator, prompt: str = "alice went to") -> None:
    """A short greedy continuation, to see what the model learned."""
    if zero_stage_of(accelerator) == 3:
        return  # generation under ZeRO-3 needs every rank in each forward; load the saved model instead
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(accelerator.device)
    with torch.no_grad():
        output = unwrapped.generate(**inputs, max_new_tokens=40, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id, use_cache=True)
    logger.info(f"sample: {tokenizer.decode(output[0], skip_special_tokens=True)!r}")


def cli(argv: list[str] | None = None) -> None:
    """main() with the errors a user can fix turned into one line (and exit status 1) instead of a traceback."""
    try:
        main(argv)
    except (UsageError, DataError, NonFiniteLoss, CheckpointError) as error:
        exit_with(f"error: {error}", every_rank_has_it=isinstance(error, SEEN_BY_EVERY_RANK))
    except torch.OutOfMemoryError as error:  # the most common bad input on a GPU: a batch that does not fit
        what = ". ".join(first_line(error).split(". ")[:2])  # "CUDA out of memory. Tried to allocate 9.27 GiB"
        exit_with(f"error: out of memory ({what}); lower --per_device_train_batch_size (raise "
                  f"--gradient_accumulation_steps to keep the global batch), or add --gradient_checkpointing or "
                  f"--loss_chunk_size 4096, or shard with accelerate_configs/zero2.yaml; rerunning resumes from the "
                  f"last checkpoint", every_rank_has_it=False)


if __name__ == "__main__":
    cli()
