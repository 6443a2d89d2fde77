"""Seconds a whole one-step run takes as a process, with and without freezing the garbage collector at exit.

On the way out Python collects garbage once more over every object that the imports of torch, transformers and
DeepSpeed made. `train_loop.py` freezes them first (`pretrain.distributed.launch.run_program`), since nothing needs
collecting then. This bench times, in rotated rounds, the same one-step run (tiny model, no evaluation, no save)
started as users start it, `python train_loop.py`, and started through `cli()` without the freeze; and the same pair
under `accelerate launch` with ZeRO-2 on 2 processes. The machine is noisy: read the ratio of the medians.

    python bench/startup_time.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_throughput import add_run_arguments, prepare  # noqa: E402

from pretrain.distributed.launch import free_local_port  # noqa: E402

WITHOUT_FREEZE = "import sys, train_loop; train_loop.cli(sys.argv[1:])"  # cli() alone: the collection at exit runs


def run_flags(spec: dict, output: Path) -> list[str]:
    return ["--config_name", spec["config"], "--tokenizer_name", spec["tokenizer"], "--train_files", spec["corpus"],
            "--data_cache_dir", spec["cache"], "--block_size", str(spec["block_size"]), "--max_steps", "1",
            "--per_device_train_batch_size", str(spec["batch"]), "--save_strategy", "no", "--eval_strategy", "no",
            "--report_to", "none", "--output_dir", str(output), "--overwrite_output_dir"]


def command(launched: bool, frozen: bool, flags: list[str]) -> list[str]:
    program = [str(ROOT / "train_loop.py")] if frozen else ["-c", WITHOUT_FREEZE]
    if not launched:
        return [sys.executable, *program, *flags]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "accelerate_configs" / "zero2.yaml"), "--num_processes", "2", "--main_process_port",
              str(free_local_port())]
    if not frozen:  # accelerate launches a script; this one runs cli() and nothing after it
        script = Path(flags[flags.index("--output_dir") + 1]).parent / "without_freeze.py"
        script.write_text(WITHOUT_FREEZE.replace("import sys, ", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                                                 "import "))
        program = [str(script)]
    return [*launch, *program, *flags]


def seconds(cmd: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=1, warmup=0, layers=2, block_size=64, batch=2)
    parser.add_argument("--rounds", type=int, default=4)
    options = parser.parse_args()
    sides = [(launched, frozen) for launched in (False, True) for frozen in (True, False)]
    times: dict[tuple[bool, bool], list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as work_dir:
        spec = prepare(Path(work_dir), options)
        seconds(command(False, True, run_flags(spec, Path(work_dir) / "cache_build")))  # the data cache, once
        for round_index in range(options.rounds):
            for launched in (False, True):
                pair = [True, False] if round_index % 2 == 0 else [False, True]  # who goes first alternates
                for frozen in pair:
                    output = Path(work_dir) / f"run-{round_index}-{launched}-{frozen}"
                    output.mkdir()
                    times[(launched, frozen)].append(seconds(command(launched, frozen, run_flags(spec, output / "o"))))
    print(f"One optimizer step of a {options.layers}-layer x {options.hidden_size} model, whole process; "
          f"{options.rounds} rotated rounds, medians; CPU ({os.cpu_count()} cores)")
    print("| how | python train_loop.py, s | without the freeze, s | ratio |")
    print("|---|---:|---:|---:|")
    for launched, name in ((False, "one process"), (True, "accelerate launch, zero2.yaml x 2")):
        frozen, plain = (statistics.median(times[(launched, side)]) for side in (True, False))
        print(f"| {name} | {frozen:.2f} | {plain:.2f} | {frozen / plain:.2f} |")


if __name__ == "__main__":
    main()
