"""Optimization: the optimizer (AdamW, or Muon on the hidden matrices) and the learning-rate schedule.

It may import the base and telemetry. It must not save or load checkpoints: the optimizer's and the schedule's
state reach a checkpoint through checkpointing.

Modules:
optimizers    --optim: AdamW, or Muon on the hidden matrices and AdamW on the rest, as one optimizer
gradients     the step's gradient clipping and norm, on one process, DDP and DeepSpeed
schedule      the learning-rate schedule: warmup, transformers' schedulers by name, a resume that changes it
wsd           WSD: warmup, a stable phase and a decay (linear, cosine, 1-sqrt) to a floor
"""
