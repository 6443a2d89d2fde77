"""Time from launch to the first optimizer step after a resume: at step 10 against at step 5,000.

Resuming skips the consumed batches by index (never reading them), so the cost should not grow with the step.
The step-5,000 checkpoint is the step-10 checkpoint with its counters (trainer state, schedule position) moved
to step 5,000 in the same epoch: the weights do not change what is measured, the data position does.

    python bench/resume_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.checkpointing.checkpoints import MANIFEST, TRAINER_STATE  # noqa: E402
from pretrain.data import demo_corpus  # noqa: E402

FAR = 5000


def command(spec: dict, output: Path, max_steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_loop.py"), "--config_name", spec["config"],
            "--tokenizer_name", spec["tokenizer"], "--train_files", spec["corpus"], "--data_cache_dir", spec["cache"],
            "--validation_split_percentage", "0", "--block_size", "16", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "2", "--max_steps", str(max_steps), "--num_train_epochs", "1",
            "--logging_steps", "1", "--save_steps", "10", "--eval_strategy", "no", "--report_to", "none",
            "--output_dir", str(output), *extra]


def move_checkpoint(source: Path, target: Path, step: int) -> None:
    """Copy a checkpoint and move its step counters, keeping its manifest consistent."""
    shutil.copytree(source, target)
    state = json.loads((target / TRAINER_STATE).read_text())
    tokens_per_step = state["tokens_seen"] // state["step"]
    state.update(step=step, step_in_epoch=step, tokens_seen=step * tokens_per_step)
    (target / TRAINER_STATE).write_text(json.dumps(state))
    scheduler = torch.load(target / "scheduler.bin", weights_only=False)
    scheduler.update(last_epoch=step, _step_count=step + 1)
    torch.save(scheduler, target / "scheduler.bin")
    manifest = {str(p.relative_to(target)): p.stat().st_size for p in target.rglob("*")
                if p.is_file() and p.name != MANIFEST}
    (target / MANIFEST).write_text(json.dumps(manifest))


def seconds_to_first_step(spec: dict, checkpoint: Path, step: int, work: Path) -> float:
    output = work / f"resume_{step}"
    shutil.rmtree(output, ignore_errors=True)
    metrics = output / "metrics.jsonl"
    start = time.perf_counter()
    log = tempfile.TemporaryFile("w+")  # not a pipe: one that nobody reads while waiting would fill and block it
    process = subprocess.Popen(command(spec, output, step + 50, "--resume_from_checkpoint", str(checkpoint)),
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    while not (metrics.exists() and metrics.read_text().strip()):
        if process.poll() is not None:
            raise SystemExit(log.seek(0) or log.read()[-3000:])
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    process.kill()
    process.wait()
    first = json.loads(metrics.read_text().splitlines()[0])["step"]
    assert first == step + 1, (first, step)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        corpus, tokenizer = demo_corpus.ensure_demo_assets(work / "demo")
        from transformers import Qwen2Config
        Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64).save_pretrained(work / "config")
        spec = {"corpus": str(corpus), "tokenizer": str(tokenizer), "config": str(work / "config"),
                "cache": str(work / "cache")}
        subprocess.run(command(spec, work / "first", 10), check=True, capture_output=True, cwd=ROOT)
        near = work / "first" / "checkpoint-10"
        far = work / f"checkpoint-{FAR}"
        move_checkpoint(near, far, FAR)
        results = {10: [], FAR: []}
        for _ in range(options.repeats):
            for step, checkpoint in ((10, near), (FAR, far)):
                results[step].append(seconds_to_first_step(spec, checkpoint, step, work))
    print(f"1 process, CPU; GA 2: resuming at step {FAR} skips {2 * FAR} batches; median of {options.repeats}")
    print("| resume at step | seconds from launch to the first optimizer step |")
    print("|---:|---:|")
    for step, times in results.items():
        print(f"| {step:,} | {statistics.median(times):.2f} |")
    print(f"ratio {FAR} / 10: {statistics.median(results[FAR]) / statistics.median(results[10]):.3f}")


if __name__ == "__main__":
    main()
