"""Checkpoints: atomic saves, the run state beside the weights, background writes under DeepSpeed, resuming on
another process count (DeepSpeed's universal format), the final model, one run per output_dir, and branches.

It may import the base, data, telemetry, optim and distributed. It must not leave a damaged checkpoint under a
name that a resume picks: every write goes to a temporary name first and is renamed once complete.

Modules:
universal     a ZeRO checkpoint resumed on another world size, through DeepSpeed's universal format
background_save  checkpoint files written from a snapshot while training goes on (DeepSpeed ZeRO; base.faults)
checkpoints   atomic saves, choosing and loading a resume, the final model (distributed, data.mixture, universal,
              background_save)
output_lock   one run per output_dir
branch        --branch_from: a new run from another run's checkpoint, its manifest, its continuous rate (checkpoints)
"""
