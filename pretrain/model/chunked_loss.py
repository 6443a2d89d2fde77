"""The output projection and cross-entropy computed a chunk of tokens at a time (`--loss_chunk_size`), in training and
in evaluation, so that no batch's full logits (tokens x vocabulary) are ever held.

It owns that arithmetic and how it is attached to a model instance; it must not know about the loop or the launch.
"""

from __future__ import annotations

from types import MethodType

import torch

from pretrain.base.errors import UsageError


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, made chunk by chunk of tokens.

    The logits of a 150k-token vocabulary are the largest tensors of a small model's step (tokens x vocab, in
    fp32 for the softmax). Here each chunk's logits become its loss and both its gradients at once and are
    freed, so memory holds one chunk. The matrix products are the ones backward would do anyway, done early.
    Gradients are kept unscaled (fp32 for the weight's sum over all tokens) and scaled in backward, so fp16
    loss scaling still applies to them.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # mixed precision without DeepSpeed: cast once, not per product
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        valid = targets != -100
        safe_targets = targets.masked_fill(~valid, 0)
        token_losses = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)  # 0 where not counted
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk, chunk_targets, chunk_valid = hidden[rows], safe_targets[rows, None], valid[rows, None]
            logits = (chunk @ weight.T).float()
            log_norm = logits.logsumexp(dim=-1, keepdim=True)
            token_losses[rows] = ((log_norm - logits.gather(1, chunk_targets)) * chunk_valid)[:, 0]
            # d(loss_sum)/d(logits) = softmax - one_hot(target), on the counted rows; made in place in the logits
            grad_logits = logits.sub_(log_norm).exp_()
            grad_logits.scatter_add_(1, chunk_targets, torch.full_like(log_norm, -1.0))
            grad_logits = grad_logits.mul_(chunk_valid).to(chunk.dtype)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight += (grad_logits.T @ chunk).float()
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.mark_non_differentiable(token_losses)
        return token_losses.sum() / count, token_losses

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_token_losses: torch.Tensor | None = None):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return (grad_hidden * scale).to(ctx.hidden_dtype), (grad_weight * scale).to(ctx.weight_dtype), None, None


def compute_loss_in_chunks(model, chunk_size: int) -> None:
    """Make `model(input_ids=..., labels=...)` return the loss of ChunkedLinearCrossEntropy (and no logits, but each
    target's loss as `token_losses`).

    The forward is replaced on this instance only, so DDP and DeepSpeed call it as usual, the state dict keeps its
    keys, and a call without labels (generation) is the model's own forward. Evaluation chunks its own way
    (token_losses_in_chunks), with no gradients to make.
    """
    from transformers.modeling_outputs import CausalLMOutput

    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or \
            getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logits_scaling", 1) != 1:
        raise UsageError(f"--loss_chunk_size: {type(model).__name__} does not end in a plain linear output "
                         f"projection; use --loss_chunk_size 0")

    def forward(self, input_ids=None, labels=None, **kwargs):
        if labels is None:
            return type(self).forward(self, input_ids=input_ids, **kwargs)
        hidden, targets = next_token_pairs(self, input_ids, labels, **kwargs)
        weight = self.get_output_embeddings().weight
        loss, token_losses = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
        output = CausalLMOutput(loss=loss)
        output.token_losses = token_losses  # each target's loss, for a mixture's per-source losses
        return output

    model.forward = MethodType(forward, model)


def next_token_pairs(model, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs):
    """The base model's hidden states and the targets they predict, flattened to (tokens, hidden) and (tokens,).

    Position t predicts token t + 1: the last position has no target, so its logits are never made.
    """
    hidden = model.base_model(input_ids=input_ids, **kwargs).last_hidden_state[:, :-1]
    return hidden.reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)


def block_sums_of_tokens(token_losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each block's summed token loss (0 where a target is not counted) and its count of counted targets, as a
    (blocks, 2) fp32 tensor."""
    counts = (labels[:, 1:] != -100).sum(dim=1).float()
    return torch.stack([token_losses.view(len(labels), -1).sum(dim=1), counts], dim=1)


def token_losses_in_chunks(model, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Each target's next-token loss, (blocks, block_size - 1) in fp32 and 0 where a target is not counted, with the
    output projection on `chunk_size` tokens at a time (evaluation: no gradients, so no autograd function is
    needed). `model` is the unwrapped model."""
    head = model.get_output_embeddings()
    inputs = {key: value for key, value in batch.items() if key not in ("input_ids", "labels")}
    hidden, targets = next_token_pairs(model, batch["input_ids"], batch["labels"], **inputs)
    token_losses = torch.cat([
        torch.nn.functional.cross_entropy(head(hidden[start:start + chunk_size]).float(),
                                          targets[start:start + chunk_size], reduction="none")
        for start in range(0, len(targets), chunk_size)])
    return token_losses.view(batch["input_ids"].shape[0], -1)


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean next-token loss, as the model's own loss computes it (fp32, targets of -100 not counted), and each
    target's loss without gradients (0 where not counted), from one cross-entropy: a mixture's per-source losses
    need no second pass over the logits, which costs a sixth of a step at a 150k vocabulary."""
    # Position t predicts token t + 1 and the last one nothing: the targets are shifted rather than the logits, whose
    # slice would be a copy of the largest tensor of the step (and of its gradient).
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    token_losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                     reduction="none").view(targets.shape)
    return token_losses.sum() / (targets != -100).sum(), token_losses.detach()


def block_loss_sums(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Each block's summed next-token loss and its count of counted targets, as a (blocks, 2) fp32 tensor without
    gradients (training's per-source losses): from the chunked loss's token losses, or from the logits."""
    token_losses = getattr(outputs, "token_losses", None)
    if token_losses is None:
        if getattr(outputs, "logits", None) is None:
            raise UsageError("the model's forward returned neither logits nor token losses, which the mixture's "
                             "per-source losses need; drop --use_liger_kernel (use --loss_chunk_size 4096)")
        token_losses = block_token_losses(outputs.logits, labels)
    return block_sums_of_tokens(token_losses, labels)


def block_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each target's next-token loss without gradients, (blocks, block_size - 1) in fp32 and 0 where a target is not
    counted, from the logits one block at a time: a whole batch's fp32 copy of the logits is gigabytes at a 150k
    vocabulary."""
    with torch.no_grad():
        return torch.stack([torch.nn.functional.cross_entropy(block_logits[:-1].float(), block_targets,
                                                              reduction="none")
                            for block_logits, block_targets in zip(logits, labels[:, 1:])])


def losses_of(model, batch: dict[str, torch.Tensor], sources: torch.Tensor | None, chunked: bool):
    """The micro-batch's loss, and for a mixture each block's loss sum and counted targets, from the same token
    losses: the chunked loss's, or one cross-entropy over the logits (the outputs are dropped before backward)."""
    if sources is None or chunked:
        outputs = model(**batch)
        return outputs.loss, None if sources is None else block_loss_sums(outputs, batch["labels"])
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    loss, token_losses = next_token_losses(model(**inputs).logits, batch["labels"])
    return loss, block_sums_of_tokens(token_losses, batch["labels"])
