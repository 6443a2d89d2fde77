"""Evaluation on the held-out blocks: how many each evaluation reads, and eval_loss, perplexity and bits per byte
(per source of a mixture, and their mean weighted as the training mixture weights its sources), gathered across
processes.

It owns what an evaluation measures; the loop decides when to evaluate and sets its time aside.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any

import torch

from pretrain.base.arguments import TrainArguments
from pretrain.data.mixture import Mixture
from pretrain.model.chunked_loss import block_token_losses, token_losses_in_chunks

logger = logging.getLogger("train_loop")


def validation_sets(data) -> tuple[dict[str, Any], dict[str, float]]:
    """The held-out blocks by source name ("" for one corpus) and each source's weight."""
    if isinstance(data.train, Mixture):
        weights = data.train.weight_of()
        return data.validation, {name: weights[name] for name in data.validation}
    return ({"": data.validation} if data.validation is not None else {}), {"": 1.0}


# A forward costs about a third of a training step (forward and backward), so evaluating 0.12 times the blocks that
# training reads between two evaluations takes about 4 % of the training time, which leaves room for --eval_tasks
# within 5 % (bench/eval_cost.py measures it).
EVAL_SHARE_OF_TRAINED_BLOCKS = 0.12
MIN_EVAL_BLOCKS = 32  # fewer gives a noisy eval_loss


def eval_blocks(args: TrainArguments, available: int, global_batch_blocks: int, steps_per_epoch: int,
                num_processes: int, source: str = "", share: float = 1.0) -> int:
    """How many held-out blocks each evaluation reads (of a mixture's source: in proportion to its weight):
    --max_eval_samples, or by default about 4 % of the training time at the evaluation cadence. The same first
    blocks every time, so eval_loss compares across a run."""
    if args.max_eval_samples:
        blocks, why = min(args.max_eval_samples, available), "--max_eval_samples"
    else:
        every = steps_per_epoch if args.eval_strategy == "epoch" else args.eval_steps or args.save_steps
        budget = int(EVAL_SHARE_OF_TRAINED_BLOCKS * every * global_batch_blocks * share)
        blocks = min(available, max(budget, MIN_EVAL_BLOCKS, args.per_device_eval_batch_size * num_processes))
        why = "the default, about 4 % of the training time; --max_eval_samples sets it"
    logger.info(f"evaluation{f' of {source}' if source else ''}: {blocks} of {available} held-out blocks each time "
                f"({why})")
    return blocks


EVAL_PROGRESS_AFTER_S = 5.0  # an evaluation that lasts longer says how far it is, every so many seconds


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """The UTF-8 bytes of text that each token id decodes to, for bits per byte: 0 for special tokens (an EOS is no
    text) and for the model's ids past the tokenizer's. Exact for byte-level BPE (Qwen's, GPT-2's, LLaMA-3's), where
    each character of a token's string stands for one byte; for SentencePiece, `<0xNN>` is one byte and `▁` a space."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") or {} if backend is not None else {}
    byte_level = "ByteLevel" in json.dumps(decoder)
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    special = set(tokenizer.all_special_ids) | {index for index, token in added.items() if token.special}
    lengths = torch.zeros(vocab_size, dtype=torch.int64)
    for index, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))):
        if index in special or piece is None:
            continue
        if index in added:  # its text as written, not byte-level encoded
            lengths[index] = len(added[index].content.encode())
        elif byte_level:
            lengths[index] = len(piece)
        else:
            lengths[index] = 1 if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) else len(piece.replace("▁", " ").encode())
    return lengths


def evaluate_sources(accelerator, model, eval_loaders: dict[str, Any], mixture: Mixture | None, chunk_size: int,
                     token_bytes: torch.Tensor) -> dict[str, float]:
    """eval_loss, perplexity and eval_bpb; for a mixture, each source's (eval_loss/NAME, eval_bpb/NAME) and their
    means weighted as the training mixture weights its sources."""
    if list(eval_loaders) == [""]:
        return evaluate(accelerator, model, eval_loaders[""], chunk_size, token_bytes)
    weights = mixture.weight_of()
    record, mean = {}, {"eval_loss": 0.0, "eval_bpb": 0.0}
    for name, loader in eval_loaders.items():
        measured = evaluate(accelerator, model, loader, chunk_size, token_bytes)
        record.update({f"eval_loss/{name}": measured["eval_loss"], f"eval_bpb/{name}": measured["eval_bpb"],
                       f"perplexity/{name}": measured["perplexity"]})
        for key in mean:
            mean[key] += weights[name] * measured[key] / sum(weights[source] for source in eval_loaders)
    return {**mean, "perplexity": perplexity(mean["eval_loss"]), **record}


def evaluate(accelerator, model, eval_loader, chunk_size: int, token_bytes: torch.Tensor) -> dict[str, float]:
    """The mean of the blocks' mean token losses, its perplexity, and bits per byte over the evaluation blocks,
    gathered across processes."""
    model.eval()
    block_sums = []
    token_bytes = token_bytes.to(accelerator.device)
    start = shown = time.perf_counter()
    with torch.no_grad():
        for index, batch in enumerate(eval_loader, 1):
            sums = eval_block_sums(eval_token_losses(accelerator, model, batch, chunk_size), batch["labels"],
                                   token_bytes)
            block_sums.append(accelerator.gather_for_metrics(sums))
            if time.perf_counter() - shown >= EVAL_PROGRESS_AFTER_S and accelerator.is_main_process:
                shown = time.perf_counter()
                logger.info(f"evaluating: batch {index} of {len(eval_loader)}, {shown - start:.0f} s")
    model.train()
    if time.perf_counter() - start >= EVAL_PROGRESS_AFTER_S and accelerator.is_main_process:
        logger.info(f"evaluated {len(eval_loader)} batches in {time.perf_counter() - start:.0f} s")
    loss_sums, counted, text_loss_sums, text_bytes = torch.cat(block_sums).double().unbind(dim=1)
    loss = (loss_sums / counted.clamp(min=1)).mean().item()
    bpb = (text_loss_sums.sum() / (math.log(2) * text_bytes.sum().clamp(min=1))).item()
    return {"eval_loss": loss, "perplexity": perplexity(loss), "eval_bpb": bpb}


def perplexity(loss: float) -> float:
    """exp(loss), never capped: inf beyond a float's range (a loss above 709.78), which metrics.jsonl writes as
    Infinity and the screen as inf."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def eval_token_losses(accelerator, model, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Each target's next-token loss (blocks, block_size - 1), 0 where it is not counted (with the batch's positions
    and boundary labels), in fp32 and never from a whole batch's fp32 logits (gigabytes at 150k)."""
    if chunk_size:  # not even one batch's logits: the output projection runs on chunks of tokens
        with accelerator.autocast():
            return token_losses_in_chunks(accelerator.unwrap_model(model), batch, chunk_size)
    return block_token_losses(model(**{key: value for key, value in batch.items() if key != "labels"}).logits,
                              batch["labels"])


def eval_block_sums(token_losses: torch.Tensor, labels: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """Per block, in fp32: the summed loss and the count of its counted targets (eval_loss), and the summed loss of
    the targets that are text and their bytes (eval_bpb). Each token is the target of one block only, so a document
    that spans blocks counts its bytes once; a block's first token is no target, and its bytes are not counted."""
    targets = labels[:, 1:]
    counted = targets != -100
    target_bytes = token_bytes[targets.clamp(min=0)] * counted
    return torch.stack([token_losses.sum(dim=1), counted.sum(dim=1).float(),
                        (token_losses * (target_bytes > 0)).sum(dim=1), target_bytes.sum(dim=1).float()], dim=1)
