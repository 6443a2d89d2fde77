"""Document-masked attention in packed blocks (`--attn_mask_type block_causal`): positions that restart after each
EOS, so that each token attends only within its own document and RoPE sees the positions of an unpacked document,
and labels that take no loss on the target across a boundary (the EOS predicting the next document's first token).

transformers 5 turns `position_ids` that restart, with no `attention_mask` and no cache, into a block-diagonal
causal mask for sdpa, eager and flex_attention, and into `cu_seq_lens` for flash_attention_2. A cache built in
training (`use_cache` on) skips that detection silently, so the model's `use_cache` is turned off, and a tiny model
of the same class and attention kernel is checked once before training: one that ignores the mask is refused.

It owns the batch fields and that check; it must not train or load data.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from pretrain.base.errors import UsageError

IGNORE_INDEX = -100  # the targets transformers' loss (and ours in chunks) leaves out


def document_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each token's position inside its document: 0 at a block's start and after every EOS."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def boundary_labels(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The input ids as labels, with the first token of each document after an EOS left out of the loss."""
    labels = input_ids.clone()
    labels[:, 1:][input_ids[:, :-1] == eos_id] = IGNORE_INDEX
    return labels


class BlockCollator:
    """Stacks blocks into a batch: `input_ids` and `labels` (the model shifts them), plus `position_ids` and boundary
    labels when attention stops at documents. A plain object, so DataLoader workers can pickle it."""

    def __init__(self, eos_id: int | None = None, keep_boundary_targets: bool = False):
        self.eos_id, self.keep_boundary_targets = eos_id, keep_boundary_targets

    def __call__(self, batch: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        """Blocks (a tensor or a list of rows), or a mixture's (blocks, sources): their `source` is kept."""
        sources = None
        if isinstance(batch, tuple):
            batch, sources = batch
        input_ids = batch if isinstance(batch, torch.Tensor) else torch.stack(batch)
        fields = {"input_ids": input_ids, "labels": input_ids}  # the same tensor, no copy
        if self.eos_id is not None:
            fields["labels"] = input_ids if self.keep_boundary_targets else boundary_labels(input_ids, self.eos_id)
            fields["position_ids"] = document_positions(input_ids, self.eos_id)
        return fields if sources is None else {**fields, "source": sources}


def use_document_mask(model) -> None:
    """Turn the training cache off and refuse, in one line, a model class or attention kernel that would attend
    across documents anyway (checked on a one-layer model of the same class and kernel)."""
    model.config.use_cache = False
    implementation = model.config._attn_implementation
    dtype = torch.bfloat16 if "flash" in implementation else torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the launch's current GPU
    try:
        tiny = type(model)(tiny_copy(model.config)).to(device=device, dtype=dtype).eval()
        first, second = torch.tensor([[5, 6, 7, 1]]), torch.tensor([[8, 9, 10, 11, 1]])
        packed = torch.cat([first, second], dim=1).to(device)
        with torch.no_grad():
            together = tiny(input_ids=packed, position_ids=document_positions(packed, 1)).logits[0, 4:]
            alone = tiny(input_ids=second.to(device)).logits[0]
    except Exception as error:  # a class that cannot be built small, or a kernel that cannot run here
        raise UsageError(f"--attn_mask_type block_causal: cannot check that {type(model).__name__} with "
                         f"{implementation} attention honours document masks ({' '.join(str(error).split())[:200]}); "
                         f"use --attn_mask_type causal") from None
    if not torch.allclose(together.float(), alone.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-4):
        raise UsageError(f"--attn_mask_type block_causal: {type(model).__name__} with {implementation} attention "
                         f"attends across documents even with restarting position_ids; use --attn_implementation "
                         f"sdpa, eager or flash_attention_2, or --attn_mask_type causal")


def tiny_copy(config: Any):
    """The config with one small layer: enough to see whether attention crosses a document boundary."""
    tiny = copy.deepcopy(config)
    heads = getattr(tiny, "num_attention_heads", 4)
    kv_heads = getattr(tiny, "num_key_value_heads", heads) or heads
    group = max(1, heads // kv_heads)
    changes = {"num_hidden_layers": 1, "hidden_size": 16 * 2 * group, "intermediate_size": 32, "vocab_size": 16,
               "num_attention_heads": 2 * group, "num_key_value_heads": 2, "head_dim": 16, "layer_types": None,
               "max_window_layers": 1, "use_cache": False, "tie_word_embeddings": False}
    for key, value in changes.items():
        if hasattr(tiny, key):
            setattr(tiny, key, value)
    if hasattr(tiny, "layer_types"):
        tiny.layer_types = ["full_attention"]
    return tiny
