"""The step's gradients on every launch layout: clipped and measured by Accelerate on one process and DDP, inside
the engine's step under DeepSpeed (gradient_clipping in its config).

Part of optim: it takes the prepared model and the Accelerator as arguments and imports nothing of the project's.
"""

from __future__ import annotations


def clip_gradients(accelerator, model, max_grad_norm: float):
    """Clip the reduced gradients (plain/DDP) and return their norm before clipping, a tensor read only when logged.
    None under DeepSpeed, which clips inside its optimizer step (gradient_clipping in its config)."""
    if accelerator.state.deepspeed_plugin is not None:
        return None
    return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))


def grad_norm_after_step(accelerator, model, clip_norm, optim: str) -> float | None:
    """The gradient norm of the step. None under ZeRO-2's Muon, whose norm covers the orthogonalized updates."""
    if accelerator.state.deepspeed_plugin is not None:
        clip_norm = model.get_global_grad_norm() if optim != "muon" else None
    return None if clip_norm is None else float(clip_norm)
