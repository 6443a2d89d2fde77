"""What supports train_loop.py and data_utils.py, in rooms by concern: a sub-package each, a module per piece.

Rooms import one way, down this list: a module may import modules of its own room and of the rooms below it, never
of a room above, and nothing imports in a cycle (not even under TYPE_CHECKING). No module here imports the scripts
above it (train_loop.py, data_utils.py, bench/, tests/). Each room's docstring names what it owns, what it may import
and what it must not do; tests/test_layout.py checks all of it.

base           flags, errors, the run state, the fault-injection hook (imports nothing of the project's)
data           corpus files, the streamed build of the token cache, mixtures, document masks, the demo corpus
model          tokenizer, config and weights, speed-ups of the built model, the chunked loss
telemetry      trackers, timing, tokens/s, FLOPs and MFU, metrics.jsonl and the console
optim          the optimizer (AdamW, Muon) and the learning-rate schedule
distributed    the Accelerator, DeepSpeed and the process group of a launch
checkpointing  atomic and background saves, resume (on another world size too), the final model, the folder lock
evaluation     held-out loss, perplexity and bits per byte, multiple-choice tasks
resilience     skipped steps and rewinds, the watchdog, stop signals

At the top, above every room, importing any of them:
preflight      what runs and what it costs, said before the first step: parameters, FLOPs, disk
average_checkpoints  K checkpoints averaged into a Hugging Face model folder, each evaluated beside the average
"""

# lowest first: a room imports only itself and the rooms before it
ROOMS = ("base", "data", "model", "telemetry", "optim", "distributed", "checkpointing", "evaluation", "resilience")
# the base room in order: each imports only those before it
BASE = ("errors", "args_file", "mixture_spec", "flag_values", "arguments", "state", "faults")
