"""Resilience: skipped steps and rewinds past trouble, the watchdog that ends a launch that can no longer train,
stop signals agreed across ranks, the profiler and the non-finite checks before a save.

It may import every room below it (the base, data, model, telemetry, optim, distributed, checkpointing,
evaluation). It must not end a run with a hang or a silent wrong result: a run it cannot save ends with one line.

Modules:
step_guard    skipped steps (spikes, non-finite) and rewinds past trouble (checkpointing, distributed)
watchdog      a rank gone or a run hung: the launch ends with one line, every rank's stack in a file (checkpointing,
              distributed.restarts)
run_control   stop signals, the watchdog, the profiler, non-finite checks (watchdog)
"""
