"""Speed-ups applied to a built model before `accelerator.prepare`: torch.compile of each decoder layer in place
(`--torch_compile`), and Liger-Kernel's fused kernels (`--use_liger_kernel`).

Compiling the layers, not the whole model, keeps DeepSpeed's hooks, the embedding, the loss and the wrappers eager,
so ZeRO-2's backward hooks cause no graph breaks, the identical layers share one graph, and the state dict keeps its
keys. It owns those model changes; it must not prepare, train or save.
"""

from __future__ import annotations

import logging

import torch

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import UsageError, private_api

logger = logging.getLogger("train_loop")
LIGER_TESTED = "0.8.5"  # requirements-gpu.txt
LIGER_CPU_CHUNK = 4096  # the chunked loss that stands in for Liger's fused linear + cross-entropy without CUDA


def compile_layers(model, backend: str, mode: str | None) -> None:
    """`layer.compile()` on every decoder layer: one graph for all of them, compiled at the first step."""
    # transformers builds a DynamicCache even in training when use_cache is on, and each layer would then guard on
    # its own cache slot: one graph per layer, and more for evaluation.
    model.config.use_cache = False
    for layer in model.get_decoder().layers:
        layer.compile(backend=backend, mode=mode)


def apply_liger_kernel(model, args: TrainArguments) -> None:
    """Liger-Kernel's RMSNorm, RoPE, SwiGLU and fused linear + cross-entropy, patched into this model.

    Without CUDA the run goes on with a warning rather than stopping: the same command is often tried on a laptop
    first, Liger's Triton kernels compute what the eager ops compute, and the memory it saves in the loss comes from
    never holding the full logits, which --loss_chunk_size also does.
    """
    if args.loss_chunk_size:
        raise UsageError("--use_liger_kernel with --loss_chunk_size: both replace the loss; choose one")
    if not torch.cuda.is_available():
        logger.warning(f"--use_liger_kernel: no CUDA GPU, and Liger-Kernel's Triton kernels need one; training with "
                       f"the model's own kernels and --loss_chunk_size {LIGER_CPU_CHUNK} instead of the fused loss")
        args.loss_chunk_size = LIGER_CPU_CHUNK
        return
    try:
        import liger_kernel.transformers as liger
    except ImportError as error:
        raise UsageError(f"--use_liger_kernel: Liger-Kernel cannot be imported ({error}); "
                         f"pip install -r requirements-gpu.txt") from None
    apply_to_instance = private_api(liger, "_apply_liger_kernel_to_instance", "liger-kernel", LIGER_TESTED,
                                    "--use_liger_kernel")
    apply_to_instance(model=model)
