"""The launch of a process: the Accelerator and its DeepSpeed plugin (gloo without CUDA), logging per rank, the
output folders, the DeepSpeed config's "auto" entries, and the stop of a worker whose launcher died.

It may import the base, telemetry and optim. It must not hold training logic: what a step does is the loop's.

Modules:
restarts      in-job restarts (--max_restarts): each attempt's process group on keys of its own, what follows an
              error line, why the attempt before ended
launch        the Accelerator and DeepSpeed set-up of a process, and its stop when the launcher dies (restarts)
"""
