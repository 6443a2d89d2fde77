"""Seconds to convert a ZeRO checkpoint to DeepSpeed's universal format (what a resume on another process count
does once), against the number of parameters.

Each size trains one step under accelerate_configs/zero2.yaml (or --config) with 2 processes, saves, and times
pretrain.checkpointing.universal.convert on that checkpoint in this process. The conversion reads every shard and
writes each parameter's fp32 weights and AdamW moments twice (fragments, then merged): it is bound by the disk.

    python bench/conversion_time.py [--hidden_sizes 256 768 1024] [--layers 8] [--config zero2.yaml]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_throughput import add_run_arguments, count_parameters, prepare  # noqa: E402

from pretrain.checkpointing.universal import convert  # noqa: E402
from pretrain.distributed.launch import free_local_port  # noqa: E402


def checkpoint_of(spec: dict, options, output: Path) -> Path:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / options.config), "--num_processes", "2", "--main_process_port",
               str(free_local_port()), str(ROOT / "train_loop.py"), "--config_name", spec["config"],
               "--tokenizer_name", spec["tokenizer"], "--train_files", spec["corpus"], "--data_cache_dir",
               spec["cache"], "--block_size", str(spec["block_size"]), "--per_device_train_batch_size", "1",
               "--max_steps", "1", "--eval_strategy", "no", "--report_to", "none", "--output_dir", str(output)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return output / "checkpoint-1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=0, warmup=0, layers=8, block_size=64, batch=1)
    parser.add_argument("--hidden_sizes", type=int, nargs="+", default=[256, 768, 1024])
    parser.add_argument("--config", default="zero2.yaml")
    options = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT) as work_dir:  # on the project's disk, as checkpoints would be
        for hidden in options.hidden_sizes:
            options.hidden_size = hidden
            work = Path(work_dir) / str(hidden)
            spec = prepare(work, options)
            checkpoint = checkpoint_of(spec, options, work / "run")
            shards = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
            start = time.perf_counter()
            convert(checkpoint, work / "universal")
            seconds = time.perf_counter() - start
            rows.append((count_parameters(spec), shards, seconds))
    print(f"{options.config}, 2 processes, fp32, CPU ({os.cpu_count()} cores); one conversion each")
    print("| parameters | checkpoint GB | conversion s | s per billion parameters |")
    print("|---:|---:|---:|---:|")
    for params, shards, seconds in rows:
        print(f"| {params / 1e6:,.0f}M | {shards / 1e9:.2f} | {seconds:.1f} | {seconds / params * 1e9:,.0f} |")


if __name__ == "__main__":
    main()
