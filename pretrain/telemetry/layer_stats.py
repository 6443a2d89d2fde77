"""Per-layer norms and the largest attention logit, every --telemetry_steps optimizer steps, at one collective.

On a telemetry step, for each part of the model (the embedding, each block's attention, MLP and norms, the final
norm, an untied head): the gradient's norm before clipping, the update's norm (the weights after the optimizer step
minus before it, a skipped step's 0), the update over the weights before it, and the weights' norm after it; and for
each layer the largest pre-softmax q.k/sqrt(d) over the positions that the causal and document masks allow.

Every rank adds up the squares of what it holds: the whole model on one process and under DDP (where every rank
holds the same and rank 0's count), its partition of the fp32 weights and reduced gradients under ZeRO, read where
they live (DeepSpeed keeps no param.grad after its reduction). The sums and the ranks' largest logits travel in one
all-gather at the end of the step; other steps run no collective and no hook. Under DeepSpeed the optimizer step
happens inside the engine's backward, so the gradients are read and the weights compared inside the ZeRO
optimizer's step, around the original; elsewhere the loop hands the gradients over before clipping.

The logits come from forward hooks registered for that step only: the q and k projections' outputs (what the
attention computes from), turned by the model's own RoPE, under no_grad; the forward and its losses are untouched.
Under ZeRO-2, Muon's matrices hold their orthogonalized update in place of a gradient by the end of the backward
(DeepSpeed's get_flat_partition): their parts' gradient norms are null there.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

import torch

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import private_api

DEEPSPEED_TESTED = "0.19.8"
KINDS = ("layer_grad_norm", "layer_update_norm", "layer_update_ratio", "layer_weight_norm")
LOGIT = "attn_logit_max"
SCORES_PER_CHUNK = 1 << 24  # q.k scores held at once while the largest is looked for (64 MB in fp32)


def part_of(name: str, width: int) -> str:
    """The chart line of a parameter: layers.NN.attn, .mlp or .norms (the block's own norms), else embed, head, or
    the module's name (norm, the final one). `width`: digits of the largest layer index, so lines sort in order."""
    found = re.search(r"layers\.(\d+)\.([^.]+)", name)
    if found:
        module = found.group(2)
        kind = "attn" if "attn" in module or "attention" in module else "mlp" if module in ("mlp", "feed_forward") \
            else "norms"
        return f"layers.{int(found.group(1)):0{width}d}.{kind}"
    if "embed" in name:
        return "embed"
    if "lm_head" in name:
        return "head"
    return re.sub(r"^model\.|\.(weight|bias)$", "", name)


class LayerTelemetry:
    """What a telemetry step measures, around the loop's step: start() before its first forward, gradients() after
    its last backward, finish() after the optimizer step (the one collective, then the values staged for the log)."""

    def __init__(self, accelerator, model, optimizer, args: TrainArguments):
        self.every = args.telemetry_steps
        self.due = False
        if not self.every:
            return
        self.accelerator = accelerator
        self.model = accelerator.unwrap_model(model)
        self.stage = (accelerator.state.deepspeed_plugin.zero_stage
                      if accelerator.state.deepspeed_plugin is not None else None)
        layers = self.model.config.num_hidden_layers
        width = len(str(max(layers - 1, 0)))
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.parts = list(dict.fromkeys(part_of(n, width) for n, _ in named))
        self.part_index = torch.tensor([self.parts.index(part_of(n, width)) for n, _ in named],
                                       device=accelerator.device)
        # Compiled layers do not run hooks registered after compiling them: no logits under --torch_compile
        self.attention = [] if args.torch_compile else [(f"layers.{i:0{width}d}", module)
                                                        for i, module in enumerate(attention_modules(self.model))]
        # Muon's matrices under ZeRO-2 hold no gradient after the backward (the module docstring): their parts' null
        self.no_gradient = {self.parts.index(part_of(n, width)) for n, p in named
                            if self.stage == 2 and getattr(p, "use_muon", False)}
        self.hooks: list[Any] = []
        self.reset()
        self.wrap_step(optimizer.optimizer)

    def reset(self) -> None:
        device = self.accelerator.device
        self.sums = torch.zeros(4, len(self.parts), device=device)  # gradient, update, weights before, after
        self.stepped = False
        self.logits = torch.full((len(self.attention),), -math.inf, device=device)

    def start(self, step: int) -> None:
        """Before the forwards of optimizer step `step`: on a telemetry step, the attention hooks."""
        self.due = bool(self.every) and step % self.every == 0
        if not self.due:
            return
        self.reset()
        for index, (_, attention) in enumerate(self.attention):
            self.hooks += watch_attention(attention, self.logits, index)

    def gradients(self) -> None:
        """After the step's last backward, before clipping (one process, DDP): the gradients' squares per part.
        Under DeepSpeed the engine steps inside that backward, and they are read in its step (`wrap_step`)."""
        if self.due and not self.in_engine():
            self.add_squares(0, [p.grad for p in self.params])

    def in_engine(self) -> bool:
        return self.stage is not None

    def wrap_step(self, inner_optimizer) -> None:
        """Around the optimizer's own step (torch's, or DeepSpeed's ZeRO optimizer's, which the engine calls): on a
        telemetry step the weights before it are kept (this rank's part, fp32) and compared after it, and under
        DeepSpeed the gradients are read first, before its clipping."""
        original = inner_optimizer.step

        def step(*args, **kwargs):
            if not self.due:
                return original(*args, **kwargs)
            if self.in_engine():
                self.add_squares(0, [self.local_gradient(p) for p in self.params])
            before = [w.detach().clone() if w is not None else None for w in self.local_weights()]
            result = original(*args, **kwargs)
            self.add_squares(2, before)
            for old, new in zip(before, self.local_weights()):
                if old is not None:
                    old.sub_(new)  # the update, in place of the copy
            self.add_squares(1, before)
            self.stepped = True
            return result

        inner_optimizer.step = step

    def finish(self, metrics) -> None:
        """After the optimizer step: remove the hooks, gather every rank's sums and logits in one collective, and
        stage the values for this step's log record."""
        if not self.due:
            return
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.add_squares(3, self.local_weights())
        if not self.stepped:  # a skipped step: no update, the weights before are the weights after
            self.sums[2] = self.sums[3]
        local = torch.cat([self.sums.flatten(), self.logits])[None]
        every_rank = self.accelerator.gather(local) if self.accelerator.num_processes > 1 else local
        sums = every_rank[:, :self.sums.numel()].sum(0) if self.stage else every_rank[0, :self.sums.numel()]
        norms = sums.view_as(self.sums).sqrt().tolist()  # the one read back on the host
        logits = every_rank[:, self.sums.numel():].amax(0).tolist()
        metrics.stage(self.record(norms, logits))

    def record(self, norms: list[list[float]], logits: list[float]) -> dict[str, float | None]:
        grad, update, before, after = norms
        values: dict[str, float | None] = {}
        for index, part in enumerate(self.parts):
            values[f"{KINDS[0]}/{part}"] = None if index in self.no_gradient else grad[index]
            values[f"{KINDS[1]}/{part}"] = update[index]
            values[f"{KINDS[2]}/{part}"] = update[index] / before[index] if before[index] > 0 else None
            values[f"{KINDS[3]}/{part}"] = after[index]
        values.update({f"{LOGIT}/{name}": logit if math.isfinite(logit) else None
                       for (name, _), logit in zip(self.attention, logits)})
        return values

    def add_squares(self, row: int, tensors: list[torch.Tensor | None]) -> None:
        """Add each tensor's squared norm to its part's sum in `row` (no tensor: nothing held here)."""
        present = [(i, t) for i, t in enumerate(tensors) if t is not None and t.numel() > 0]
        if not present:
            return
        norms = torch._foreach_norm([t.float() for _, t in present])
        index = self.part_index[[i for i, _ in present]]
        self.sums[row].index_add_(0, index, torch.stack(norms).square())

    def local_weights(self) -> list[torch.Tensor | None]:
        """The fp32 weights this rank updates: the parameters themselves, or its ZeRO partition of each."""
        if not self.stage:
            return [p.data for p in self.params]
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param
            return [safe_get_local_fp32_param(p) for p in self.params]
        return [mapping.get_hp_fragment() if mapping is not None else None for mapping in self.hp_mappings()]

    def local_gradient(self, parameter) -> torch.Tensor | None:
        """This rank's partition of a reduced gradient under ZeRO, as DeepSpeed's safe_get_full_grad reads it before
        its all-reduce."""
        if not self.stage:
            return parameter.grad
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad
            return safe_get_local_grad(parameter)
        mapping = private_api(parameter, "_hp_mapping", "deepspeed", DEEPSPEED_TESTED, "--telemetry_steps")
        if mapping is None:
            return None
        fragment = mapping.get_lp_grad_fragment(parameter._index_in_param_group).flatten()
        address = mapping.lp_fragment_address
        if fragment.numel() == parameter.numel() and fragment.numel() != address.numel:  # bf16's full buffer
            fragment = fragment.narrow(0, address.start, address.numel)
        return fragment

    def hp_mappings(self) -> list[Any]:
        return [private_api(p, "_hp_mapping", "deepspeed", DEEPSPEED_TESTED, "--telemetry_steps")
                for p in self.params]


def attention_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's attention, in layer order: a module with q_proj and k_proj (Qwen2, LLaMA, Mistral)."""
    return [module for name, module in model.named_modules()
            if hasattr(module, "q_proj") and hasattr(module, "k_proj") and hasattr(module, "head_dim")]


def watch_attention(attention, logits: torch.Tensor, index: int) -> list[Any]:
    """Hooks that raise logits[index] to the largest q.k/sqrt(d) of each forward through `attention`: the
    positions and RoPE from its call, q from q_proj's output, and the scores once k_proj's output comes."""
    seen: dict[str, Any] = {}

    def on_call(module, args, kwargs):
        seen["rope"], seen["positions"] = kwargs.get("position_embeddings"), kwargs.get("position_ids")

    def on_q(module, args, output):
        seen["q"] = output

    def on_k(module, args, output):
        if seen.get("rope") is None:  # an attention called without position_embeddings: not one measured here
            return
        with torch.no_grad():
            largest = largest_logit(attention, seen.pop("q"), output, *seen["rope"], seen["positions"])
            torch.maximum(logits[index], largest, out=logits[index])

    return [attention.register_forward_pre_hook(on_call, with_kwargs=True),
            attention.q_proj.register_forward_hook(on_q), attention.k_proj.register_forward_hook(on_k)]


def largest_logit(attention, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor | None) -> torch.Tensor:
    """The largest q.k x attention.scaling over every head and every allowed (query, key) pair of the batch, in
    fp32: RoPE as the model applies it, queries sharing a key head in groups, a key allowed when it is not after the
    query, in the same document (positions that do not go up by one start a new one, as transformers detects packed
    documents) and inside a sliding window if the layer has one. Queries are taken a chunk at a time."""
    batch, length = q.shape[:2]
    d = attention.head_dim
    q = q.float().view(batch, length, -1, d).transpose(1, 2)
    k = k.float().view(batch, length, -1, d).transpose(1, 2)
    if hasattr(attention, "q_norm"):  # QK-norm models (Qwen3) normalise each head's q and k before RoPE
        q, k = attention.q_norm(q), attention.k_norm(k)
    rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    q, k = rope(q, k, cos.float(), sin.float())
    heads, kv_heads = q.shape[1], k.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, length, d)
    if positions is None:
        positions = torch.arange(length, device=q.device)[None]
    positions = positions.expand(batch, length)
    document = (torch.diff(positions, prepend=positions[:, :1] - 1) != 1).cumsum(-1)
    key = torch.arange(length, device=q.device)
    window = getattr(attention, "sliding_window", None)
    chunk = max(1, SCORES_PER_CHUNK // (batch * heads * length))
    largest = torch.tensor(-math.inf, device=q.device)
    for start in range(0, length, chunk):
        query = key[start:start + chunk]
        scores = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, start:start + chunk], k) * attention.scaling
        allowed = (key[None, :] <= query[:, None])[None] & \
            (document[:, start:start + chunk, None] == document[:, None, :])
        if window:
            allowed &= (query[:, None] - key[None, :] < window)[None]
        largest = torch.maximum(largest, scores.masked_fill(~allowed[:, None, None], -math.inf).amax())
    return largest
