"""--optim adamw against --optim muon: eval loss against tokens at a few learning rates each, on the same tokens.

Every run is `train_loop.py` on one process, from the same initial weights, over the same blocks in the same order
(same seed), evaluated on the same held-out blocks every --eval_every steps. The text is Chinese-like and the
tokenizer a byte-level BPE trained here on that text. Muon trains the hidden matrices only: in Qwen2.5-1.5B they hold
85 % of the parameters, and a model that a 2-core CPU trains in an hour holds most of them only with a small
vocabulary (8,192 by default: 71 %; with 70,000 entries, int32 ids as Qwen's, 23 %); the printed share says which.

The table gives, for each run: eval loss at equal tokens (the last evaluation), the tokens each run needed to reach
AdamW's best final eval loss (linear between evaluations; "-" if it never did) and their ratio to AdamW's, the median
tokens/s of the training steps, and the optimizer state's bytes per trained parameter (counted on the model after one
step). A picture of eval loss against tokens, one line per run, is written beside the table (optimizers.png).

    pip install -r bench/requirements.txt          # matplotlib, for the picture
    python bench/optimizers.py [--layers 8] [--hidden_size 256] [--steps 300] [--block_size 128] [--batch 16] \
        [--tokenizer_size 8192] [--adamw_lrs 1e-3 3e-3] [--muon_lrs 1e-3 3e-3] [--eval_every 25] \
        [--eval_blocks 32] [--documents 30000] [--output bench/optimizers.png]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_pipeline import cjk_corpus, cjk_tokenizer  # noqa: E402


def write_config(work: Path, options, tokenizer) -> Path:
    from transformers import Qwen2Config

    heads = max(1, options.hidden_size // 64)
    Qwen2Config(vocab_size=len(tokenizer), hidden_size=options.hidden_size,
                intermediate_size=int(options.hidden_size * 8 / 3) // 64 * 64, num_hidden_layers=options.layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                max_position_embeddings=options.block_size, tie_word_embeddings=True,
                eos_token_id=tokenizer.eos_token_id).save_pretrained(work / "config")
    return work / "config"


def model_and_optimizer(config: Path, optim: str):
    """The model of `config` from seed 0 and the loop's optimizer for it (one process, --optim `optim`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pretrain.base.arguments import TrainArguments
    from pretrain.optim.optimizers import build_optimizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config))
    return model, build_optimizer(model, TrainArguments(optim=optim), None)


def train_step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_bytes_per_parameter(config: Path, optim: str) -> tuple[float, float]:
    """(optimizer-state bytes per trained parameter after one step, share of parameters on Muon's side)."""
    import torch

    from pretrain.base.arguments import TrainArguments
    from pretrain.checkpointing.background_save import tensor_bytes
    from pretrain.optim.optimizers import parameter_groups

    model, optimizer = model_and_optimizer(config, optim)
    train_step(model, optimizer, torch.randint(0, model.config.vocab_size, (1, 16)))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    held = tensor_bytes(list(optimizer.state.values()))
    muon = sum(p.numel() for group in parameter_groups(model, TrainArguments(optim="muon")) if group["muon"]
               for p in group["params"])
    return held / trained, muon / trained


def train(work: Path, options, name: str, optim: str, lr: float) -> dict:
    output = work / name
    command = [sys.executable, str(ROOT / "train_loop.py"), "--config_name", str(work / "config"),
               "--tokenizer_name", str(work / "tokenizer"), "--train_files", str(work / "corpus.jsonl"),
               "--data_cache_dir", str(work / "cache"), "--output_dir", str(output),
               "--block_size", str(options.block_size), "--per_device_train_batch_size", str(options.batch),
               "--max_steps", str(options.steps), "--warmup_steps", str(options.steps // 10),
               "--learning_rate", str(lr), "--optim", optim, "--validation_split_percentage", "2",
               "--max_eval_samples", str(options.eval_blocks), "--eval_steps", str(options.eval_every),
               "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none", "--seed", "0"]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r and r["step"] > 3]
    tokens_at = {r["step"]: r["tokens_seen"] for r in records if "tokens_seen" in r}
    curve = [(tokens_at[r["step"]], r["eval_loss"]) for r in records if "eval_loss" in r]
    return {"name": name, "optim": optim, "lr": lr, "curve": curve, "seconds": time.monotonic() - started,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps)}


def step_seconds(config: Path, options, rounds: int) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, optimizer step) for each optimizer, the two stepping
    in turn in this one process, so that a load from elsewhere slows both alike (the per-run tokens/s above are
    minutes apart)."""
    import torch

    sides = {optim: (*model_and_optimizer(config, optim), []) for optim in ("adamw", "muon")}
    ids = torch.randint(0, sides["adamw"][0].config.vocab_size, (options.batch, options.block_size))
    for round_index in range(rounds + 2):  # the first two warm up
        for model, optimizer, times in sides.values():
            started = time.perf_counter()
            train_step(model, optimizer, ids)
            if round_index >= 2:
                times.append(time.perf_counter() - started)
    return {optim: statistics.median(times) for optim, (_, _, times) in sides.items()}


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The tokens at which the eval loss first reaches `target`, linear between evaluations."""
    for (tokens_before, before), (tokens, loss) in zip([(0, float("inf"))] + curve, curve):
        if loss <= target:
            if before == float("inf"):
                return tokens
            return tokens_before + (tokens - tokens_before) * (before - target) / (before - loss)
    return None


def draw(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for run in runs:
        tokens, losses = zip(*run["curve"])
        axes.plot([t / 1e6 for t in tokens], losses, marker="o", markersize=3,
                  linestyle="-" if run["optim"] == "muon" else "--", label=f"{run['optim']} lr {run['lr']:g}")
    axes.set_xlabel("tokens (millions)")
    axes.set_ylabel("eval loss")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def train_all(work: Path, options, plan: list[tuple[str, float]]) -> list[dict]:
    """Every run of the plan, AdamW and Muon alternating, so that the machine's drift touches both alike."""
    runs = []
    for optim, lr in plan:
        runs.append(train(work, options, f"{optim}_{lr:g}", optim, lr))
        print(f"  {runs[-1]['name']}: final eval loss {runs[-1]['curve'][-1][1]:.4f} in "
              f"{runs[-1]['seconds']:.0f} s", flush=True)
    return runs


def print_table(runs: list[dict], state: dict[str, tuple[float, float]]) -> None:
    adamw = [run for run in runs if run["optim"] == "adamw"]
    best = min(adamw, key=lambda run: run["curve"][-1][1])
    target, adamw_tokens = best["curve"][-1][1], best["curve"][-1][0]
    adamw_rate = statistics.median(run["tokens_per_s"] for run in adamw)
    print(f"\n| run | eval loss at {runs[0]['curve'][-1][0]:,} tokens | tokens to {target:.4f} (AdamW's best) | "
          f"/ AdamW's | tokens/s | / AdamW's | optimizer state, bytes per parameter |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in sorted(runs, key=lambda run: (run["optim"], run["lr"])):
        reached = tokens_to_reach(run["curve"], target)
        print(f"| {run['optim']} lr {run['lr']:g} | {run['curve'][-1][1]:.4f} | "
              f"{'-' if reached is None else f'{reached:,.0f}'} | "
              f"{'-' if reached is None else f'{reached / adamw_tokens:.2f}'} | {run['tokens_per_s']:,.0f} | "
              f"{run['tokens_per_s'] / adamw_rate:.2f} | {state[run['optim']][0]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run; 0: the step time only")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="blocks per step")
    parser.add_argument("--adamw_lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--muon_lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--eval_every", type=int, default=25, help="steps between evaluations")
    parser.add_argument("--eval_blocks", type=int, default=32, help="held-out blocks of each evaluation")
    parser.add_argument("--documents", type=int, default=30000, help="documents of the generated corpus")
    parser.add_argument("--tokenizer_size", type=int, default=8192,
                        help="entries of the byte-level BPE trained on it, and the model's vocabulary (at 70000 the "
                             "hidden matrices are 23 %% of 8 x 256's parameters, and a step 3x the arithmetic)")
    parser.add_argument("--step_rounds", type=int, default=30, help="steps of each optimizer timed in turn")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "optimizers.png")
    options = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        corpus = cjk_corpus(work / "corpus.jsonl", options.documents)
        tokenizer = AutoTokenizer.from_pretrained(cjk_tokenizer(corpus, work / "tokenizer",
                                                                 options.tokenizer_size))
        config = write_config(work, options, tokenizer)
        state = {optim: state_bytes_per_parameter(config, optim) for optim in ("adamw", "muon")}
        adamw, muon = ([(optim, lr) for lr in lrs] for optim, lrs in (("adamw", options.adamw_lrs),
                                                                     ("muon", options.muon_lrs)))
        plan = [side for pair in zip(adamw, muon) for side in pair] + adamw[len(muon):] + muon[len(adamw):]
        title = (f"{options.layers} layers x {options.hidden_size}, vocabulary {len(tokenizer):,}, "
                 f"{options.steps} steps of {options.batch} x {options.block_size} tokens; "
                 f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}")
        print(f"# {title}; hidden matrices {state['muon'][1]:.0%} of the parameters\n")
        if options.steps:
            runs = train_all(work, options, plan)
            print_table(runs, state)
            draw(runs, options.output, title)
            print(f"\nthe curves: {options.output}")
        seconds = step_seconds(config, options, options.step_rounds)
        print(f"\nstep time, AdamW and Muon in turn in one process, median of {options.step_rounds} rounds: "
              f"AdamW {seconds['adamw']:.3f} s, Muon {seconds['muon']:.3f} s, "
              f"Muon / AdamW {seconds['muon'] / seconds['adamw']:.3f}")


if __name__ == "__main__":
    main()
