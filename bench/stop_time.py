"""Seconds from SIGTERM to the checkpoint's rename, per GB of checkpoint, under `accelerate launch`.

torch elastic (behind `accelerate launch` and `torchrun`) forwards a SIGTERM to its workers and SIGKILLs them 30 s
later. In that window the loop finishes the optimizer step in flight and saves. This bench starts a run of a model
of --hidden_size/--layers, sends SIGTERM to the launcher only (as `scancel` or a preemption notice does), and
times the signal -> `checkpoint-N` rename (the log's "saved" line is printed right after it). It prints the step
time beside it, so the save's own share can be read off, and what model size fits in 30 s at that rate.

    python bench/stop_time.py [--config zero2.yaml --processes 2] [--hidden_size 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_throughput import add_run_arguments, count_parameters, prepare  # noqa: E402

from pretrain.distributed.launch import free_local_port  # noqa: E402

GRACE_S = 30  # torch elastic's shutdown timeout (LocalElasticAgent._shutdown)


def stop_once(spec: dict, options, output: Path) -> dict:
    port = str(free_local_port())
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / options.config), "--num_processes", str(options.processes),
               "--main_process_port", port, str(ROOT / "train_loop.py"), "--config_name", spec["config"],
               "--tokenizer_name", spec["tokenizer"], "--train_files", spec["corpus"], "--data_cache_dir",
               spec["cache"], "--block_size", str(spec["block_size"]), "--per_device_train_batch_size",
               str(spec["batch"]), "--max_steps", "10000", "--save_steps", "100000", "--logging_steps", "1",
               "--eval_strategy", "no", "--report_to", "none", "--output_dir", str(output)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(max(1, os.cpu_count() // options.processes)))
    log = tempfile.TemporaryFile("w+")  # not a pipe: one that nobody reads while waiting would fill and block it
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    metrics = output / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= options.warmup):
        if process.poll() is not None:
            raise SystemExit(log.seek(0) or log.read()[-3000:])
        time.sleep(0.01)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    sent = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    while not any(output.glob("checkpoint-*[0-9]")):
        if process.poll() is not None and not any(output.glob("checkpoint-*[0-9]")):
            raise SystemExit("no checkpoint was saved:\n" + (log.seek(0) or log.read()[-3000:]))
        time.sleep(0.005)
    saved = time.perf_counter() - sent
    process.wait(timeout=GRACE_S + 30)
    checkpoint = next(output.glob("checkpoint-*[0-9]"))
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    return {"seconds": saved, "gb": size / 1e9, "step_s": records[-1]["step_time_s"],
            "params_m": spec["params_m"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=0, warmup=3, layers=8, block_size=64, batch=1)
    parser.set_defaults(hidden_size=1024)
    parser.add_argument("--config", default="zero2.yaml", help="an accelerate_configs/ file")
    parser.add_argument("--processes", type=int, default=2)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        spec = prepare(work, options)
        spec["params_m"] = count_parameters(spec) / 1e6
        result = stop_once(spec, options, work / "run")
    per_gb = result["seconds"] / result["gb"]
    print(f"{options.config} x {options.processes} processes, CPU ({os.cpu_count()} cores), fp32; "
          f"{result['params_m']:.0f}M parameters")
    print("| checkpoint GB | step s | SIGTERM -> checkpoint renamed, s | s per GB | checkpoint GB that fits in 30 s |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {result['gb']:.2f} | {result['step_s']:.2f} | {result['seconds']:.2f} | {per_gb:.2f} | "
          f"{GRACE_S / per_gb:.1f} |")


if __name__ == "__main__":
    main()
