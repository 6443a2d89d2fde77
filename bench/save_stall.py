"""Training time lost per checkpoint save: synchronous saves, saves in the background, and DeepSpeed's decoupled
checkpoint engine, under ZeRO-2.

The model has Qwen's vocabulary (151,936, tied) on a small body, so that its ZeRO-2 checkpoint (fp32 weights,
master weights and AdamW's two moments: 16 bytes a parameter) is over 1 GB. Each side trains the same steps with
`accelerate launch --config_file accelerate_configs/zero2.yaml --num_processes N` (one thread each), saving every
--save_every steps. Every step is logged, so each step's wall time is read from metrics.jsonl (`elapsed_s`, which
counts saves). The time a save costs is the sum, over the 3 steps after it, of (the step's wall time - the run's
median step): they hold the save itself and any write still under way, and stand out from the median whatever the
machine's speed that round. The first save and the later ones are given apart: the first background save also
allocates the memory its snapshot is copied into, which the later ones reuse. The rounds rotate the sides; the table
gives medians.

With as many processes as cores, training keeps every core busy and a background write takes its CPU from
training; with a core left free (as on a GPU machine, whose CPUs wait on the accelerator) it does not.

    python bench/save_stall.py [--processes 2] [--rounds 2] [--steps 24] [--save_every 6]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.data import demo_corpus  # noqa: E402
from pretrain.distributed.launch import free_local_port  # noqa: E402

SIDES = {"synchronous saves": ["--save_in_background", "false"], "saves in the background": [],
         "DeepSpeed's decoupled engine": ["--save_in_background", "false"]}
DECOUPLED = {"checkpoint": {"writer": {"type": "python", "decoupled": True}}}  # DeepSpeed's own background writer


def decoupled_config(work: Path) -> Path:
    """zero2.yaml with ds_config_zero2.json plus DeepSpeed's decoupled checkpoint writer."""
    ds_config = {**json.loads((ROOT / "ds_config_zero2.json").read_text()), **DECOUPLED}
    (work / "ds_decoupled.json").write_text(json.dumps(ds_config))
    yaml = (ROOT / "accelerate_configs" / "zero2.yaml").read_text()
    (work / "zero2_decoupled.yaml").write_text(yaml.replace("deepspeed_config_file: ds_config_zero2.json",
                                                            f"deepspeed_config_file: {work / 'ds_decoupled.json'}"))
    return work / "zero2_decoupled.yaml"


def run(side: str, spec: dict, work: Path, options) -> dict:
    output = work / side.replace(" ", "_").replace("'", "")
    config = decoupled_config(work) if side == "DeepSpeed's decoupled engine" else \
        ROOT / "accelerate_configs" / "zero2.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(options.processes), "--main_process_port",
               str(free_local_port()), str(ROOT / "train_loop.py"), "--config_name", spec["config"],
               "--tokenizer_name", spec["tokenizer"], "--train_files", spec["corpus"],
               "--data_cache_dir", spec["cache"], "--output_dir", str(output), "--overwrite_output_dir",
               "--block_size", "64", "--per_device_train_batch_size", "1", "--max_steps", str(options.steps),
               "--save_steps", str(options.save_every), "--logging_steps", "1", "--eval_strategy", "no",
               "--report_to", "none", "--learning_rate", "1e-4", *SIDES[side]]
    begin = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if "Error" in line]
        print(f"{side} failed: {(lines or [result.stderr.strip()[-300:]])[-1]}", flush=True)
        return {}
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in records if "loss" in r and "elapsed_s" in r}
    walls = {step: elapsed[step] - elapsed[step - 1] for step in elapsed if step - 1 in elapsed}  # from step 2
    median = statistics.median(walls.values())
    lost = [sum(walls[step] - median for step in range(at + 1, at + 4)) for at in timed_saves(options)]
    checkpoint = max(output.glob("checkpoint-*"), key=lambda p: p.stat().st_mtime, default=None)
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()) if checkpoint else 0
    blocked = {r["step"]: r.get("save_s", 0.0) for r in records if "loss" in r}
    first, *later = timed_saves(options)
    return {"lost_first": lost[0], "lost_later": statistics.mean(lost[1:]), "median_step": median,
            "blocked_first": blocked[first + 1], "blocked_later": statistics.mean(blocked[at + 1] for at in later),
            "checkpoint_gb": size / 1e9, "lost": [round(x, 2) for x in lost], "wall": time.perf_counter() - begin,
            "snapshots_s": re.findall(r"taken in ([\d.]+) s", result.stderr),
            "written_s": re.findall(r"written in the background in ([\d.]+) s", result.stderr),
            "blocked": [round(blocked[at + 1], 2) for at in timed_saves(options)]}


def timed_saves(options) -> range:
    """The steps saved at that have 3 steps after them."""
    return range(options.save_every, options.steps - 2, options.save_every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--save_every", type=int, default=6)
    parser.add_argument("--hidden_size", type=int, default=512)
    options = parser.parse_args()
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        corpus, tokenizer = demo_corpus.ensure_demo_assets(work / "demo")
        from transformers import Qwen2Config
        Qwen2Config(vocab_size=151936, hidden_size=options.hidden_size, intermediate_size=options.hidden_size * 3,
                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=True).save_pretrained(work / "config")
        spec = {"corpus": str(corpus), "tokenizer": str(tokenizer), "config": str(work / "config"),
                "cache": str(work / "cache")}
        sides = list(SIDES)
        for round_index in range(options.rounds):
            for side in sides[round_index % len(sides):] + sides[:round_index % len(sides)]:
                results[side].append(run(side, spec, work, options))
                print(f"round {round_index + 1} {side}: {results[side][-1]}", flush=True)
    saves = len(timed_saves(options))
    if saves < 2:
        parser.error("--steps must leave room for two saves with 3 steps after each")
    sync = {when: statistics.median(r[f"lost_{when}"] for r in results["synchronous saves"] if r)
            for when in ("first", "later")}
    size = max(r["checkpoint_gb"] for r in results["synchronous saves"])
    print(f"\nzero2.yaml x {options.processes} on {os.cpu_count()} CPU cores; checkpoints of {size:.2f} GB; "
          f"{options.steps} steps, {saves} saves timed (each with the 3 steps after it); medians of {options.rounds} "
          f"rotated rounds")
    print("| side | median step s | save | blocked in the save, s | training time lost, s | against synchronous |")
    print("|---|---:|---|---:|---:|---:|")
    for side, rows in results.items():
        rows = [row for row in rows if row]
        if not rows:
            print(f"| {side} | failed (above) | | | | |")
            continue
        step = statistics.median(r["median_step"] for r in rows)
        for when, label in (("first", "the first"), ("later", "each later one")):
            lost = statistics.median(r[f"lost_{when}"] for r in rows)
            print(f"| {side} | {step:.2f} | {label} | {statistics.median(r[f'blocked_{when}'] for r in rows):.2f} | "
                  f"{lost:.2f} | {lost / sync[when]:.2f} |")


if __name__ == "__main__":
    main()
