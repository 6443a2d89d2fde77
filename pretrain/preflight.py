"""What a run is and what it will cost, said before the first step: the model's parameters and where its FLOPs go,
one line of what runs (precision, attention, optimizer, engine), and the disk its checkpoints will take against
what --output_dir's disk has.

It only reads and says; it must not change the model, the launch or the run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from pretrain.base.arguments import ModelArguments, TrainArguments
from pretrain.base.state import TrainState
from pretrain.checkpointing.checkpoints import list_checkpoints
from pretrain.data.mixture import Mixture
from pretrain.distributed.launch import cpu_has_native_bf16, deepspeed_config, zero_stage_of
from pretrain.optim.optimizers import describe_split, layer_shape, parameter_groups
from pretrain.telemetry.metrics import flops_per_token, numel

logger = logging.getLogger("train_loop")

# A checkpoint's optimizer state per trained parameter: AdamW's two moments (fp32 under DeepSpeed, the weights'
# dtype without), and under DeepSpeed its fp32 master copy of the weights too.
ADAMW_MOMENTS = 2
MUON_BUFFERS = 1  # its momentum
FP32_BYTES = 4


def describe_model(model, block_size: int) -> str:
    """The parameters split into the input embedding, the output head and the rest, and the head's share of the
    FLOPs per token: at a 150k vocabulary a small model is mostly its vocabulary."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    total = sum(map(numel, model.parameters()))
    vocabulary, hidden = layer_shape(embedding)
    head_flops = 6 * vocabulary * hidden if head is not None else 0
    head_part = "tied to it" if tied else f"{numel(head.weight) / 1e6:.2f}M" if head is not None else "none"
    rest = total - numel(embedding) - (numel(head.weight) if head is not None and not tied else 0)
    return (f"model: {total / 1e6:.2f}M parameters: embedding {numel(embedding) / 1e6:.2f}M, output head "
            f"{head_part}, the rest {rest / 1e6:.2f}M; the output head (vocabulary {vocabulary:,} x {hidden}) is "
            f"{head_flops / flops_per_token(model, block_size):.0%} of the FLOPs per token")


def describe_run(accelerator, model, model_args: ModelArguments, args: TrainArguments, state: TrainState,
                 total_steps: int, steps_per_epoch: int, mixture: Mixture | None) -> None:
    """Once, on the main process: what runs, the disk its checkpoints will take, and a mixture's shares (how many
    times the whole run reads each source). `model`: the prepared model, unwrapped."""
    if not accelerator.is_main_process:
        return
    logger.info(describe_launch(accelerator, model, model_args, args))
    if args.optim == "muon":
        logger.info(describe_split(parameter_groups(model, args)))
    disk, too_little = check_disk(accelerator, model, args, state.step, total_steps, steps_per_epoch)
    logger.info(disk)
    if too_little:
        logger.warning(too_little)
    if mixture is not None:
        logger.info(f"mixture (an epoch is {mixture.epoch_source} read once, {len(mixture)} blocks): "
                    f"{mixture.describe(total_steps * state.global_batch_blocks)}")


def describe_launch(accelerator, model, model_args: ModelArguments, args: TrainArguments) -> str:
    """One line of what runs: precision, attention, optimizer and engine."""
    config = deepspeed_config(accelerator)
    weights = next(model.parameters()).dtype
    if args.fp8:
        precision = "fp8 matmuls (torchao)"
    elif args.bf16 or args.fp16:
        half = "bf16" if args.bf16 else "fp16"
        precision = (f"{half} weights with fp32 master weights (DeepSpeed)" if weights != torch.float32
                     else f"{half} autocast over {str(weights).removeprefix('torch.')} weights")
        if args.bf16 and not torch.cuda.is_available() and not cpu_has_native_bf16():
            precision += ", emulated on this CPU"
    else:
        precision = f"{str(weights).removeprefix('torch.')} (no mixed precision)"
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    mask = "block_causal (stops at documents)" if model_args.attn_mask_type == "block_causal" else "causal"
    optimizer = (f"DeepSpeed's {config['optimizer'].get('type', '?')} (its config's optimizer block)"
                 if "optimizer" in (config or {}) else ("Muon + AdamW" if args.optim == "muon" else "AdamW")
                 + " (torch" + (", fused)" if config is None else ")"))
    processes = accelerator.num_processes
    nodes = max(1, processes // int(os.environ.get("LOCAL_WORLD_SIZE", processes)))
    engine = (f"DeepSpeed ZeRO-{zero_stage_of(accelerator)}" if config is not None
              else "DDP" if processes > 1 else "no engine")
    where = "CUDA" if torch.cuda.is_available() else "CPU"
    if torch.distributed.is_initialized():
        where += f", {torch.distributed.get_backend()}"
    return (f"running: {precision}; attention {attention}, {mask}; optimizer {optimizer}; {engine} on {processes} "
            f"process{'es' if processes > 1 else ''}, {nodes} node{'s' if nodes > 1 else ''} ({where})")


def checkpoint_bytes(accelerator, model, args: TrainArguments) -> tuple[int, int]:
    """About how many bytes one checkpoint takes, as (weights, optimizer state): the weights in their dtype (a tied
    weight once), AdamW's two moments or Muon's one, and under DeepSpeed its fp32 master weights."""
    weights = sum(numel(p) * p.element_size() for p in model.parameters())
    master = deepspeed_config(accelerator) is not None
    state = 0
    for group in parameter_groups(model, args):
        buffers = (MUON_BUFFERS if group["muon"] else ADAMW_MOMENTS) + master
        state += sum(numel(p) * (FP32_BYTES if master else p.element_size()) for p in group["params"]) * buffers
    return weights, state


def saves_left(args: TrainArguments, step: int, total_steps: int, steps_per_epoch: int) -> int:
    """How many checkpoints the run writes from `step` to its end (the last step is saved too)."""
    if args.save_strategy == "no" or step >= total_steps:
        return 0
    every = steps_per_epoch if args.save_strategy == "epoch" else args.save_steps
    due = total_steps // every - step // every
    return due + (total_steps % every != 0)


def check_disk(accelerator, model, args: TrainArguments, step: int, total_steps: int,
               steps_per_epoch: int) -> tuple[str, str | None]:
    """The checkpoints' size and count against the free space of --output_dir's disk: a line to log, and a warning
    when the run will not fit (the estimate is measured against real saves in tests/test_checkpoints.py)."""
    weights, optimizer = checkpoint_bytes(accelerator, model, args)
    size = weights + optimizer
    output_dir = Path(args.output_dir)
    present = len(list_checkpoints(output_dir))
    future = saves_left(args, step, total_steps, steps_per_epoch)
    limit = args.save_total_limit
    # With a limit, the newest checkpoint is complete before the oldest is deleted: limit + 1 at the peak.
    peak = min(present + future, limit + 1) if limit else present + future
    needed = max(0, peak - present) * size + weights  # and the final model
    free = shutil.disk_usage(output_dir).free
    kept = f"keeps {limit} (--save_total_limit)" if limit else "keeps all of them (--save_total_limit is unset)"
    line = (f"checkpoints: about {gb(size)} each (weights {gb(weights)}, optimizer state {gb(optimizer)}); this run "
            f"saves {future} more and {kept}: about {gb(needed)} more with the final model; {output_dir}'s disk "
            f"has {gb(free)} free")
    if needed <= free:
        return line, None
    fits = int((free - weights) // size) - 1  # checkpoints kept, plus the one being written, plus the final model
    advice = f"set --save_total_limit {fits}, " if fits >= 1 and (limit is None or limit > fits) else ""
    return line, (f"--output_dir {output_dir}: the run will not fit: it needs about {gb(needed)} more for its "
                  f"checkpoints ({peak} of about {gb(size)} at the most) and its final model, but the disk has "
                  f"{gb(free)} free; {advice}free space, or choose another folder")


def gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
