"""Telemetry: what a run tells its watchers, the trackers of --report_to, step timing, tokens/s, FLOPs and MFU,
per-layer norms and attention logits, metrics.jsonl and the console.

It may import the base. Its numbers are read, never steered by: it must not change what is trained, and the
loop's losses are the same with it on or off.

Modules:
tracking      the trackers of --report_to, SwanLab's mode and start
stragglers    every rank's step time, data wait and forward, gathered with the record's loss; a slow rank named
metrics       timing, tokens/s, FLOPs and MFU, compiled graphs, metrics.jsonl and the console (tracking, stragglers)
layer_stats   --telemetry_steps: per-layer gradient, update and weight norms and the largest attention logit, in
              one collective
"""
