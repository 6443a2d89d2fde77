"""The base: the flags and what they mean, the errors a user can fix, the run state a checkpoint carries, and the
fault-injection hook.

It may import nothing from the project outside this room, and inside it only the modules before it in this list. It
must not load a model, data, a tokenizer or an Accelerator: everything here runs before any work.

Modules:
errors        the one-line errors a user can fix, and the check that a folder is writable
args_file     a YAML or JSON file of arguments, turned into flags (a key given twice refused)
mixture_spec  --train_mixture's NAME=WEIGHT:FILES items, parsed into sources
flag_values   single flags' values: JSON settings files, --config_overrides, --eval_tasks, the GPU for --fp8
arguments     flags and argument files (model, data, training), the demo's defaults, validation
state         the run state a checkpoint carries, and how one optimizer step advances it
faults        PRETRAIN_FAULT, the fault-injection hook for tests: loss spikes, NaN losses and gradients, hangs,
              slow checkpoint writes, ranks slow in compute or in reading data
"""
