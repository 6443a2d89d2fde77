"""Peak memory and tokens/s of train_loop.py with the loss on full logits against --loss_chunk_size.

A Qwen2 model whose output projection has Qwen2.5's 151,936-token vocabulary (tied, as in Qwen2.5-0.5B/1.5B),
so that the logits (tokens x vocabulary) are the largest tensors of a step. Each row is its own train_loop.py
process on the same data; tokens/s is the median over the steps after a warm-up, peak memory is the loop's own
`peak_mem_gb` (the process's peak RSS on a CPU, peak allocated memory on CUDA).

    python bench/loss_chunking.py [--chunks 0 2048 512] [--steps 6] [--warmup 2] [--hidden_size 256] [--bf16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from train_throughput import add_run_arguments, packed_blocks, prepare, train_loop_records

QWEN_VOCAB = 151936


def run(spec: dict, chunk: int, options) -> dict:
    records = train_loop_records(spec, Path(spec["work"]) / f"chunk{chunk}", "--config_overrides",
                                 f"vocab_size={QWEN_VOCAB}", "--loss_chunk_size", str(chunk),
                                 *(["--bf16"] if options.bf16 else []))
    timed = [r["step_time_s"] for r in records][options.warmup:]
    return {"tokens_per_s": spec["batch"] * spec["block_size"] / statistics.median(timed),
            "peak_mem_gb": records[-1]["peak_mem_gb"], "loss": records[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 2048, 512],
                        help="--loss_chunk_size values to compare; 0 is transformers' loss on full logits")
    add_run_arguments(parser, steps=6, warmup=2, layers=2, block_size=512, batch=4)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast on CPU)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        spec = prepare(Path(work), options)
        packed_blocks(spec)  # build the cache once, outside every run
        results = {chunk: run(spec, chunk, options) for chunk in options.chunks}
    full = results[options.chunks[0]]
    tokens = options.batch * options.block_size
    print(f"model: Qwen2 hidden {options.hidden_size} x {options.layers} layers, vocab {QWEN_VOCAB:,} (tied), "
          f"{tokens:,} tokens per step (batch {options.batch} x block {options.block_size}), "
          f"{'bf16' if options.bf16 else 'fp32'}, 1 process; median of {options.steps} steps after {options.warmup}")
    print(f"| --loss_chunk_size | tokens/s | / chunk {options.chunks[0]} | peak memory GB | / chunk {options.chunks[0]} "
          f"| loss at step {spec['steps']} |")
    print("|---:|---:|---:|---:|---:|---:|")
    for chunk, result in results.items():
        print(f"| {chunk} | {result['tokens_per_s']:,.0f} | {result['tokens_per_s'] / full['tokens_per_s']:.3f} | "
              f"{result['peak_mem_gb']:.2f} | {result['peak_mem_gb'] / full['peak_mem_gb']:.3f} | "
              f"{result['loss']:.4f} |")


if __name__ == "__main__":
    main()
