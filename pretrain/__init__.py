"""What supports train_loop.py and data_utils.py, one concern per module.

Imports go one way, down this list, and never in a cycle (not even under TYPE_CHECKING); no module here imports
the scripts above it (train_loop.py, data_utils.py, bench/, tests/). tests/test_layout.py checks both.

The base, importing nothing from the project but the modules before it:
errors        the one-line errors a user can fix, and the check that a folder is writable
args_file     a YAML or JSON file of arguments, turned into flags (a key given twice refused)
mixture_spec  --train_mixture's NAME=WEIGHT:FILES items, parsed into sources
arguments     flags and argument files (model, data, training), the demo's defaults, validation
state         the run state a checkpoint carries, and how one optimizer step advances it

The concerns, each importing the base and the concerns it names:
corpus_files  corpus formats, pieces of files, bad-input lines
hub_datasets  --dataset_name: a Hub or local dataset resolved to its data files
cache_claims  sharing a build folder between processes with claims and error files
corpus_build  the streamed, crash-safe, multi-process build of the data cache (corpus_files, cache_claims)
corpus_cache  the data cache's key and its memory-mapped loading
demo_corpus   the built-in demo's generated corpus and tokenizer
launch        the Accelerator and DeepSpeed set-up of a process, and its stop when the launcher dies
loading       tokenizer, config and weights from the Hub or a folder (demo_corpus)
chunked_loss  the output projection and cross-entropy a chunk of tokens at a time
document_mask  positions restarting at each document, boundary labels, the check that a model honours them
schedule      the learning-rate schedule: warmup, transformers' schedulers by name
speedups      regional torch.compile and Liger-Kernel, applied to the built model
mixture       --train_mixture: the blend of several cached corpora, its positions and its resume
evaluation    eval_loss, perplexity and bits per byte on the held-out blocks, per source of a mixture (chunked_loss,
              mixture)
tasks         multiple-choice tasks from local files, scored as lm-eval-harness scores them
universal     a ZeRO checkpoint resumed on another world size, through DeepSpeed's universal format
background_save  checkpoint files written from a snapshot while training goes on (DeepSpeed ZeRO; faults)
checkpoints   atomic saves, choosing and loading a resume, the final model (launch, mixture, universal,
              background_save)
output_lock   one run per output_dir
tracking      SwanLab's mode and start
metrics       timing, tokens/s, FLOPs and MFU, compiled graphs, metrics.jsonl and the console (tracking)
optimizers    --optim: AdamW, or Muon on the hidden matrices and AdamW on the rest, as one optimizer (metrics)
watchdog      a rank gone or a run hung: the launch ends with one line, every rank's stack in a file (checkpoints)
run_control   stop signals, the watchdog, the profiler, non-finite checks (watchdog)
faults        PRETRAIN_FAULT, the fault-injection hook for tests: loss spikes, NaN losses and gradients, hangs,
              slow checkpoint writes
step_guard    skipped steps (spikes, non-finite) and rewinds past trouble (checkpoints, launch)
preflight     what runs and what it costs, said before the first step: parameters, FLOPs, disk (checkpoints, metrics,
              optimizers)
"""

BASE = ("errors", "args_file", "mixture_spec", "arguments", "state")  # in order: each imports only those before it
