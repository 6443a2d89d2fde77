"""What supports train_loop.py, one concern per module; train_loop.py imports these, never the other way round.

errors        the one-line errors a user can fix
arguments     flags and argument files, the demo's defaults, validation
launch        the Accelerator and DeepSpeed set-up of a process
loading       tokenizer, config and weights from the Hub or a folder
chunked_loss  the output projection and cross-entropy a chunk of tokens at a time
speedups      regional torch.compile and Liger-Kernel, applied to the built model
checkpoints   the run state, atomic saves, choosing and loading a resume, the final model
universal     a ZeRO checkpoint resumed on another world size, through DeepSpeed's universal format
output_lock   one run per output_dir
metrics       timing, tokens/s, FLOPs and MFU, compiled graphs, metrics.jsonl and the console
tracking      SwanLab's mode and start
run_control   stop signals, the profiler, non-finite checks
corpus_files  corpus formats, pieces of files, bad-input lines (used by data_utils)
corpus_build  the streamed, crash-safe, multi-process build of the data cache (used by data_utils)
cache_claims  sharing a build folder between processes with claims and error files
corpus_cache  the data cache's key and its memory-mapped loading (used by data_utils)
demo_corpus   the built-in demo's generated corpus and tokenizer
"""
