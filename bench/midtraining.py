"""Decisions taken while a run goes on, on one real-sized corpus: cosine against WSD, cooldown branches from one
stable run, and an average of the stable phase's last checkpoints.

Every run is `train_loop.py` on one process, from the same initial weights, over the same blocks in the same order
(same seed), evaluated on the same held-out blocks every --eval_every steps and at its last step. The text is
Chinese-like and the tokenizer a byte-level BPE of more than 65,536 entries trained here on it (bench/data_pipeline.py).

- cosine: --max_steps S, warmup then a cosine to 0;
- stable: the same warmup, then the peak held (`constant_with_warmup`) to the last branch point, a checkpoint every
  --save_every steps;
- branches: from the stable run's checkpoint at each --branch_points (fractions of S), a 1-sqrt decay over
  --branch_decay of its branch step, so that the finished model costs 1 + branch_decay times the tokens at its
  branch point: `--branch_from STABLE/checkpoint-B --max_steps B+D --lr_scheduler_type wsd --decay_steps D` in a
  new --output_dir (docs/mid-training.md);
- WSD with a 20 % 1-sqrt cooldown: by default the branch at 0.8 S, whose schedule over its S steps is exactly
  `--lr_scheduler_type wsd --decay_ratio 0.2 --decay_type 1-sqrt` from the same weights, optimizer state and data
  position as the in-line run has at that step, so it is not trained twice;
- average: `python -m pretrain.average_checkpoints --evaluate` over the stable run's last --average_last checkpoints,
  against the last one.

The table gives each model's final eval loss, its tokens, their ratio to its branch point's, and its eval loss
against cosine's; a second one the eval noise: each finished model's loss on the two halves of the held-out blocks,
its difference from cosine's on each half, and that difference's paired standard error over the blocks.
midtraining.png shows the learning rates against steps and eval loss against tokens.

    pip install -r bench/requirements.txt          # matplotlib, for the picture
    python bench/midtraining.py [--steps 120] [--save_every 12] [--branch_points 0.4 0.6 0.8] [--branch_decay 0.25] \
        [--average_last 4] [--layers 2] [--hidden_size 64] [--block_size 128] [--batch 8] [--lr 1e-2] \
        [--warmup 12] [--eval_every 24] [--eval_blocks 128] [--documents 30000] [--tokenizer_size 70000] \
        [--output bench/midtraining.png]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from data_pipeline import cjk_corpus, cjk_tokenizer  # noqa: E402
from optimizers import write_config  # noqa: E402


def base_flags(work: Path, options, output: Path) -> list[str]:
    return ["--config_name", str(work / "config"), "--tokenizer_name", str(work / "tokenizer"),
            "--train_files", str(work / "corpus.jsonl"), "--data_cache_dir", str(work / "cache"),
            "--output_dir", str(output), "--block_size", str(options.block_size),
            "--per_device_train_batch_size", str(options.batch), "--learning_rate", str(options.lr),
            "--warmup_steps", str(options.warmup), "--validation_split_percentage", "2",
            "--max_eval_samples", str(options.eval_blocks), "--eval_steps", str(options.eval_every),
            "--logging_steps", "1", "--report_to", "none", "--seed", "0"]


def train(work: Path, options, name: str, *flags: str, output: Path | None = None) -> dict:
    """One train_loop.py run (in `output`, or a folder named after it); its eval curve and rates."""
    output = output or work / name
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), *base_flags(work, options, output),
                             *map(str, flags)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    tokens_at = {r["step"]: r["tokens_seen"] for r in records if "tokens_seen" in r}
    run = {"name": name, "output": output, "seconds": time.monotonic() - started,
           "curve": [(tokens_at[r["step"]], r["eval_loss"]) for r in records if "eval_loss" in r],
           "lrs": sorted({r["step"]: r["lr"] for r in records if "lr" in r}.items())}
    print(f"  {name}: final eval loss {run['curve'][-1][1]:.4f} at {run['curve'][-1][0]:,} tokens, "
          f"{run['seconds']:.0f} s", flush=True)
    return run


def branch(work: Path, options, stable: dict, at: int) -> dict:
    """A cooldown from the stable run's checkpoint at step `at`, over branch_decay of it, in a folder of its own."""
    decay = round(options.branch_decay * at)
    name = f"branch at {at}, decay {decay}"
    if at + decay == options.steps:
        name = f"WSD, {decay / options.steps:.0%} 1-sqrt cooldown (= {name})"
    run = train(work, options, name, "--branch_from", stable["output"] / f"checkpoint-{at}", "--max_steps",
                at + decay, "--lr_scheduler_type", "wsd", "--decay_steps", decay, "--decay_type", "1-sqrt",
                "--save_strategy", "no", output=work / f"branch_{at}")
    run.update(branch_tokens=stable_tokens(stable, at), branch_step=at)
    run["curve"] = [point for point in run["curve"] if point[0] > run["branch_tokens"]]
    return run


def stable_tokens(stable: dict, step: int) -> int:
    return json.loads((stable["output"] / f"checkpoint-{step}" / "trainer_state.json").read_text())["tokens_seen"]


def average(work: Path, stable: dict, steps: list[int]) -> dict:
    """The average of the stable run's checkpoints at `steps`, evaluated beside each of them."""
    soup = work / "average"
    command = [sys.executable, "-m", "pretrain.average_checkpoints", "--checkpoints",
               *(str(stable["output"] / f"checkpoint-{step}") for step in steps), "--output_dir", str(soup),
               "--evaluate"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"averaging failed:\n{result.stderr[-3000:]}")
    print(f"  average of steps {steps}: {time.monotonic() - started:.0f} s\n{result.stdout}", flush=True)
    return json.loads((soup / "soup.json").read_text())["evaluation"]


def halves(work: Path, options, runs: list[dict]) -> None:
    """The eval noise: each finished model's loss on the two halves of the held-out blocks that every evaluation
    reads, and each one's difference from cosine on both halves with its paired standard error (over blocks)."""
    import numpy
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    blocks = torch.from_numpy(numpy.array(numpy.load(next((work / "cache").glob("*/validation.npy")),
                                                      mmap_mode="r")[:options.eval_blocks], dtype=numpy.int64))
    finished = [run for run in runs if not run["name"].startswith("stable")]
    losses = {}
    with torch.no_grad():
        for run in finished:
            model = AutoModelForCausalLM.from_pretrained(run["output"]).eval()
            losses[run["name"]] = torch.cat([model(input_ids=chunk, labels=chunk).loss.reshape(1)
                                             for chunk in blocks.split(1)])
    cosine, half = losses["cosine"], len(blocks) // 2
    print(f"\nthe eval noise, over {len(blocks)} held-out blocks (the loss is each block's mean, and its mean over "
          "them the run's final eval_loss):\n")
    print("| model | final eval loss (run / here) | first half | second half | - cosine's, first half | second half "
          "| - cosine's, all, +- paired s.e. |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in finished:
        loss = losses[run["name"]]
        difference = loss - cosine
        print(f"| {run['name']} | {run['curve'][-1][1]:.4f} / {loss.mean():.4f} | {loss[:half].mean():.4f} | "
              f"{loss[half:].mean():.4f} | {difference[:half].mean():+.4f} | {difference[half:].mean():+.4f} | "
              f"{difference.mean():+.4f} +- {difference.std() / len(blocks) ** 0.5:.4f} "
              f"({difference.mean() / cosine.mean():+.2%}) |")


def draw(runs: list[dict], averaged: tuple[int, float, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, losses) = plt.subplots(1, 2, figsize=(12, 5))
    for run in runs:
        style = {"linestyle": ":" if run["name"].startswith("stable") else "-", "label": run["name"]}
        steps, lrs = zip(*run["lrs"])
        rates.plot(steps, lrs, **style)
        tokens, values = zip(*run["curve"])
        losses.plot([t / 1e6 for t in tokens], values, marker="o", markersize=3, **style)
    tokens, last, soup = averaged
    losses.scatter([tokens / 1e6] * 2, [last, soup], marker="*", s=120, c=["grey", "black"], zorder=3,
                   label="last stable checkpoint (grey), average of the last ones (black)")
    rates.set_xlabel("step")
    rates.set_ylabel("learning rate")
    losses.set_xlabel("tokens (millions)")
    losses.set_ylabel("eval loss")
    losses.set_ylim(top=min(run["curve"][0][1] for run in runs if not run.get("branch_step")) + 0.2)
    for axes in (rates, losses):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def print_table(runs: list[dict], averaged: dict, average_steps: list[int], stable: dict) -> None:
    cosine = runs[0]["curve"][-1][1]
    last = f"stable/checkpoint-{average_steps[-1]}"
    tokens = stable_tokens(stable, average_steps[-1])
    rows = [(run["name"], run["curve"][-1][1], run["curve"][-1][0], run.get("branch_tokens")) for run in runs
            if run is not stable]  # its end is the last checkpoint below
    rows += [(f"stable, its last checkpoint (step {average_steps[-1]})", averaged[last]["eval_loss"], tokens, None),
             (f"average of stable steps {', '.join(map(str, average_steps))}", averaged["average"]["eval_loss"],
              tokens, None)]
    print("\n| model | final eval loss | tokens | / tokens at its branch point | eval loss / cosine's |")
    print("|---|---:|---:|---:|---:|")
    for name, loss, seen, branch_tokens in rows:
        ratio = f"{seen / branch_tokens:.2f}" if branch_tokens else "-"
        print(f"| {name} | {loss:.4f} | {seen:,} | {ratio} | {loss / cosine:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="S: the cosine's and WSD's length")
    parser.add_argument("--save_every", type=int, default=12, help="the stable run's checkpoint spacing (steps)")
    parser.add_argument("--branch_points", type=float, nargs="+", default=[0.4, 0.6, 0.8],
                        help="fractions of S, each a multiple of --save_every; the last is where the stable run ends")
    parser.add_argument("--branch_decay", type=float, default=0.25, help="a branch's decay over its branch step")
    parser.add_argument("--average_last", type=int, default=4, help="stable checkpoints averaged")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="blocks per step")
    parser.add_argument("--lr", type=float, default=1e-2, help="the peak (tuned for cosine: 3e-3, 1e-2, 3e-2)")
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--eval_every", type=int, default=24, help="steps between evaluations")
    parser.add_argument("--eval_blocks", type=int, default=128, help="held-out blocks of each evaluation")
    parser.add_argument("--documents", type=int, default=30000, help="documents of the generated corpus")
    parser.add_argument("--tokenizer_size", type=int, default=70000, help="entries of the byte-level BPE")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "midtraining.png")
    options = parser.parse_args()
    points = [round(fraction * options.steps) for fraction in options.branch_points]
    if any(point % options.save_every for point in points):
        parser.error(f"--branch_points give steps {points}: each must be a multiple of --save_every")
    from transformers import AutoTokenizer

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        corpus = cjk_corpus(work / "corpus.jsonl", options.documents)
        tokenizer = AutoTokenizer.from_pretrained(cjk_tokenizer(corpus, work / "tokenizer", options.tokenizer_size))
        write_config(work, options, tokenizer)
        title = (f"{options.layers} layers x {options.hidden_size}, vocabulary {len(tokenizer):,}, {options.steps} "
                 f"steps of {options.batch} x {options.block_size} tokens at lr {options.lr:g}; "
                 f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}")
        print(f"# {title}\n", flush=True)
        steps = options.steps
        runs = [train(work, options, "cosine", "--max_steps", steps, "--save_strategy", "no")]
        stable = train(work, options, "stable", "--max_steps", points[-1], "--lr_scheduler_type",
                       "constant_with_warmup", "--save_steps", options.save_every)
        runs += [stable, *(branch(work, options, stable, at) for at in points)]
        average_steps = list(range(points[-1] - options.save_every * (options.average_last - 1), points[-1] + 1,
                                   options.save_every))
        averaged = average(work, stable, average_steps)
        print_table(runs, averaged, average_steps, stable)
        halves(work, options, runs)
        last = averaged[f"stable/checkpoint-{average_steps[-1]}"]["eval_loss"]
        draw(runs, (stable_tokens(stable, points[-1]), last, averaged["average"]["eval_loss"]), options.output,
             title)
    print(f"\nthe curves: {options.output}; the whole bench took {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
