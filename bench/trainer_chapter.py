"""The reference chapter's run, for bench/gpu_mfu.sh: transformers.Trainer with the chapter's DeepSpeed JSON (ZeRO-2,
DeepSpeed's AdamW, WarmupLR) and flags (bf16, gradient checkpointing), on train_loop.py's packed cache.

Launched by torchrun like the chapter's `deepspeed pretrain.py`; appends one JSON line to --result: tokens/s over
the steps after --warmup, MFU against --peak_tflops, peak GPU memory and the last loss.

    torchrun --nproc_per_node 1 bench/trainer_chapter.py --config DIR --cache_blocks FILE.npy --result OUT.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_throughput import BlockDataset, StepTimes  # noqa: E402

from pretrain.telemetry.metrics import flops_per_token  # noqa: E402

CHAPTER_DS_CONFIG = {  # the chapter's ds_config_zero2.json
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 100,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cache_blocks", required=True, help="a train.npy of train_loop.py's data cache")
    parser.add_argument("--result", required=True)
    parser.add_argument("--micro_batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--work", default="/tmp/trainer_chapter")
    options = parser.parse_args()

    blocks = np.load(options.cache_blocks, mmap_mode="r")

    work = Path(options.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "ds_config_chapter.json").write_text(json.dumps(CHAPTER_DS_CONFIG))
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(options.config), attn_implementation="sdpa")
    seq = blocks.shape[1]
    flops = flops_per_token(model, seq)
    timer = StepTimes()
    arguments = TrainingArguments(
        output_dir=str(work / "out"), per_device_train_batch_size=options.micro_batch, gradient_accumulation_steps=1,
        max_steps=options.steps, learning_rate=1e-4, warmup_steps=200, weight_decay=0.01, bf16=True,
        gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        deepspeed=str(work / "ds_config_chapter.json"), seed=12, dataloader_num_workers=0)
    Trainer(model=model, args=arguments, train_dataset=BlockDataset(blocks), callbacks=[timer]).train()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        step_s = float(np.median(timer.times[options.warmup:]))
        tokens_per_s = options.micro_batch * seq / step_s
        record = {"tokens_per_s": tokens_per_s, "step_time_s": step_s,
                  "mfu": flops * tokens_per_s / (options.peak_tflops * 1e12),
                  "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None, "loss": timer.loss}
        with open(options.result, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
