"""The command line: argument dataclasses (with their help text), parsing of flags or one YAML/JSON file, the demo's
defaults, and validation with one-line `UsageError`s, all before any work is done.

It owns what the flags mean and which combinations are refused; it must not load models, data or an Accelerator.
Part of the package's base: it imports nothing from the project but `pretrain.base.errors`,
`pretrain.base.args_file`, `pretrain.base.mixture_spec` and `pretrain.base.flag_values`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from pretrain.base.args_file import args_file_to_argv
from pretrain.base.errors import UsageError
from pretrain.base.flag_values import describe_gpu, has_fp8_tensor_cores, parse_config_overrides, \
    parse_task_specs, read_json_object
from pretrain.base.mixture_spec import parse_mixture

DEFAULT_SPLIT_SEED = 42  # the validation split's seed unless --data_seed is given: the cache outlives --seed
DEFAULT_CACHE_ROOT = Path(os.environ.get("PRETRAIN_LOOP_CACHE", Path.home() / ".cache" / "pretrain_loop"))

SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "wsd"]
DEFAULT_DECAY_RATIO = 0.2  # wsd's decay: Hägele et al. 2024's cooldowns of 20 % matched a cosine


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default shown once: not where the help text already says it, nor when it is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default" in (action.help or "") or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def argument_parser(dataclass_types: tuple, error: Callable[[str], Any]):
    """HfArgumentParser without prefix matching (--max_step would silently set --max_steps) and with one-line
    errors: `error(message)` must raise or exit."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, allow_abbrev=False, formatter_class=HelpFormatter)
    parser.error = error  # one line, no usage dump
    return parser


@dataclass
class DataArguments:
    train_files: list[str] | None = field(default=None, metadata={
        "help": "Training corpus: paths or glob patterns (.jsonl/.json/.txt, optionally .gz, or .parquet). Empty: the "
                "built-in demo corpus.", "nargs": "+"})
    train_mixture: list[str] | None = field(default=None, metadata={
        "help": "Several corpora blended by weight, each NAME=WEIGHT:FILES with FILES paths or globs separated by "
                "commas, e.g. web_zh=0.7:'zh/*.jsonl' code=0.2:'code/*.parquet' books=0.1:books.txt (in a YAML "
                "arguments file also a mapping NAME: {weight: W, files: [...]}). Weights are normalised; each source "
                "is cached on its own and held out for validation on its own.", "nargs": "+"})
    epoch_source: str | None = field(default=None, metadata={
        "help": "With --train_mixture: the source whose blocks define an epoch (--num_train_epochs), i.e. the blocks "
                "read until this source has been read once in full (default: the first source)."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "A dataset on the Hub (org/name), a local dataset folder, or a save_to_disk folder, as "
                "datasets.load_dataset takes it: its data files go through the same build as --train_files (with "
                "which it combines)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    dataset_split: str = field(default="train", metadata={"help": "The dataset's split to train on."})
    dataset_revision: str | None = field(default=None, metadata={"help": "The dataset's revision on the Hub (a "
                                                                         "branch, tag or commit)."})
    validation_files: list[str] | None = field(default=None, metadata={
        "help": "Validation corpus, same formats. Default: held out from the training files.", "nargs": "+"})
    validation_split_percentage: float = field(default=5.0, metadata={
        "help": "Percent of training documents held out for validation when --validation_files is not given (0 "
                "disables evaluation)."})
    text_column: str = field(default="text", metadata={"help": "Field holding the document text in JSON and Parquet."})
    block_size: int | None = field(default=None, metadata={
        "help": "Tokens per training block (sequence length). Training default: min(2048, the model's "
                "max_position_embeddings); required by `python data_utils.py`."})
    parse_special_tokens: bool = field(default=False, metadata={
        "help": "Encode special-token strings that occur in document text (a literal <|endoftext|> or <|im_start|>) "
                "as the control tokens themselves, for corpora of deliberately pre-formatted text. By default they are "
                "encoded as ordinary text, so control tokens come only from the pipeline (the EOS after each "
                "document)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Tokenizing processes, each single-threaded (default: the cores, divided among the processes of a "
                "launch on this machine)."})
    data_cache_dir: str | None = field(default=None, metadata={
        "help": f"Where packed datasets are cached (default: {DEFAULT_CACHE_ROOT}/data)."})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Continue training these weights (Hub name or local path), e.g. Qwen/Qwen2.5-1.5B."})
    config_name: str | None = field(default=None, metadata={
        "help": "Train from random initialisation with this config (Hub name, folder or config.json)."})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "Tokenizer (default: the model's or config's own)."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Comma-separated config changes, e.g. 'hidden_size=256,num_hidden_layers=4'."})
    torch_dtype: str | None = field(default=None, metadata={
        "help": "dtype of the loaded weights; keep float32 masters with --bf16/--fp16.",
        "choices": ["auto", "bfloat16", "float16", "float32"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel: sdpa, eager, flash_attention_2 (default: the model's)."})
    attn_mask_type: str = field(default="causal", metadata={
        "help": "causal: each token attends to everything before it in its block, across the documents packed there. "
                "block_causal: only within its own document, with positions restarting at each document (torchtitan's "
                "name; Megatron's --reset-attention-mask --reset-position-ids); evaluation uses the same mask.",
        "choices": ["causal", "block_causal"]})
    keep_boundary_targets: bool = field(default=False, metadata={
        "help": "With block_causal: also train each EOS to predict the next document's first token (left out by "
                "default: under the mask that prediction sees nothing of the next document)."})


@dataclass
class TrainArguments:
    output_dir: str = field(default="output/demo", metadata={"help": "Checkpoints, metrics and the final model."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start afresh in a non-empty output_dir (deletes its checkpoints) instead of resuming or refusing."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Blocks per device per micro-step."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Blocks per device per eval step."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Evaluate on the first N validation blocks only (default: all of them)."})
    eval_tasks: list[str] | None = field(default=None, metadata={
        "help": "Multiple-choice tasks scored at each evaluation, NAME=TEST_FILE[,DEV_FILE] each; NAME "
                "cmmlu_<subject>, ceval-valid_<subject> or mmlu_<subject> scores as lm-eval's task does, others get "
                "a generic prompt (docs/flags.md#multiple-choice-tasks).", "nargs": "+"})
    eval_tasks_num_fewshot: int = field(default=0, metadata={"help": "Few-shot examples, the DEV_FILE's first."})
    eval_tasks_steps: int | None = field(default=None, metadata={
        "help": "Score the tasks every N steps (default: at each evaluation, and at the end)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    optim: str = field(default="adamw", metadata={
        "help": "adamw, or muon: Muon on the hidden matrices, AdamW on the rest, one learning rate (docs/muon.md).",
        "choices": ["adamw", "muon"]})
    weight_decay: float = field(default=0.1, metadata={"help": "Decoupled decay; never applied to biases and norms."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables clipping)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training blocks."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0."})
    max_tokens: int | None = field(default=None, metadata={
        "help": "Train on this many tokens (rounded up to whole optimizer steps); overrides num_train_epochs, "
                "and --max_steps wins over it."})
    lr_scheduler_type: str = field(default="cosine", metadata={
        "help": "Schedule after warmup; wsd: a stable phase, then --decay_type (docs/schedules.md).",
        "choices": SCHEDULERS})
    lr_scheduler_kwargs: str | None = field(default=None, metadata={
        "help": "JSON of extra schedule arguments, e.g. '{\"min_lr_rate\": 0.1}' for cosine_with_min_lr."})
    decay_ratio: float | None = field(default=None, metadata={
        "help": f"wsd: the decay's share of the run's steps (default {DEFAULT_DECAY_RATIO} unless --decay_steps or "
                f"--decay_tokens is given)."})
    decay_steps: int | None = field(default=None, metadata={"help": "wsd: the decay's length in optimizer steps."})
    decay_tokens: int | None = field(default=None, metadata={
        "help": "wsd: the decay's length in tokens (rounded up to whole steps)."})
    decay_type: str | None = field(default=None, metadata={
        "help": "wsd: the decay's shape (default 1-sqrt).", "choices": ["linear", "cosine", "1-sqrt"]})
    min_lr_ratio: float | None = field(default=None, metadata={
        "help": "wsd: the rate the decay ends at, as a fraction of --learning_rate (default 0)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps (wins over warmup_ratio)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of all steps."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (default: save_steps)."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    save_in_background: bool = field(default=True, metadata={
        "help": "Under DeepSpeed, a save copies the state into CPU memory and training goes on while a thread writes "
                "it; the next save, a rewind and the end wait for it (docs/checkpoints.md). False: every save "
                "blocks until written. One process and DDP always save synchronously."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "A checkpoint folder or 'latest'. Default: resume from output_dir's newest complete checkpoint."})
    branch_from: str | None = field(default=None, metadata={
        "help": "Start a branch (e.g. a cooldown) from another run's checkpoint-N in a new --output_dir, the rate "
                "continuous there; a rerun resumes from the branch's own checkpoints (docs/mid-training.md)."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation and data order."})
    data_seed: int | None = field(default=None, metadata={
        "help": f"Seed of the validation split, and of the data order when given (default: the split uses "
                f"{DEFAULT_SPLIT_SEED} whatever --seed is, so a cache built beforehand by `python data_utils.py` is "
                f"reused)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision with loss scaling (CUDA only)."})
    fp8: bool = field(default=False, metadata={
        "help": "FP8 matmuls in the Linear layers (torchao's float8 through Accelerate's mixed_precision='fp8'), bf16 "
                "elsewhere; NVIDIA GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper and newer); "
                "pip install -r requirements-gpu.txt. Pair it with --torch_compile, which fuses the casts."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    torch_compile: bool = field(default=False, metadata={
        "help": "torch.compile each decoder layer in place (regional compilation), under DeepSpeed too."})
    torch_compile_backend: str = field(default="inductor", metadata={
        "help": "torch.compile backend: inductor, or aot_eager to check graphs without generating kernels."})
    torch_compile_mode: str | None = field(default=None, metadata={
        "help": "torch.compile mode: default, reduce-overhead, max-autotune (default: torch's)."})
    use_liger_kernel: bool = field(default=False, metadata={
        "help": "Liger-Kernel's fused RMSNorm, RoPE, SwiGLU and linear+cross-entropy (CUDA; requirements-gpu.txt). "
                "Without CUDA: a warning, and --loss_chunk_size 4096 stands in for the fused loss."})
    loss_chunk_size: int = field(default=0, metadata={
        "help": "Compute the output projection and the cross-entropy together, this many tokens at a time, never "
                "holding the whole batch's logits (tokens x vocabulary); 0: transformers' loss on full logits."})
    skip_bad_steps: bool = field(default=True, metadata={
        "help": "Skip an optimizer step whose loss or gradient norm is not finite or spikes (--spike_sigma): weights "
                "and optimizer state stay untouched. False: train through spikes and stop at a non-finite loss."})
    spike_sigma: float = field(default=6.0, metadata={
        "help": "A spike is more than this many standard deviations above the mean of the last --spike_window "
                "applied steps (OLMo-core's 6); 0 skips only non-finite steps."})
    spike_window: int = field(default=128, metadata={
        "help": "Applied steps in the rolling window (OLMo-core's 128); spikes are looked for once it is half full."})
    rewind_after_skips: int = field(default=4, metadata={
        "help": "Skipped steps in a row that reload the newest checkpoint from before them and move the data past "
                "the stretch read since, plus --rewind_margin_steps; 0: never rewind (the skips go on)."})
    rewind_margin_steps: int = field(default=100, metadata={
        "help": "Global batches of data skipped past the trouble on a rewind (PaLM skipped 200-500 batches)."})
    divergence_steps: int = field(default=20, metadata={"help": "Steps in a row whose loss is above a uniform guess "
        "over the vocabulary and twice the run's lowest stop the run as diverged (docs/spikes.md); 0: never."})
    telemetry_steps: int = field(default=50, metadata={"help": "Every N optimizer steps, per layer: gradient, update "
        "and weight norms, and the largest attention logit, in that step's log record (docs/telemetry.md); 0: off."})
    report_to: list[str] = field(default_factory=lambda: ["swanlab"], metadata={
        "help": "Trackers, through Accelerate's tracker classes: swanlab, tensorboard, wandb, trackio (several, "
                "space- or comma-separated), all (every one installed) or none.", "nargs": "+"})
    run_name: str | None = field(default=None, metadata={"help": "Name of the run in every tracker (default: the "
                                                                 "output_dir's name)."})
    swanlab_project: str = field(default="pretrain", metadata={"help": "The trackers' project (SwanLab, W&B, "
                                                                       "Trackio; TensorBoard's subfolder)."})
    swanlab_mode: str | None = field(default=None, metadata={
        "help": "online, local, offline or disabled (default: online with an API key, else local or offline).",
        "choices": ["online", "local", "offline", "disabled"]})
    profile_dir: str | None = field(default=None, metadata={
        "help": "Profile optimizer steps 6-8 of this launch with torch.profiler: a trace per rank (chrome://tracing or "
                "ui.perfetto.dev) and a table of the costliest ops go to this folder."})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "Peak dense TFLOP/s of one device for MFU (default: looked up for known GPUs; none on CPU)."})
    # Accepted for the chapter's pretrain.sh and TrainingArguments users.
    deepspeed: str | None = field(default=None, metadata={"help": "A DeepSpeed JSON config, when the accelerate "
                                                                   "config does not already name one."})
    eval_strategy: str = field(default="steps", metadata={
        "help": "no, steps or epoch.", "choices": ["no", "steps", "epoch"], "aliases": ["--evaluation_strategy"]})
    save_strategy: str = field(default="steps", metadata={"help": "no, steps or epoch.",
                                                          "choices": ["no", "steps", "epoch"]})
    logging_strategy: str = field(default="steps", metadata={"help": "no, steps or epoch.",
                                                             "choices": ["no", "steps", "epoch"]})
    logging_dir: str | None = field(default=None, metadata={
        "help": "The trackers' folder: SwanLab writes in it, TensorBoard in its tensorboard/, W&B in its wandb/ "
                "(default: <output_dir>/swanlog for SwanLab, <output_dir>/tensorboard and <output_dir>/wandb)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    dataloader_pin_memory: bool = field(default=True, metadata={"help": "Pin host memory of batches (CUDA only)."})
    ddp_timeout: int = field(default=1800, metadata={
        "help": "Seconds a collective may wait for another rank before the run fails (the process group's timeout, "
                "NCCL and gloo, with or without DeepSpeed). The data build waits on files, not here."})
    hang_timeout: float = field(default=600.0, metadata={
        "help": "Seconds without a finished step (or 10x the median step; evaluations, saves and the time before "
                "step 1 not counted) before each rank writes its stack to output_dir/hang-rank<N>.txt; 0: off."})
    heartbeat_timeout: float = field(default=30.0, metadata={
        "help": "Seconds of missed heartbeats (3 after a failed collective) that make a rank lost; 0: off."})
    do_train: bool = field(default=False, metadata={"help": "Accepted for compatibility: this script trains."})
    do_eval: bool = field(default=False, metadata={"help": "Accepted for compatibility: see --eval_strategy."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; read from LOCAL_RANK."})


DEMO_DEFAULTS = {  # applied when neither a model nor data is given, to the flags the user did not give
    "block_size": 128, "learning_rate": 2e-3, "per_device_train_batch_size": 8, "warmup_steps": 10,
    "logging_steps": 10, "save_steps": 100, "eval_steps": 50, "num_train_epochs": 3.0, "weight_decay": 0.0,
    "gradient_accumulation_steps": 1,
}


DEMO_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Flags, or a single .yaml/.json file holding the same arguments."""
    def error(message: str) -> None:
        raise UsageError(message)

    parser = argument_parser((ModelArguments, DataArguments, TrainArguments), error)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = args_file_to_argv(Path(argv[0]))
    model_args, data_args, train_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False)
    if unknown:
        raise UsageError(f"unknown argument(s): {' '.join(unknown)}; see python train_loop.py --help")
    if is_demo(model_args, data_args):
        given = {token[2:].split("=")[0] for token in argv if token.startswith("--")}
        for name, value in DEMO_DEFAULTS.items():
            if name not in given:  # a flag the user gave wins, even when it equals the usual default
                setattr(data_args if hasattr(data_args, name) else train_args, name, value)
    validate_args(model_args, data_args, train_args)
    return model_args, data_args, train_args


def demo_defaults_in_use(data_args: DataArguments, args: TrainArguments) -> dict[str, Any]:
    """The demo's own defaults that this run has (those the user did not set otherwise)."""
    return {name: value for name, value in DEMO_DEFAULTS.items()
            if getattr(data_args if hasattr(data_args, name) else args, name) == value}


def split_seed(args: TrainArguments) -> int:
    """The validation split's seed: part of the data cache's key."""
    return DEFAULT_SPLIT_SEED if args.data_seed is None else args.data_seed


def order_seed(args: TrainArguments) -> int:
    """The seed of the epochs' block order."""
    return args.seed if args.data_seed is None else args.data_seed


def is_demo(model_args: ModelArguments, data_args: DataArguments) -> bool:
    return not (model_args.model_name_or_path or model_args.config_name or data_args.train_files or
                data_args.dataset_name or data_args.train_mixture)


def validate_args(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> None:
    checks = [
        (args.bf16 and args.fp16, "--bf16 and --fp16: choose one"),
        (args.fp8 and args.fp16, "--fp8 and --fp16: choose one (--fp8 keeps bf16 outside the FP8 matmuls)"),
        (args.fp16 and model_args.torch_dtype == "float16",
         "--torch_dtype float16 with --fp16: fp16 weights cannot be loss-scaled; load float32 weights (the default) "
         "and let --fp16 cast"),
        (args.fp16 and not torch.cuda.is_available(), "--fp16 needs a CUDA GPU; use --bf16 on CPU"),
        (args.fp8 and not has_fp8_tensor_cores(), f"--fp8 needs an NVIDIA GPU with FP8 tensor cores (compute "
         f"capability 8.9+: Ada, Hopper or newer), and this machine has {describe_gpu()}; drop --fp8 (use --bf16)"),
        (model_args.model_name_or_path and model_args.config_name,
         "--model_name_or_path and --config_name: give one (weights to continue, or a config to start from)"),
        (data_args.train_files is None and data_args.dataset_name is None and data_args.train_mixture is None
         and not is_demo(model_args, data_args),
         "--train_files, --train_mixture or --dataset_name is required with a model (the demo corpus goes only with "
         "the demo model)"),
        (args.per_device_train_batch_size < 1, "--per_device_train_batch_size must be at least 1"),
        (args.per_device_eval_batch_size < 1, "--per_device_eval_batch_size must be at least 1"),
        (args.max_eval_samples is not None and args.max_eval_samples < 1, "--max_eval_samples must be at least 1"),
        (args.gradient_accumulation_steps < 1, "--gradient_accumulation_steps must be at least 1"),
        (args.learning_rate <= 0, "--learning_rate must be positive"),
        (args.max_steps == 0 or (args.max_steps < 0 and args.num_train_epochs <= 0),
         "--max_steps or --num_train_epochs must be positive"),
        (args.max_tokens is not None and args.max_tokens < 1, "--max_tokens must be at least 1"),
        (args.use_liger_kernel and data_args.train_mixture is not None and torch.cuda.is_available(),
         "--use_liger_kernel with --train_mixture: the fused loss returns no per-block losses, which the per-source "
         "curves need; use --loss_chunk_size 4096 instead"),
        (args.warmup_steps < 0, "--warmup_steps must be >= 0"),
        (not 0 <= args.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
        (args.logging_steps < 1, "--logging_steps must be at least 1"),
        (args.save_steps < 1, "--save_steps must be at least 1"),
        (args.eval_steps is not None and args.eval_steps < 1, "--eval_steps must be at least 1"),
        (args.branch_from and (args.resume_from_checkpoint or args.overwrite_output_dir), "--branch_from with "
         "--resume_from_checkpoint or --overwrite_output_dir: a branch resumes from its own folder; drop the other"),
        (args.save_total_limit is not None and args.save_total_limit < 1, "--save_total_limit must be at least 1"),
        (args.max_grad_norm < 0, "--max_grad_norm must be >= 0"),
        (args.spike_sigma < 0, "--spike_sigma must be >= 0 (0 skips only non-finite steps)"),
        (args.spike_window < 4, "--spike_window must be at least 4"),
        (min(args.rewind_after_skips, args.rewind_margin_steps, args.divergence_steps) < 0,
         "--rewind_after_skips, --rewind_margin_steps and --divergence_steps must be >= 0"),
        (args.telemetry_steps < 0, "--telemetry_steps must be >= 0 (0 turns per-layer telemetry off)"),
        (args.loss_chunk_size < 0, "--loss_chunk_size must be >= 0 (0 turns chunking off)"),
        (args.eval_tasks_num_fewshot < 0 or (args.eval_tasks_steps or 1) < 1,
         "--eval_tasks_num_fewshot must be >= 0 and --eval_tasks_steps at least 1"),
        (min(args.hang_timeout, args.heartbeat_timeout) < 0, "--hang_timeout and --heartbeat_timeout must be >= 0"),
        (not 0 <= args.adam_beta1 < 1 or not 0 <= args.adam_beta2 < 1, "--adam_beta1/--adam_beta2 must be in [0, 1)"),
        (data_args.block_size is not None and data_args.block_size < 2, "--block_size must be at least 2"),
    ]
    for failed, message in checks:
        if failed:
            raise UsageError(message)
    if args.fp8:
        import importlib.util

        if importlib.util.find_spec("torchao") is None:
            raise UsageError("--fp8: torchao is not installed; pip install -r requirements-gpu.txt")
    if args.deepspeed is not None:
        read_json_object("--deepspeed", args.deepspeed)
    if args.lr_scheduler_kwargs:
        try:
            kwargs = json.loads(args.lr_scheduler_kwargs)
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise UsageError("--lr_scheduler_kwargs must be a JSON object, e.g. '{\"min_lr_rate\": 0.1}'")
    if model_args.config_overrides:
        parse_config_overrides(model_args.config_overrides)
    parse_task_specs(args.eval_tasks, args.eval_tasks_num_fewshot)
    check_mixture_flags(data_args)


def check_mixture_flags(data_args: DataArguments) -> None:
    """--train_mixture's items and the flags it excludes (training and `python data_utils.py` alike)."""
    checks = [
        (data_args.train_mixture is not None and (data_args.train_files or data_args.dataset_name),
         "--train_mixture with --train_files or --dataset_name: give the files as the mixture's sources (a mixture "
         "of one source is allowed)"),
        (data_args.train_mixture is not None and data_args.validation_files,
         "--train_mixture with --validation_files: each source holds out its own validation documents "
         "(--validation_split_percentage); drop --validation_files"),
        (data_args.epoch_source is not None and data_args.train_mixture is None,
         "--epoch_source goes with --train_mixture"),
    ]
    for failed, message in checks:
        if failed:
            raise UsageError(message)
    if data_args.train_mixture is not None:
        sources = parse_mixture(data_args.train_mixture)
        if data_args.epoch_source is not None and data_args.epoch_source not in [s.name for s in sources]:
            raise UsageError(f"--epoch_source {data_args.epoch_source}: no such source in --train_mixture (its "
                             f"sources: {', '.join(s.name for s in sources)})")
