"""The optimizer (--optim): AdamW, the default, or Muon on the hidden matrices with AdamW on everything else.

Muon (torch.optim.Muon) orthogonalizes each matrix's momentum by Newton-Schulz iterations. It is defined for the
matrices that map one hidden representation to another: the attention and MLP projections. The input embedding
and the output head (rows looked up by token, not a linear map of the hidden state), norm weights and biases stay
with AdamW. Muon's step is scaled to AdamW's update RMS (0.2 x sqrt(max(rows, columns)), Moonlight's rule, torch's
`adjust_lr_fn="match_rms_adamw"`), so that one --learning_rate and --weight_decay serve both halves.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

import torch

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import UsageError, private_api
from pretrain.telemetry.metrics import numel

logger = logging.getLogger("train_loop")

MUON_MOMENTUM = 0.95  # Nesterov momentum, torch's and the published runs' default
DEEPSPEED_TESTED = "0.19.8"  # ZeRO-2's Muon hook, torch_muon_update's place, is checked against this release
# torch's Newton-Schulz coefficients and epsilon, read from its Muon so that ZeRO-2's step cannot drift from it
TORCH_MUON = {name: parameter.default for name, parameter in inspect.signature(torch.optim.Muon).parameters.items()}


def layer_shape(parameter: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape as a layer: ZeRO-3 may already have partitioned it into a flat shard (ds_shape)."""
    return tuple(getattr(parameter, "ds_shape", parameter.shape))


def is_hidden_matrix(name: str, parameter: torch.Tensor, vocabulary: set[int]) -> bool:
    """Muon's rule: a 2-D weight that is neither the input embedding nor the output head (`vocabulary`: their ids).
    The names are checked as well as the modules, because DeepSpeed's Muon tags its parameters by name."""
    return (len(layer_shape(parameter)) == 2 and id(parameter) not in vocabulary
            and not any(word in name.lower() for word in ("embed", "lm_head")))


def parameter_groups(model, args: TrainArguments) -> list[dict[str, Any]]:
    """AdamW with weight decay on matrices only (never biases and norm weights); under --optim muon, the hidden
    matrices form a group of their own (`"muon": True`)."""
    head = model.get_output_embeddings()
    vocabulary = {id(model.get_input_embeddings().weight)} | ({id(head.weight)} if head is not None else set())
    muon, decay, no_decay = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if args.optim == "muon" and is_hidden_matrix(name, parameter, vocabulary):
            muon.append(parameter)
        else:
            (decay if len(layer_shape(parameter)) >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay, "muon": False},
              {"params": no_decay, "weight_decay": 0.0, "muon": False}]
    if args.optim == "muon":
        groups.insert(0, {"params": muon, "weight_decay": args.weight_decay, "muon": True})
    return groups


def describe_split(groups: list[dict[str, Any]]) -> str:
    """Which parameters each half of --optim muon trains, counted by tensors and parameters."""
    def count(params):
        return f"{len(params)} tensors, {sum(map(numel, params)) / 1e6:.2f}M parameters"

    muon = [p for group in groups if group["muon"] for p in group["params"]]
    adamw = [p for group in groups if not group["muon"] for p in group["params"]]
    return (f"optimizer: Muon on the hidden matrices ({count(muon)}); AdamW on the embedding, the output head, norms "
            f"and biases ({count(adamw)})")


class MuonWithAdamW(torch.optim.Optimizer):
    """torch's Muon on the groups marked `"muon"`, its fused AdamW on the others, seen as one optimizer by the loop,
    the schedule (which sets every group's lr) and the checkpoints (one state_dict). The two share this optimizer's
    group dicts and state, as DeepSpeed's MuonWithAuxAdam shares them with its AdamW."""

    def __init__(self, groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float], eps: float):
        self.muon = torch.optim.Muon([g for g in groups if g["muon"]], lr=lr, momentum=MUON_MOMENTUM, nesterov=True,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW([g for g in groups if not g["muon"]], lr=lr, betas=betas, eps=eps, fused=True)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        self.muon.param_groups = [group for group in self.param_groups if group["muon"]]
        self.adamw.param_groups = [group for group in self.param_groups if not group["muon"]]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # new group dicts and a new state: share them again
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()


def build_optimizer(model, args: TrainArguments, deepspeed: dict[str, Any] | None):
    """The optimizer of --optim for the model's parameter groups; under a DeepSpeed config with its own optimizer
    block, Accelerate's placeholder for it."""
    from accelerate.utils import DummyOptim

    low_precision = {p.dtype for p in model.parameters()} & {torch.bfloat16, torch.float16}
    if low_precision and deepspeed is None:
        updates = "Muon and AdamW update" if args.optim == "muon" else "AdamW updates"
        logger.warning(f"the weights are {low_precision.pop()} and, without DeepSpeed, {updates} them in place: "
                       f"updates smaller than their precision are lost; keep --torch_dtype float32 and pass --bf16")
    groups = parameter_groups(model, args)
    hyper = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if args.optim == "muon" and deepspeed is not None:
        return zero2_muon(model, groups, **hyper)
    if "optimizer" in (deepspeed or {}):
        return DummyOptim(groups, weight_decay=args.weight_decay, **hyper)
    if args.optim == "muon":
        return MuonWithAdamW(groups, **hyper)
    return torch.optim.AdamW(groups, fused=True, **hyper)


def refuse_muon_where_deepspeed_differs(args: TrainArguments, deepspeed: dict[str, Any] | None) -> None:
    """One line, before any work, where --optim muon under DeepSpeed would not take torch's step: ZeRO stages other
    than 2 (stage 0 has no ZeRO optimizer to orthogonalize, stage 3 is not checked against torch's step), a
    DeepSpeed optimizer block (DeepSpeed's own Muon, other scaling), and gradient clipping (ZeRO-2 measures the
    norm after orthogonalizing, so a clip would shrink every update)."""
    if args.optim != "muon" or deepspeed is None:
        return
    stage = deepspeed.get("zero_optimization", {}).get("stage", 0)
    if stage != 2:
        raise UsageError(f"--optim muon under DeepSpeed runs on ZeRO stage 2 (accelerate_configs/zero2.yaml), and this "
                         f"config has stage {stage}: at stage 0 and 3 DeepSpeed's Muon is not yet checked against "
                         f"torch's; use zero2.yaml, or ddp.yaml (docs/muon.md)")
    if "optimizer" in deepspeed:
        raise UsageError("--optim muon builds its own optimizer, and the DeepSpeed config has an optimizer block "
                         "of its own: remove the block, or leave out --optim muon to train with that one")
    clipping = deepspeed.get("gradient_clipping", 0.0)
    clipping = args.max_grad_norm if clipping == "auto" else float(clipping)
    if clipping > 0:
        raise UsageError(f"--optim muon under DeepSpeed cannot clip the gradient (--max_grad_norm or the config's "
                         f"gradient_clipping: {clipping:g}): ZeRO-2 measures the norm after Muon has orthogonalized "
                         f"it, so a clip would shrink every update; pass --max_grad_norm 0, or use ddp.yaml "
                         f"(docs/muon.md)")


def load_deepspeed_muon_uncompiled() -> None:
    """DeepSpeed's ZeRO optimizer check imports its Muon module in every run, and that module wraps its kernels in
    torch.compile as it is imported, which loads inductor: about 1.5 s of every rank's start on a 2-core CPU, for an
    optimizer whose kernels the run does not use (--optim muon replaces them with torch's; a DeepSpeed config that
    names Muon skips this). Loaded first with torch.compile as a no-op, the module is found already loaded."""
    if "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules:
        return
    compile_as_imported = torch.compile
    torch.compile = lambda model=None, **options: model if model is not None else (lambda function: function)
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:
        pass
    finally:
        torch.compile = compile_as_imported


def zero2_muon(model, groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float], eps: float):
    """DeepSpeed's MuonWithAuxAdam for ZeRO-2, stepping torch's Muon update.

    ZeRO-2 all-reduces each Muon matrix whole to every rank that holds a slice of it, and orthogonalizes the whole
    matrix there before it keeps its slice (`get_flat_partition` in DeepSpeed's stage_1_and_2.py), so no rank
    orthogonalizes a shard. The update it computes is DeepSpeed's own (another Newton-Schulz variant, another
    scaling): `torch_muon_update` replaces it, so that every engine takes torch's step. Where that cannot hold, the
    launch was refused already (`refuse_muon_where_deepspeed_differs`)."""
    load_deepspeed_muon_uncompiled()  # its own kernels are replaced by torch's: no need to compile them
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon

    private_api(original_muon, "muon_update", "deepspeed", DEEPSPEED_TESTED, "--optim muon under ZeRO-2")
    original_muon.muon_update = torch_muon_update
    muon = {id(p) for group in groups if group["muon"] for p in group["params"]}
    for parameter in model.parameters():
        parameter.use_muon = id(parameter) in muon  # what ZeRO-2 reads to gather and orthogonalize whole matrices
    ds_groups = [{"params": group["params"], "use_muon": group["muon"], "weight_decay": group["weight_decay"],
                  "lr": lr, **({"momentum": MUON_MOMENTUM} if group["muon"] else {"betas": betas, "eps": eps})}
                 for group in groups if group["params"]]
    return muon_optimizer.MuonWithAuxAdam(ds_groups, adam_optimizer=torch.optim.AdamW,
                                          adam_optimizer_kwargs={"fused": True})


def torch_muon_update(grad: torch.Tensor, momentum: torch.Tensor, beta: float = MUON_MOMENTUM, ns_steps: int = 5,
                      nesterov: bool = True, **_ignored) -> torch.Tensor:
    """torch.optim.Muon's update of one whole matrix, in the place of DeepSpeed's `muon_update`, whose signature it
    takes: momentum folded in place, Nesterov, torch's Newton-Schulz, and the RMS-matching scale of
    `adjust_lr_fn="match_rms_adamw"` (DeepSpeed then applies weight decay and the group's learning rate, as torch
    does). DeepSpeed's per-head and expert options are never set here."""
    from torch.optim import _muon

    momentum.lerp_(grad, 1 - beta)
    update = grad.lerp(momentum, beta) if nesterov else momentum
    orthogonal = _muon._zeropower_via_newtonschulz(update, TORCH_MUON["ns_coefficients"], ns_steps,
                                                   TORCH_MUON["eps"])
    return orthogonal.to(grad.dtype) * _muon._adjust_lr(1.0, "match_rms_adamw", grad.shape)  # bf16 until here
