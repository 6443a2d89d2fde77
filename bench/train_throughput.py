"""Training tokens/s of train_loop.py against a bare PyTorch loop and against transformers.Trainer.

Same model (random init, same seed), same packed blocks, same batch, fused AdamW and the same schedule in all
three; one process each, run one after the other. Each side times every optimizer step (median over the steps
after a warm-up). On a shared machine consecutive runs differ by up to 10%, so the three run in --rounds rounds,
each in a rotated order; the table shows each side's median over the rounds, ratios to train_loop.py, and the
range of the per-round ratios.

    python bench/train_throughput.py [--rounds 3] [--steps 40] [--warmup 10] [--hidden_size 256] [--layers 4]
    python bench/train_throughput.py --sides "train_loop.py --skip_bad_steps false" --rounds 6   # the guard's cost
    python bench/train_throughput.py --sides "bare PyTorch loop" "train_loop.py --train_mixture" --vocab_size 151936 \
        --layers 2 --block_size 128 --batch 4 --steps 24 --warmup 4 --rounds 4    # at Qwen's vocabulary
    python bench/train_throughput.py --sides "train_loop.py --telemetry_steps 0" "train_loop.py --telemetry_steps 1" \
        --vocab_size 151936 --layers 2 --block_size 128 --batch 4 --steps 16 --warmup 4 --rounds 4  # telemetry's cost
    python bench/train_throughput.py --telemetry_pairs --vocab_size 151936 --layers 2 --block_size 128 --batch 4 \
        --steps 24 --warmup 4      # a telemetry step against the step before it, in one run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import data_utils  # noqa: E402
from pretrain.data import demo_corpus  # noqa: E402


def prepare(work: Path, options) -> dict:
    """The shared inputs: demo corpus and tokenizer, a model config, the packed cache."""
    from transformers import AutoTokenizer, Qwen2Config

    corpus, tokenizer_dir = demo_corpus.ensure_demo_assets(work / "demo")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_dir = work / "config"
    Qwen2Config(vocab_size=max(len(tokenizer), options.vocab_size or 0), hidden_size=options.hidden_size, intermediate_size=4 * options.hidden_size,
                num_hidden_layers=options.layers, num_attention_heads=options.hidden_size // 64,
                num_key_value_heads=max(1, options.hidden_size // 128), max_position_embeddings=options.block_size,
                tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id).save_pretrained(config_dir)
    return {"corpus": str(corpus), "tokenizer": str(tokenizer_dir), "config": str(config_dir),
            "cache": str(work / "cache"), "work": str(work), "block_size": options.block_size,
            "batch": options.batch, "steps": options.steps + options.warmup, "lr": 1e-3}


def add_run_arguments(parser: argparse.ArgumentParser, *, steps: int, warmup: int, layers: int, block_size: int,
                      batch: int) -> None:
    """The options that prepare() reads, with each benchmark's own defaults."""
    parser.add_argument("--steps", type=int, default=steps, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed first steps")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--block_size", type=int, default=block_size)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--vocab_size", type=int, help="the model's vocabulary (default: the demo tokenizer's); "
                        "151936 is Qwen's, whose output head and loss dominate a small model's step")


def packed_blocks(spec: dict):
    from transformers import AutoTokenizer

    args = data_utils.DataArguments(train_files=[spec["corpus"]], block_size=spec["block_size"],
                                    data_cache_dir=spec["cache"], validation_split_percentage=0)
    return data_utils.prepare_data(args, AutoTokenizer.from_pretrained(spec["tokenizer"]), seed=42).train


def count_parameters(spec: dict) -> int:
    """The spec's model size, counted on the meta device (no memory), the tied embedding once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["config"]))
    return sum(p.numel() for p in model.parameters())


def fresh_model(spec: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(42)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["config"]))


def train_loop_records(spec: dict, output: Path, *extra: str, data: tuple[str, ...] = ()) -> list[dict]:
    """Run train_loop.py as a user would on the spec's model and blocks (or on `data`, flags that name other
    training data); its record of every optimizer step."""
    command = [sys.executable, str(ROOT / "train_loop.py"), "--config_name", spec["config"],
               "--tokenizer_name", spec["tokenizer"], *(data or ("--train_files", spec["corpus"])),
               "--data_cache_dir", spec["cache"],
               "--validation_split_percentage", "0", "--block_size", str(spec["block_size"]),
               "--per_device_train_batch_size", str(spec["batch"]), "--max_steps", str(spec["steps"]),
               "--learning_rate", str(spec["lr"]), "--logging_steps", "1", "--save_strategy", "no",
               "--eval_strategy", "no", "--report_to", "none", "--output_dir", str(output), "--overwrite_output_dir",
               *extra]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def run_train_loop(spec: dict) -> list[float]:
    records = train_loop_records(spec, Path(spec["work"]) / "train_loop_out", "--weight_decay", "0")
    return [r["step_time_s"] for r in records]


def run_train_loop_unguarded(spec: dict) -> list[float]:
    """train_loop.py without skipped steps (--skip_bad_steps false): what the guard costs."""
    records = train_loop_records(spec, Path(spec["work"]) / "unguarded_out", "--weight_decay", "0",
                                 "--skip_bad_steps", "false")
    return [r["step_time_s"] for r in records]


def run_train_loop_mixture(spec: dict) -> list[float]:
    """train_loop.py on a mixture of two sources (the corpus twice): what the per-source losses cost."""
    records = train_loop_records(spec, Path(spec["work"]) / "mixture_out", "--weight_decay", "0",
                                 data=("--train_mixture", f"a=1:{spec['corpus']}", f"b=1:{spec['corpus']}"))
    return [r["step_time_s"] for r in records]


def run_train_loop_telemetry(every: int):
    """train_loop.py with per-layer telemetry every `every` steps (0: off): what --telemetry_steps costs."""
    def run(spec: dict) -> list[float]:
        records = train_loop_records(spec, Path(spec["work"]) / f"telemetry_{every}_out", "--weight_decay", "0",
                                     "--telemetry_steps", str(every))
        return [r["step_time_s"] for r in records]
    return run


def telemetry_pairs(spec: dict, warmup: int) -> None:
    """--telemetry_pairs: train_loop.py with per-layer telemetry every second step, so that each telemetry step has
    a step without it just before it, under the same load of a shared machine; prints the median of their ratios and
    what that makes at the default cadence (one telemetry step in 50)."""
    from pretrain.base.arguments import TrainArguments

    records = train_loop_records(spec, Path(spec["work"]) / "pairs_out", "--weight_decay", "0", "--telemetry_steps", "2")
    times = {record["step"]: record["step_time_s"] for record in records}
    ratios = [times[step] / times[step - 1] for step in times if step % 2 == 0 and step - 1 > warmup]
    ratio, every = statistics.median(ratios), TrainArguments.telemetry_steps
    print(f"telemetry step / the step before it: median {ratio:.3f} over {len(ratios)} pairs (range {min(ratios):.3f} - "
          f"{max(ratios):.3f}); at --telemetry_steps {every}: {(ratio - 1) / every:+.2%} of the step time")


def run_bare(spec: dict) -> list[float]:
    """The minimal hand-written loop: no Accelerate, no logging beyond reading the loss."""
    import torch
    from transformers import get_scheduler

    model = fresh_model(spec)
    loader = data_utils.build_train_dataloader(packed_blocks(spec), spec["batch"], spec["batch"], seed=42)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0, betas=(0.9, 0.95), fused=True)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=spec["steps"])
    model.train()
    times = []
    iterator = iter(loader)
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        batch = next(iterator)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return times


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks as the Trainer takes them: input_ids and labels (the model shifts them)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        ids = torch.from_numpy(self.blocks[index].astype("int64"))
        return {"input_ids": ids, "labels": ids}


class StepTimes(TrainerCallback):
    """Each Trainer step's seconds (the device synchronised at both ends) and the last logged loss."""

    def __init__(self):
        self.times, self.start, self.loss = [], None, None

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.times.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.loss = (logs or {}).get("loss", self.loss)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_trainer(spec: dict) -> list[float]:
    """transformers.Trainer, as the reference chapter uses it."""
    from transformers import Trainer, TrainingArguments

    timer = StepTimes()
    arguments = TrainingArguments(output_dir=str(Path(spec["work"]) / "trainer_out"),
                                  per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                                  learning_rate=spec["lr"], lr_scheduler_type="cosine", weight_decay=0.0,
                                  adam_beta2=0.95, logging_steps=1, save_strategy="no", report_to=[],
                                  optim="adamw_torch_fused", use_cpu=True, dataloader_num_workers=0,
                                  disable_tqdm=True, seed=42)
    Trainer(model=fresh_model(spec), args=arguments, train_dataset=BlockDataset(packed_blocks(spec)),
            callbacks=[timer]).train()
    return timer.times


RUNNERS = {"train_loop.py": run_train_loop, "bare PyTorch loop": run_bare, "transformers.Trainer": run_trainer,
           "train_loop.py --skip_bad_steps false": run_train_loop_unguarded,
           "train_loop.py --train_mixture": run_train_loop_mixture,
           "train_loop.py --telemetry_steps 0": run_train_loop_telemetry(0),
           "train_loop.py --telemetry_steps 1": run_train_loop_telemetry(1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, steps=40, warmup=10, layers=4, block_size=256, batch=8)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each loop, in rotated order")
    parser.add_argument("--sides", nargs="+", default=list(RUNNERS)[:3], choices=list(RUNNERS),
                        help="the loops to compare (train_loop.py always among them)")
    parser.add_argument("--telemetry_pairs", action="store_true",
                        help="instead of the sides: the cost of a --telemetry_steps step against the step before it")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one side, print its step times
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        print(json.dumps(RUNNERS[options.one](json.loads(options.spec))))
        return
    with tempfile.TemporaryDirectory() as work:
        spec = prepare(Path(work), options)
        vocabulary = json.loads((Path(spec["config"]) / "config.json").read_text())["vocab_size"]
        packed_blocks(spec)  # build the cache once, outside every timing
        if options.telemetry_pairs:
            return telemetry_pairs(spec, options.warmup)
        tokens_per_step = spec["batch"] * spec["block_size"]
        names = list(dict.fromkeys(["train_loop.py", *options.sides]))
        rounds = [{} for _ in range(options.rounds)]
        for index, result in enumerate(rounds):
            for name in names[index % len(names):] + names[:index % len(names)]:
                output = subprocess.run([sys.executable, __file__, "--one", name, "--spec", json.dumps(spec)],
                                        check=True, capture_output=True, text=True, cwd=ROOT).stdout
                times = json.loads(output.strip().splitlines()[-1])[options.warmup:]
                result[name] = tokens_per_step / statistics.median(times)
    print(f"model: Qwen2 hidden {options.hidden_size} x {options.layers} layers, vocabulary {vocabulary:,}, "
          f"block {options.block_size}, "
          f"batch {options.batch}, 1 process, CPU; median of {options.steps} steps after {options.warmup}; "
          f"{options.rounds} rounds")
    print("| loop | tokens/s (median of rounds) | train_loop.py / this | per-round ratios |")
    print("|---|---:|---:|---|")
    ours = statistics.median(result["train_loop.py"] for result in rounds)
    for name in names:
        tokens_per_s = statistics.median(result[name] for result in rounds)
        ratios = [result["train_loop.py"] / result[name] for result in rounds]
        print(f"| {name} | {tokens_per_s:,.0f} | {ours / tokens_per_s:.3f} | "
              f"{min(ratios):.3f} - {max(ratios):.3f} |")


if __name__ == "__main__":
    main()
