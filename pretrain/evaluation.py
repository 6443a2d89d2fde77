"""Evaluation on the held-out blocks: how many each evaluation reads, and eval_loss and perplexity (per source of a
mixture, and their mean weighted as the training mixture weights its sources), gathered across processes.

It owns what an evaluation measures; the loop decides when to evaluate and sets its time aside.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from pretrain.arguments import TrainArguments
from pretrain.chunked_loss import block_loss_sums, block_losses_in_chunks
from pretrain.mixture import Mixture

logger = logging.getLogger("train_loop")


def validation_sets(data) -> tuple[dict[str, Any], dict[str, float]]:
    """The held-out blocks by source name ("" for one corpus) and each source's weight."""
    if isinstance(data.train, Mixture):
        weights = data.train.weight_of()
        return data.validation, {name: weights[name] for name in data.validation}
    return ({"": data.validation} if data.validation is not None else {}), {"": 1.0}


# A forward costs about a third of a training step (forward and backward), so evaluating 0.3 times the blocks that
# training reads between two evaluations takes about a tenth of the training time.
EVAL_SHARE_OF_TRAINED_BLOCKS = 0.3
MIN_EVAL_BLOCKS = 32  # fewer gives a noisy eval_loss


def eval_blocks(args: TrainArguments, available: int, global_batch_blocks: int, steps_per_epoch: int,
                num_processes: int, source: str = "", share: float = 1.0) -> int:
    """How many held-out blocks each evaluation reads (of a mixture's source: in proportion to its weight):
    --max_eval_samples, or by default about a tenth of the training time at the evaluation cadence. The same first
    blocks every time, so eval_loss compares across a run."""
    if args.max_eval_samples:
        blocks, why = min(args.max_eval_samples, available), "--max_eval_samples"
    else:
        every = steps_per_epoch if args.eval_strategy == "epoch" else args.eval_steps or args.save_steps
        budget = int(EVAL_SHARE_OF_TRAINED_BLOCKS * every * global_batch_blocks * share)
        blocks = min(available, max(budget, MIN_EVAL_BLOCKS, args.per_device_eval_batch_size * num_processes))
        why = "the default, about a tenth of the training time; --max_eval_samples sets it"
    logger.info(f"evaluation{f' of {source}' if source else ''}: {blocks} of {available} held-out blocks each time "
                f"({why})")
    return blocks


EVAL_PROGRESS_AFTER_S = 5.0  # an evaluation that lasts longer says how far it is, every so many seconds


def evaluate_sources(accelerator, model, eval_loaders: dict[str, Any], mixture: Mixture | None,
                     chunk_size: int) -> dict[str, float]:
    """eval_loss and perplexity; for a mixture, each source's (eval_loss/NAME) and their mean weighted as the
    training mixture weights its sources."""
    if list(eval_loaders) == [""]:
        return evaluate(accelerator, model, eval_loaders[""], chunk_size)
    weights = mixture.weight_of()
    record, mean = {}, 0.0
    for name, loader in eval_loaders.items():
        loss = evaluate(accelerator, model, loader, chunk_size)["eval_loss"]
        record.update({f"eval_loss/{name}": loss, f"perplexity/{name}": math.exp(min(loss, 50.0))})
        mean += weights[name] * loss / sum(weights[source] for source in eval_loaders)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)), **record}


def evaluate(accelerator, model, eval_loader, chunk_size: int) -> dict[str, float]:
    """Mean token loss and perplexity over the evaluation blocks, gathered across processes."""
    model.eval()
    block_losses = []
    start = shown = time.perf_counter()
    with torch.no_grad():
        for index, batch in enumerate(eval_loader, 1):
            losses = eval_block_losses(accelerator, model, batch, chunk_size)
            block_losses.append(accelerator.gather_for_metrics(losses))
            if time.perf_counter() - shown >= EVAL_PROGRESS_AFTER_S and accelerator.is_main_process:
                shown = time.perf_counter()
                logger.info(f"evaluating: batch {index} of {len(eval_loader)}, {shown - start:.0f} s")
    model.train()
    if time.perf_counter() - start >= EVAL_PROGRESS_AFTER_S and accelerator.is_main_process:
        logger.info(f"evaluated {len(eval_loader)} batches in {time.perf_counter() - start:.0f} s")
    loss = torch.cat(block_losses).mean().item()
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def eval_block_losses(accelerator, model, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Each block's mean next-token loss over its counted targets (with the batch's positions and boundary labels),
    in fp32 and never from a whole batch's fp32 logits (gigabytes at 150k)."""
    if chunk_size:  # not even one batch's logits: the output projection runs on chunks of tokens
        with accelerator.autocast():
            return block_losses_in_chunks(accelerator.unwrap_model(model), batch, chunk_size)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    sums, counts = block_loss_sums(model(**inputs), batch["labels"]).unbind(dim=1)
    return sums / counts.clamp(min=1)
