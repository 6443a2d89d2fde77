"""An explicit causal-LM pretraining loop on Hugging Face Accelerate (+ DeepSpeed ZeRO), readable top to bottom.

    python train_loop.py --max_steps 2                                     # one process, debugger-friendly
    accelerate launch --config_file accelerate_configs/zero2.yaml train_loop.py [flags]

`main()` is the outline of a run; each stage is a short function below it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MethodType
from typing import Any

import torch

import data_utils
from data_utils import DataArguments, DataError, cannot_load, first_line

logger = logging.getLogger("train_loop")

SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"]
RUN_FILES = {"metrics.jsonl", "run_config.json", "swanlog", "logs"}  # what a run writes before its first checkpoint
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (not the 2:4-sparsity figures), matched against the device name.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
               ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
               ("RTX 6000 Ada", 364.0), ("A6000", 155.0), ("4090", 165.0), ("3090", 71.0), ("V100", 125.0)]


class UsageError(ValueError):
    """A bad flag or combination of flags: a one-line message naming the flag and what to do."""


# ======================================================================================================================
# Arguments
# ======================================================================================================================

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


@dataclass
class TrainArguments:
    output_dir: str = field(default="output/demo", metadata={"help": "Checkpoints, metrics and the final model."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start afresh in a non-empty output_dir (deletes its checkpoints) instead of resuming or refusing."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Blocks per device per micro-step."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Blocks per device per eval step."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Evaluate on the first N validation blocks only (default: all of them)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay; never applied to biases and norms."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables clipping)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training blocks."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warmup.",
                                                                "choices": SCHEDULERS})
    lr_scheduler_kwargs: str | None = field(default=None, metadata={
        "help": "JSON of extra schedule arguments, e.g. '{\"min_lr_rate\": 0.1}' for cosine_with_min_lr."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps (wins over warmup_ratio)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of all steps."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (default: save_steps)."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "A checkpoint folder or 'latest'. Default: resume from output_dir's newest complete checkpoint."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, data order and validation split."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision with loss scaling (CUDA only)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model."})
    loss_chunk_size: int = field(default=0, metadata={
        "help": "Compute the output projection and the cross-entropy together, this many tokens at a time, never "
                "holding the whole batch's logits (tokens x vocabulary); 0: transformers' loss on full logits."})
    report_to: str = field(default="swanlab", metadata={"help": "swanlab or none.", "choices": ["swanlab", "none"]})
    run_name: str | None = field(default=None, metadata={"help": "Name of the SwanLab experiment."})
    swanlab_project: str = field(default="pretrain", metadata={"help": "SwanLab project."})
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
    logging_dir: str | None = field(default=None, metadata={"help": "SwanLab's log folder (default: "
                                                                    "<output_dir>/swanlog)."})
    do_train: bool = field(default=False, metadata={"help": "Accepted for compatibility: this script trains."})
    do_eval: bool = field(default=False, metadata={"help": "Accepted for compatibility: see --eval_strategy."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; read from LOCAL_RANK."})


DEMO_DEFAULTS = {  # applied when neither a model nor data is given, to fields the user left at their default
    "block_size": 128, "learning_rate": 2e-3, "per_device_train_batch_size": 8, "warmup_steps": 10,
    "logging_steps": 10, "save_steps": 100, "eval_steps": 50, "num_train_epochs": 3.0, "weight_decay": 0.0,
    "gradient_accumulation_steps": 1,
}
DEMO_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Flags, or a single .yaml/.json file holding the same arguments."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    parser.error = lambda message: (_ for _ in ()).throw(UsageError(message))  # one line, no usage dump
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = args_file_to_argv(Path(argv[0]))
    model_args, data_args, train_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False)
    if unknown:
        raise UsageError(f"unknown argument(s): {' '.join(unknown)}; see python train_loop.py --help")
    if is_demo(model_args, data_args):
        defaults = {f.name: f.default for cls in (DataArguments, TrainArguments) for f in fields(cls)}
        for name, value in DEMO_DEFAULTS.items():
            target = data_args if hasattr(data_args, name) else train_args
            if getattr(target, name) == defaults[name]:
                setattr(target, name, value)
    validate_args(model_args, data_args, train_args)
    return model_args, data_args, train_args


def args_file_to_argv(path: Path) -> list[str]:
    """A YAML or JSON mapping of flag names to values, turned into flags so that it is checked like them."""
    import yaml

    if not path.is_file():
        raise UsageError(f"{path}: no such arguments file")
    try:
        values = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        raise UsageError(f"{path}: not valid {path.suffix[1:].upper()} ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of argument names to values")
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        argv.extend(map(str, value) if isinstance(value, list) else [str(value)])
    return argv


def is_demo(model_args: ModelArguments, data_args: DataArguments) -> bool:
    return not (model_args.model_name_or_path or model_args.config_name or data_args.train_files)


def validate_args(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> None:
    checks = [
        (args.bf16 and args.fp16, "--bf16 and --fp16: choose one"),
        (args.fp16 and model_args.torch_dtype == "float16",
         "--torch_dtype float16 with --fp16: fp16 weights cannot be loss-scaled; load float32 weights (the default) "
         "and let --fp16 cast"),
        (args.fp16 and not torch.cuda.is_available(), "--fp16 needs a CUDA GPU; use --bf16 on CPU"),
        (model_args.model_name_or_path and model_args.config_name,
         "--model_name_or_path and --config_name: give one (weights to continue, or a config to start from)"),
        (data_args.train_files is None and not is_demo(model_args, data_args),
         "--train_files is required with a model (the demo corpus goes only with the demo model)"),
        (args.per_device_train_batch_size < 1, "--per_device_train_batch_size must be at least 1"),
        (args.per_device_eval_batch_size < 1, "--per_device_eval_batch_size must be at least 1"),
        (args.max_eval_samples is not None and args.max_eval_samples < 1, "--max_eval_samples must be at least 1"),
        (args.gradient_accumulation_steps < 1, "--gradient_accumulation_steps must be at least 1"),
        (args.learning_rate <= 0, "--learning_rate must be positive"),
        (args.max_steps == 0 or (args.max_steps < 0 and args.num_train_epochs <= 0),
         "--max_steps or --num_train_epochs must be positive"),
        (args.warmup_steps < 0, "--warmup_steps must be >= 0"),
        (not 0 <= args.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
        (args.logging_steps < 1, "--logging_steps must be at least 1"),
        (args.save_steps < 1, "--save_steps must be at least 1"),
        (args.eval_steps is not None and args.eval_steps < 1, "--eval_steps must be at least 1"),
        (args.save_total_limit is not None and args.save_total_limit < 1, "--save_total_limit must be at least 1"),
        (args.max_grad_norm < 0, "--max_grad_norm must be >= 0"),
        (args.loss_chunk_size < 0, "--loss_chunk_size must be >= 0 (0 turns chunking off)"),
        (not 0 <= args.adam_beta1 < 1 or not 0 <= args.adam_beta2 < 1, "--adam_beta1/--adam_beta2 must be in [0, 1)"),
        (data_args.block_size is not None and data_args.block_size < 2, "--block_size must be at least 2"),
        (args.report_to == "swanlab" and args.swanlab_mode == "online" and not has_swanlab_api_key(),
         "--swanlab_mode online: no SwanLab API key; set SWANLAB_API_KEY or run `swanlab login`, or use "
         "--swanlab_mode local or offline"),
    ]
    for failed, message in checks:
        if failed:
            raise UsageError(message)
    if args.deepspeed is not None:
        read_json_object("--deepspeed", args.deepspeed)
    if args.lr_scheduler_kwargs:
        try:
            assert isinstance(json.loads(args.lr_scheduler_kwargs), dict)
        except (ValueError, AssertionError):
            raise UsageError("--lr_scheduler_kwargs must be a JSON object, e.g. '{\"min_lr_rate\": 0.1}'") from None
    if model_args.config_overrides:
        parse_config_overrides(model_args.config_overrides)


def read_json_object(flag: str, path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        where = "" if Path(path).is_absolute() else f" in {Path.cwd()} (a relative path starts from where you launch)"
        raise UsageError(f"{flag} {path}: no such file{where}")
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag} {path}: not a readable JSON file ({first_line(error)}); fix it") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} {path}: expected a JSON object of DeepSpeed settings")
    return value


def parse_config_overrides(text: str) -> dict[str, Any]:
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--config_overrides: '{item}' is not key=value; write e.g. 'hidden_size=256'")
        try:
            overrides[key.strip()] = json.loads(value)
        except ValueError:
            overrides[key.strip()] = value
    return overrides


# ======================================================================================================================
# Accelerator, data, model, optimizer
# ======================================================================================================================

def build_accelerator(args: TrainArguments):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    plugin = None
    launched_with = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if launched_with and not Path(launched_with).is_file() and (Path(__file__).parent / launched_with).is_file():
        # Our yamls name ds_config_*.json relative to the repository: found from any working directory.
        launched_with = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(Path(__file__).parent / launched_with)
    if launched_with:
        read_json_object("the accelerate config's deepspeed_config_file", launched_with)
    if args.deepspeed and launched_with and Path(launched_with).resolve() != Path(args.deepspeed).resolve():
        raise UsageError(f"--deepspeed {args.deepspeed}: the accelerate config already selects {launched_with}; "
                         f"drop one of the two")
    if args.deepspeed and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed)
        if "LOCAL_RANK" not in os.environ:  # plain `python train_loop.py --deepspeed ...`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_local_port()))
    uses_deepspeed = plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched = "LOCAL_RANK" in os.environ
    handlers = []
    if not torch.cuda.is_available() and launched:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # DeepSpeed/DDP on a CPU-only machine
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimizer step itself
        dynamo_backend="inductor" if args.torch_compile else None,
        # Without CUDA, Accelerate makes DDP across processes (MULTI_CPU) only when told it runs on the CPU;
        # `cpu=True` would drop a DeepSpeed plugin, so it is set only for runs without DeepSpeed.
        cpu=not torch.cuda.is_available() and launched and not uses_deepspeed,
    )
    if args.torch_compile and uses_deepspeed:
        logger.warning("--torch_compile under DeepSpeed: measured 7.7 s per step against 0.3 s without ZeRO on an "
                       "H200 (bench/gpu_mfu.sh); prefer accelerate_configs/single_gpu.yaml or ddp.yaml with it")
    if args.loss_chunk_size and zero_stage_of(accelerator) == 3:
        raise UsageError("--loss_chunk_size with ZeRO-3: the output projection's weight is partitioned outside its "
                         "own forward; use accelerate_configs/zero2.yaml or --loss_chunk_size 0")
    if accelerator.num_processes > 1 and accelerator.distributed_type.value == "NO":
        raise UsageError(f"{accelerator.num_processes} processes but no distributed backend: they would train "
                         f"independently; check the accelerate config's distributed_type")
    configure_logging(accelerator.is_main_process)
    return accelerator


def create_output_dirs(args: TrainArguments) -> None:
    """Fail before any work, not at the first save, when --output_dir (or SwanLab's --logging_dir) is not writable."""
    folders = [("--output_dir", args.output_dir)]
    if args.report_to == "swanlab" and args.logging_dir:
        folders.append(("--logging_dir", args.logging_dir))
    for flag, folder in folders:
        problem = data_utils.unwritable(Path(folder))
        if problem:
            raise UsageError(f"{flag} {folder}: cannot write there ({problem}); choose a writable folder")


def free_local_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def configure_logging(is_main_process: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if is_main_process else logging.WARNING, force=True)
    import transformers
    transformers.utils.logging.set_verbosity_warning() if is_main_process else \
        transformers.utils.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def deepspeed_config(accelerator) -> dict[str, Any] | None:
    plugin = accelerator.state.deepspeed_plugin
    return plugin.deepspeed_config if plugin is not None else None


def zero_stage_of(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this launch, or None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin is not None else None


def from_hub(flag: str, name: str, loader, **kwargs):
    """A Hub or local load whose failure names the flag instead of a traceback."""
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(cannot_load(flag, name, error)) from None


def load_tokenizer(model_args: ModelArguments, data_args: DataArguments):
    from transformers import AutoTokenizer

    if is_demo(model_args, data_args):
        corpus, tokenizer_dir = data_utils.ensure_demo_assets()
        data_args.train_files = [str(corpus)]
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    flag, name = next((f, n) for f, n in (("--tokenizer_name", model_args.tokenizer_name),
                                          ("--model_name_or_path", model_args.model_name_or_path),
                                          ("--config_name", model_args.config_name)) if n)
    return from_hub(flag, name, AutoTokenizer.from_pretrained, trust_remote_code=model_args.trust_remote_code)


def build_config(model_args: ModelArguments, tokenizer):
    from transformers import AutoConfig, Qwen2Config

    if model_args.model_name_or_path or model_args.config_name:
        flag = "--model_name_or_path" if model_args.model_name_or_path else "--config_name"
        config = from_hub(flag, model_args.model_name_or_path or model_args.config_name, AutoConfig.from_pretrained,
                          trust_remote_code=model_args.trust_remote_code)
    else:
        config = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.eos_token_id, **DEMO_MODEL)
    for key, value in parse_config_overrides(model_args.config_overrides or "").items():
        if not hasattr(config, key):
            raise UsageError(f"--config_overrides: {type(config).__name__} has no '{key}'")
        try:
            setattr(config, key, value)
        except Exception as error:  # transformers' typed configs raise their own validation errors
            raise UsageError(f"--config_overrides {key}={value}: {' '.join(str(error).split())}") from None
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        source = "--config_overrides" if model_args.config_overrides else "the model config"
        raise UsageError(f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                         f"({kv_heads})")
    return config


def resolve_block_size(data_args: DataArguments, config) -> int:
    """--block_size, defaulting to the model's context (at most 2048), and never beyond it."""
    limit = getattr(config, "max_position_embeddings", None)
    if data_args.block_size is None:
        data_args.block_size = min(2048, limit or 2048)
    if limit is not None and data_args.block_size > limit:
        raise UsageError(f"--block_size {data_args.block_size} exceeds the model's max_position_embeddings ({limit}); "
                         f"lower it")
    return data_args.block_size


def build_model(model_args: ModelArguments, config, tokenizer, args: TrainArguments):
    from transformers import AutoModelForCausalLM

    if len(tokenizer) > config.vocab_size:
        raise UsageError(f"--tokenizer_name: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; use the model's tokenizer or raise vocab_size in --config_overrides")
    dtype = model_args.torch_dtype if model_args.torch_dtype in (None, "auto") else getattr(torch, model_args.torch_dtype)
    kwargs = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    try:
        if model_args.model_name_or_path:
            model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config,
                                                         dtype=dtype or "float32", **kwargs)
        else:
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
            if dtype not in (None, "auto"):
                model.to(dtype)
    except (OSError, ValueError, ImportError) as error:
        raise model_error(error, model_args) from None
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if args.loss_chunk_size:
        compute_loss_in_chunks(model, args.loss_chunk_size)
    return model


def model_error(error: Exception, model_args: ModelArguments) -> UsageError:
    """Name the flag behind a failed model build: the attention kernel, the weights, or the config."""
    message = first_line(error)
    if model_args.attn_implementation and ("attn" in message.lower() or "attention" in message.lower()):
        return UsageError(f"--attn_implementation {model_args.attn_implementation}: {message}; use sdpa or eager, "
                          f"or install that kernel's package")
    if model_args.model_name_or_path:
        return UsageError(cannot_load("--model_name_or_path", model_args.model_name_or_path, error))
    return UsageError(f"the model cannot be built from its config ({message}); check --config_name and "
                      f"--config_overrides")


def build_optimizer(model, args: TrainArguments, accelerator):
    """AdamW without weight decay on biases and norm weights (the 1-D parameters); fused kernels where available."""
    from accelerate.utils import DummyOptim

    low_precision = {p.dtype for p in model.parameters()} & {torch.bfloat16, torch.float16}
    if low_precision and deepspeed_config(accelerator) is None:
        logger.warning(f"the weights are {low_precision.pop()} and, without DeepSpeed, AdamW updates them in place: "
                       f"updates smaller than their precision are lost; keep --torch_dtype float32 and pass --bf16")
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    hyper = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if "optimizer" in (deepspeed_config(accelerator) or {}):
        return DummyOptim(groups, weight_decay=args.weight_decay, **hyper)
    return torch.optim.AdamW(groups, fused=True, **hyper)


def warmup_steps_of(args: TrainArguments, total_steps: int) -> int:
    return args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)


def build_scheduler(optimizer, args: TrainArguments, total_steps: int):
    from transformers import get_scheduler

    kwargs = json.loads(args.lr_scheduler_kwargs) if args.lr_scheduler_kwargs else {}
    warmup = warmup_steps_of(args, total_steps)
    if args.lr_scheduler_type == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", max(1, (total_steps - warmup) // 10))
    try:
        return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--lr_scheduler_type {args.lr_scheduler_type} / --lr_scheduler_kwargs: {error}") from None


def prepare(accelerator, model, optimizer, train_loader, args: TrainArguments, total_steps: int):
    """Wrap everything for the launch's layout (DDP, ZeRO-2/3 or one process); returns the prepared four."""
    from accelerate.utils import DummyScheduler

    fill_deepspeed_config(accelerator, args)
    ds_scheduler = (deepspeed_config(accelerator) or {}).get("scheduler")
    if ds_scheduler is not None:  # the user's DeepSpeed config owns the schedule (the chapter's does)
        if ds_scheduler.get("type") == "WarmupLR":
            logger.warning("the DeepSpeed config's WarmupLR warms up and then never decays the learning rate; "
                           "remove its 'scheduler' block to use --lr_scheduler_type")
        scheduler = DummyScheduler(optimizer, total_num_steps=total_steps,
                                   warmup_num_steps=warmup_steps_of(args, total_steps))
        return accelerator.prepare(model, optimizer, train_loader, scheduler)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # Built on the prepared optimizer, whose parameter groups ZeRO-3 has rebuilt. With
    # step_scheduler_with_optimizer=False, Accelerate's wrapper steps it exactly once per call.
    scheduler = accelerator.prepare_scheduler(build_scheduler(optimizer, args, total_steps))
    return model, optimizer, train_loader, scheduler


def fill_deepspeed_config(accelerator, args: TrainArguments) -> None:
    """Resolve the "auto" entries that Accelerate would otherwise fill with its own defaults."""
    config = deepspeed_config(accelerator)
    if config is None:
        return
    if config.get("gradient_clipping") == "auto":
        config["gradient_clipping"] = args.max_grad_norm
    for key, value in config.get("optimizer", {}).get("params", {}).items():
        if value == "auto":
            config["optimizer"]["params"][key] = {
                "lr": args.learning_rate, "betas": [args.adam_beta1, args.adam_beta2], "eps": args.adam_epsilon,
                "weight_decay": args.weight_decay}[key]


# ======================================================================================================================
# Loss
# ======================================================================================================================

class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, made chunk by chunk of tokens.

    The logits of a 150k-token vocabulary are the largest tensors of a small model's step (tokens x vocab, in
    fp32 for the softmax). Here each chunk's logits become its loss and both its gradients at once and are
    freed, so memory holds one chunk. The matrix products are the ones backward would do anyway, done early.
    Gradients are kept unscaled (fp32 for the weight's sum over all tokens) and scaled in backward, so fp16
    loss scaling still applies to them.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # mixed precision without DeepSpeed: cast once, not per product
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        valid = targets != -100
        safe_targets = targets.masked_fill(~valid, 0)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk, chunk_targets, chunk_valid = hidden[rows], safe_targets[rows, None], valid[rows, None]
            logits = (chunk @ weight.T).float()
            log_norm = logits.logsumexp(dim=-1, keepdim=True)
            loss_sum += ((log_norm - logits.gather(1, chunk_targets)) * chunk_valid).sum()
            # d(loss_sum)/d(logits) = softmax - one_hot(target), on the counted rows; made in place in the logits
            grad_logits = logits.sub_(log_norm).exp_()
            grad_logits.scatter_add_(1, chunk_targets, torch.full_like(log_norm, -1.0))
            grad_logits = grad_logits.mul_(chunk_valid).to(chunk.dtype)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight += (grad_logits.T @ chunk).float()
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return (grad_hidden * scale).to(ctx.hidden_dtype), (grad_weight * scale).to(ctx.weight_dtype), None, None


def compute_loss_in_chunks(model, chunk_size: int) -> None:
    """Make `model(input_ids=..., labels=...)` return the loss of ChunkedLinearCrossEntropy (and no logits).

    The forward is replaced on this instance only, so DDP and DeepSpeed call it as usual, the state dict keeps its
    keys, and a call without labels (generation) is the model's own forward. Evaluation chunks its own way
    (eval_block_losses), with no gradients to make.
    """
    from transformers.modeling_outputs import CausalLMOutput

    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or \
            getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logits_scaling", 1) != 1:
        raise UsageError(f"--loss_chunk_size: {type(model).__name__} does not end in a plain linear output "
                         f"projection; use --loss_chunk_size 0")

    def forward(self, input_ids=None, labels=None, **kwargs):
        if labels is None:
            return type(self).forward(self, input_ids=input_ids, **kwargs)
        hidden, targets = next_token_pairs(self, input_ids, labels, **kwargs)
        weight = self.get_output_embeddings().weight
        return CausalLMOutput(loss=ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size))

    model.forward = MethodType(forward, model)


def next_token_pairs(model, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs):
    """The base model's hidden states and the targets they predict, flattened to (tokens, hidden) and (tokens,).

    Position t predicts token t + 1: the last position has no target, so its logits are never made.
    """
    hidden = model.base_model(input_ids=input_ids, **kwargs).last_hidden_state[:, :-1]
    return hidden.reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)


# ======================================================================================================================
# Checkpoints
# ======================================================================================================================

@dataclass
class TrainState:
    """Everything besides model/optimizer/schedule/RNG that a resumed run needs."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    swanlab_run_id: str | None = None
    num_processes: int = 1
    distributed_type: str = "NO"
    global_batch_blocks: int = 0
    train_blocks: int = 0
    zero_stage: int | None = None


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous complete one is untouched."""


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed from their temporary name), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint folder, comparing it to the manifest written when it was completed."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return "unreadable manifest"
    for relative, size in manifest.items():
        path = checkpoint / relative
        if not path.is_file():
            return f"missing {relative}"
        if path.stat().st_size != size:
            return f"truncated {relative} ({path.stat().st_size} of {size} bytes)"
    return None


def save_checkpoint(accelerator, state: TrainState, args: TrainArguments) -> Path:
    """Every rank writes its part into checkpoint-N.tmp; the main process then renames it into place."""
    output_dir = Path(args.output_dir)
    final = output_dir / f"checkpoint-{state.step}"
    temporary = output_dir / f"checkpoint-{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))  # DeepSpeed's save has a barrier inside: every rank must call it
    except (OSError, RuntimeError) as error:  # a full disk or a failing filesystem: torch.save raises either
        shutil.rmtree(temporary, ignore_errors=True)
        raise CheckpointError(f"--output_dir {output_dir}: writing {temporary.name} failed ({first_line(error)}); "
                              f"free space or fix the folder, then rerun the same command: it resumes from the "
                              f"last complete checkpoint") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))
        files = {str(p.relative_to(temporary)): p.stat().st_size for p in temporary.rglob("*") if p.is_file()}
        (temporary / MANIFEST).write_text(json.dumps(files, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
        prune_checkpoints(output_dir, args.save_total_limit)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - limit)] if limit else []:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(args: TrainArguments) -> Path | None:
    """The checkpoint to resume from, after refusing an output_dir that holds foreign files."""
    output_dir = Path(args.output_dir)
    requested = args.resume_from_checkpoint
    if requested and requested != "latest":
        path = Path(requested)
        if not path.is_dir():
            raise UsageError(f"--resume_from_checkpoint {requested}: no such checkpoint folder")
        damage = checkpoint_damage(path)
        if damage:
            raise UsageError(f"--resume_from_checkpoint {requested}: damaged checkpoint ({damage}); pick another")
        return path
    checkpoints = list_checkpoints(output_dir)
    if args.overwrite_output_dir:
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint, ignore_errors=True)
        return None
    for checkpoint in reversed(checkpoints):
        damage = checkpoint_damage(checkpoint)
        if damage is None:
            return checkpoint
        logger.warning(f"checkpoint {checkpoint} is damaged ({damage}); falling back to the previous one")
    if requested == "latest":
        raise UsageError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
    foreign = [p.name for p in output_dir.iterdir()
               if p.name not in RUN_FILES and not p.name.startswith("checkpoint-")] if output_dir.is_dir() else []
    if foreign:
        raise UsageError(f"--output_dir {output_dir} holds other files ({', '.join(sorted(foreign)[:3])}) and no "
                         f"checkpoint; pass --overwrite_output_dir or choose another folder")
    return None


def choose_checkpoint(accelerator, args: TrainArguments) -> Path | None:
    """The main process decides (and may delete, with --overwrite_output_dir); every rank gets the same answer."""
    from accelerate.utils import broadcast_object_list

    choice: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            choice = [find_resume_checkpoint(args)]
        except UsageError as error:
            choice = [error]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    if isinstance(choice[0], UsageError):
        raise choice[0]
    return choice[0]


def resume(accelerator, checkpoint: Path | None, state: TrainState) -> TrainState:
    if checkpoint is None:
        return state
    saved = TrainState(**json.loads((checkpoint / TRAINER_STATE).read_text()))
    zero = saved.distributed_type == "DEEPSPEED"
    if zero and saved.num_processes != state.num_processes:
        raise UsageError(f"--resume_from_checkpoint {checkpoint}: a ZeRO checkpoint of {saved.num_processes} "
                         f"processes cannot load on {state.num_processes}; convert it with `python "
                         f"{checkpoint}/pytorch_model/zero_to_fp32.py` (weights only) or DeepSpeed's "
                         f"ds_to_universal.py, or resume with {saved.num_processes} processes")
    if zero != (state.distributed_type == "DEEPSPEED"):
        raise UsageError(f"checkpoint {checkpoint} was written {'with' if zero else 'without'} DeepSpeed and this "
                         f"launch runs {'without' if zero else 'with'} it; resume with the accelerate config it was "
                         f"saved with" + (f" (or take its weights with {checkpoint}/pytorch_model/zero_to_fp32.py)"
                                          if zero else ""))
    if zero and saved.zero_stage is not None and saved.zero_stage != state.zero_stage:
        raise UsageError(f"checkpoint {checkpoint} holds ZeRO-{saved.zero_stage} shards and this launch runs "
                         f"ZeRO-{state.zero_stage}; resume with accelerate_configs/zero{saved.zero_stage}.yaml")
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, ValueError, KeyError) as error:  # e.g. another model shape: size mismatches
        raise UsageError(f"checkpoint {checkpoint} does not fit this run ({' '.join(str(error).split())[:240]}); "
                         f"rerun with the flags it was saved with, or use another --output_dir") from None
    logger.info(f"resumed from {checkpoint} at step {saved.step} (epoch {saved.epoch}, step {saved.step_in_epoch})")
    carry_data_position(saved, state)
    saved.num_processes, saved.distributed_type, saved.zero_stage = \
        state.num_processes, state.distributed_type, state.zero_stage
    saved.global_batch_blocks, saved.train_blocks = state.global_batch_blocks, state.train_blocks
    return saved


def carry_data_position(saved: TrainState, current: TrainState) -> None:
    """Map the checkpoint's place in its epoch onto this run's data and global batch.

    Every global batch size reads the same (seed, epoch) permutation of the blocks, so a new batch size resumes
    after the blocks already read (repeating fewer than one batch of them). Different data has no such place:
    its epoch starts from the beginning.
    """
    if saved.train_blocks and saved.train_blocks != current.train_blocks:
        logger.warning(f"the training data has {current.train_blocks} blocks, the checkpoint's had "
                       f"{saved.train_blocks}: the data changed, so epoch {saved.epoch} starts from its beginning")
        saved.step_in_epoch = 0
    elif saved.global_batch_blocks != current.global_batch_blocks:
        blocks_read = saved.step_in_epoch * saved.global_batch_blocks
        saved.step_in_epoch = blocks_read // current.global_batch_blocks
        resume_at = saved.step_in_epoch * current.global_batch_blocks
        logger.warning(f"global batch changed from {saved.global_batch_blocks} to {current.global_batch_blocks} "
                       f"blocks: epoch {saved.epoch} resumes at block {resume_at} of its order "
                       f"({blocks_read} were read)")
    if saved.step_in_epoch >= current.train_blocks // current.global_batch_blocks:
        saved.epoch, saved.step_in_epoch = saved.epoch + 1, 0


def save_final_model(accelerator, model, tokenizer, args: TrainArguments) -> None:
    """A complete Hugging Face model (safetensors) under ZeRO-2/3 too: the state dict is gathered on every rank."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True
        unwrapped.save_pretrained(args.output_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(args.output_dir)
        logger.info(f"saved the final model to {args.output_dir}")
    accelerator.wait_for_everyone()


# ======================================================================================================================
# Metrics
# ======================================================================================================================

def flops_per_token(model, seq_len: int) -> int:
    """6 x matmul parameters (all but the input embedding; a tied output projection still counts) + attention."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    matmul_params = params if tied else params - embedding
    return 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def device_peak_tflops(args: TrainArguments) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    """Console/progress bar, <output_dir>/metrics.jsonl and SwanLab, on the main process only."""

    def __init__(self, accelerator, args: TrainArguments, total_steps: int, state: TrainState,
                 run_config: dict[str, Any]):
        self.enabled = accelerator.is_main_process
        self.path = Path(args.output_dir) / "metrics.jsonl"
        self.swanlab = None
        self.progress = None
        self.losses: list[tuple[int, float]] = []  # (step, loss) of this process's logged steps
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "run_config.json").write_text(json.dumps(run_config, indent=1, default=str))
        if state.step == 0 and self.path.exists():
            self.path.unlink()  # a fresh start: old metrics belong to a run that made no checkpoint
        self.progress = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
        if args.report_to == "swanlab":
            self.swanlab = start_swanlab(args, state, run_config)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if "loss" in record:
            self.losses.append((record["step"], record["loss"]))
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        self.progress.write(shown)
        if self.swanlab is not None:
            self.swanlab.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if len(self.losses) >= 2:
            (first_step, first), (last_step, last) = self.losses[0], self.losses[-1]
            logger.info(f"loss {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
        if self.swanlab is not None:
            self.swanlab.finish()


def swanlab_mode(args: TrainArguments) -> str:
    """online with an API key; otherwise local (needs swanboard for `swanlab watch`) or offline. Never a prompt."""
    if args.swanlab_mode:
        return args.swanlab_mode
    if has_swanlab_api_key():
        return "online"
    try:
        import swanboard  # noqa: F401
        return "local"
    except ImportError:
        return "offline"


def has_swanlab_api_key() -> bool:
    """Whether SwanLab has a key: SWANLAB_API_KEY or a saved `swanlab login`."""
    if os.environ.get("SWANLAB_API_KEY"):
        return True
    try:
        from swanlab.sdk.internal.settings import Settings
        return bool(Settings().api_key)
    except Exception:  # no saved login, or an unreadable settings file
        return False


def start_swanlab(args: TrainArguments, state: TrainState, run_config: dict[str, Any]):
    import uuid

    os.environ.setdefault("SWANLAB_INTERACTIVE", "false")
    import swanlab

    state.swanlab_run_id = state.swanlab_run_id or uuid.uuid4().hex[:21]
    mode = swanlab_mode(args)
    try:
        swanlab.init(project=args.swanlab_project, name=args.run_name or Path(args.output_dir).name,
                     log_dir=args.logging_dir or str(Path(args.output_dir) / "swanlog"), mode=mode,
                     id=state.swanlab_run_id, resume="allow", config=run_config)
    except Exception as error:  # a login, network or folder problem, before any step is trained
        raise UsageError(f"--report_to swanlab: SwanLab did not start in {mode} mode ({first_line(error)}); fix "
                         f"that, pick another --swanlab_mode, or pass --report_to none") from None
    return swanlab


class StepTimer:
    """Wall time and data-wait time between two logging steps, without synchronising the device."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.steps = 0

    def timed_next(self, iterator):
        begin = time.perf_counter()
        batch = next(iterator, None)
        self.data_wait += time.perf_counter() - begin
        return batch


def throughput(timer: StepTimer, tokens_per_step: int, num_devices: int, flops_token: int,
               peak_tflops: float | None) -> dict[str, Any]:
    seconds = max(time.perf_counter() - timer.start, 1e-9)
    tokens_per_s = timer.steps * tokens_per_step / seconds
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / num_devices,
        "step_time_s": seconds / max(timer.steps, 1),
        "data_wait_share": timer.data_wait / seconds,
        "peak_mem_gb": peak_memory_gb(),
        "mfu": flops_token * tokens_per_s / (num_devices * peak_tflops * 1e12) if peak_tflops else None,
    }


# ======================================================================================================================
# The loop
# ======================================================================================================================

class StopRequest:
    """SIGTERM/SIGINT ask the loop to finish the current optimizer step, save and exit.

    Ranks agree through a CPU (gloo) all-reduce of one integer per optimizer step: host-to-host only, so the
    accelerator queue is never drained for it.
    """

    def __init__(self, num_processes: int):
        import torch.distributed as dist

        self.signal_name: str | None = None
        self.group = dist.new_group(backend="gloo") if num_processes > 1 else None
        self.previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled."""
        if self.group is None:
            return self.signal_name is not None
        import torch.distributed as dist

        flag = torch.tensor([int(self.signal_name is not None)])
        dist.all_reduce(flag, group=self.group)
        return bool(flag.item())


class StepProfiler:
    """torch.profiler over a few optimizer steps after a warm-up; does nothing without --profile_dir."""

    SKIP, WARMUP, ACTIVE = 4, 1, 3  # steps 1-4 unrecorded (compilation, allocator growth), 5 warms up, 6-8 recorded

    def __init__(self, folder: str | None, rank: int):
        self.folder, self.rank, self.profiler, self.written = folder, rank, None, False
        if folder is None:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities, on_trace_ready=self._write,
                                schedule=schedule(wait=self.SKIP, warmup=self.WARMUP, active=self.ACTIVE, repeat=1))
        self.profiler.start()

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def stop(self) -> None:
        if self.profiler is None:
            return
        self.profiler.stop()
        self.profiler = None
        if not self.written:
            logger.warning(f"--profile_dir: fewer than {self.SKIP + self.WARMUP + self.ACTIVE} steps ran in this "
                           f"launch, so nothing was profiled")

    def _write(self, profiler) -> None:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(folder / f"trace_rank{self.rank}.json"))
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=30)
        (folder / f"top_ops_rank{self.rank}.txt").write_text(table)
        self.written = True
        logger.info(f"profiled steps {self.SKIP + self.WARMUP + 1}-{self.SKIP + self.WARMUP + self.ACTIVE} of "
                    f"this launch: {folder}/trace_rank{self.rank}.json and top_ops_rank{self.rank}.txt")


class NonFiniteLoss(RuntimeError):
    pass


def evaluate(accelerator, model, eval_loader, chunk_size: int) -> dict[str, float]:
    """Mean token loss and perplexity over all validation blocks, gathered across processes."""
    model.eval()
    block_losses = []
    with torch.no_grad():
        for batch in eval_loader:
            losses = eval_block_losses(accelerator, model, batch["input_ids"], chunk_size)
            block_losses.append(accelerator.gather_for_metrics(losses))
    model.train()
    loss = torch.cat(block_losses).mean().item()
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def eval_block_losses(accelerator, model, input_ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Each block's mean next-token loss, in fp32 and never from a whole batch's fp32 logits (gigabytes at 150k)."""
    if not chunk_size:
        logits = model(input_ids=input_ids).logits
        return torch.stack([torch.nn.functional.cross_entropy(block_logits[:-1].float(), ids[1:])
                            for block_logits, ids in zip(logits, input_ids)])
    # With --loss_chunk_size, not even one batch's logits: the output projection runs on chunks of tokens.
    unwrapped = accelerator.unwrap_model(model)
    head = unwrapped.get_output_embeddings()
    with accelerator.autocast():
        hidden, targets = next_token_pairs(unwrapped, input_ids, input_ids)
        token_losses = torch.cat([
            torch.nn.functional.cross_entropy(head(hidden[start:start + chunk_size]).float(),
                                              targets[start:start + chunk_size], reduction="none")
            for start in range(0, len(targets), chunk_size)])
    return token_losses.view(input_ids.shape[0], -1).mean(dim=1)


def grad_norm_of(accelerator, model, max_grad_norm: float):
    """Clip (plain/DDP) or read DeepSpeed's norm; returns a tensor or float that is read only when logged."""
    if accelerator.state.deepspeed_plugin is not None:
        return None  # DeepSpeed clips inside its step; the norm is read after it
    return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))


def train(accelerator, model, optimizer, scheduler, train_loader, eval_loader, state: TrainState,
          total_steps: int, args: TrainArguments, metrics: MetricsLogger, block_size: int, flops_token: int,
          stop: StopRequest, profiler: StepProfiler) -> str:
    """Run optimizer steps until total_steps; returns why it ended: 'done' or the signal name."""
    steps_per_epoch = len(train_loader) // args.gradient_accumulation_steps
    tokens_per_step = state.global_batch_blocks * block_size
    peak_tflops = device_peak_tflops(args)
    uses_deepspeed = accelerator.state.deepspeed_plugin is not None
    eval_every = args.eval_steps or args.save_steps
    timer = StepTimer()
    loss_sum = torch.zeros((), device=accelerator.device)
    micro_steps = 0
    grad_norm = None
    model.train()
    if state.step >= total_steps:
        logger.info(f"the checkpoint is at step {state.step} of {total_steps}: nothing left to train")
    while state.step < total_steps:
        train_loader.set_epoch(state.epoch)
        skip = state.step_in_epoch * args.gradient_accumulation_steps
        # Skipping works on batch indices only: the skipped blocks are never read.
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        iterator = iter(loader)
        steps_before = state.step
        while state.step < total_steps and (batch := timer.timed_next(iterator)) is not None:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = grad_norm_of(accelerator, model, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            micro_steps += 1
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:  # an fp16 overflow skips the step: the schedule waits
                scheduler.step()
            if uses_deepspeed:
                grad_norm = model.get_global_grad_norm()
            state.step += 1
            state.tokens_seen += tokens_per_step
            state.step_in_epoch += 1
            epoch = state.epoch + state.step_in_epoch / steps_per_epoch
            epoch_done = state.step_in_epoch == steps_per_epoch
            if epoch_done:  # roll over before any save, so that a checkpoint never points past its epoch's end
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            timer.steps += 1
            metrics.advance()
            profiler.step()
            last = state.step == total_steps
            if should(args.logging_strategy, args.logging_steps, state.step, epoch_done) or last:
                mean_loss = accelerator.reduce(loss_sum / micro_steps, reduction="mean").item()
                ensure_finite(mean_loss, state.step, args)
                state.elapsed_s += time.perf_counter() - timer.start
                metrics.log({"step": state.step, "epoch": round(epoch, 4), "loss": mean_loss,
                             "lr": scheduler.get_last_lr()[0],
                             "grad_norm": None if grad_norm is None else float(grad_norm),
                             "tokens_seen": state.tokens_seen, "elapsed_s": round(state.elapsed_s, 3),
                             **throughput(timer, tokens_per_step, accelerator.num_processes, flops_token,
                                          peak_tflops)})
                loss_sum.zero_()
                micro_steps = 0
                timer.reset()
            if eval_loader is not None and (should(args.eval_strategy, eval_every, state.step, epoch_done) or last):
                metrics.log({"step": state.step,
                             **evaluate(accelerator, model, eval_loader, args.loss_chunk_size)})
            stopping = stop.agreed()
            # The last step is saved too, so that rerunning a finished command (or raising --max_steps) resumes
            # from the end rather than redoing the tail after the last save_steps checkpoint.
            final_save = last and args.save_strategy != "no"
            if should(args.save_strategy, args.save_steps, state.step, epoch_done) or stopping or final_save:
                ensure_savable(accelerator, model, loss_sum, state.step, args)
                save_checkpoint(accelerator, state, args)
            if stopping:
                return stop.signal_name or "signal on another rank"
            if epoch_done:
                break
        if state.step == steps_before:
            raise RuntimeError(f"epoch {state.epoch} gave no optimizer step (skipped {skip} batches of "
                               f"{len(train_loader)}): the data position is inconsistent")
    return "done"


def should(strategy: str, every: int, step: int, epoch_done: bool) -> bool:
    return (strategy == "steps" and step % every == 0) or (strategy == "epoch" and epoch_done)


def non_finite(what: str, step: int, args: TrainArguments) -> NonFiniteLoss:
    return NonFiniteLoss(f"non-finite {what} at step {step}: stopping without saving; lower --learning_rate or use "
                         f"--bf16, then resume from the last checkpoint in {args.output_dir}")


def ensure_finite(loss: float, step: int, args: TrainArguments) -> None:
    if not math.isfinite(loss):
        raise non_finite(f"loss ({loss})", step, args)


def ensure_savable(accelerator, model, loss_sum: torch.Tensor, step: int, args: TrainArguments) -> None:
    """Never write NaN or inf over a good checkpoint: check the unlogged losses and the weights (one sync)."""
    bad = (~torch.isfinite(loss_sum)).sum().float()
    for parameter in model.parameters():
        bad += (~torch.isfinite(parameter.detach())).sum()
    if accelerator.reduce(bad, reduction="sum").item():
        raise non_finite("loss or weights", step, args)


def print_sample(model, tokenizer, accelerator, prompt: str = "alice went to") -> None:
    """A short greedy continuation, to see what the model learned."""
    if zero_stage_of(accelerator) == 3:
        return  # generation under ZeRO-3 needs every rank in each forward; load the saved model instead
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(accelerator.device)
    with torch.no_grad():
        output = unwrapped.generate(**inputs, max_new_tokens=40, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id, use_cache=True)
    logger.info(f"sample: {tokenizer.decode(output[0], skip_special_tokens=True)!r}")


# ======================================================================================================================
# The run
# ======================================================================================================================

def load_data(accelerator, model_args: ModelArguments, data_args: DataArguments, args: TrainArguments):
    """Tokenizer, model config and the packed blocks (built by the main process, loaded by the others)."""
    tokenizer = load_tokenizer(model_args, data_args)
    config = build_config(model_args, tokenizer)
    resolve_block_size(data_args, config)
    data = main_process_first(accelerator, lambda: data_utils.prepare_data(data_args, tokenizer, seed=args.seed))
    logger.info(f"data: {json.dumps(data.stats)}")
    return tokenizer, config, data


def main_process_first(accelerator, build):
    """build() on the main process, then on the others (which load what it cached). A bad-input error there stops
    every rank with the same one line, instead of leaving the others to fail on a closed connection."""
    from accelerate.utils import broadcast_object_list

    result, error = None, [None]
    if accelerator.is_main_process:
        try:
            result = build()
        except (DataError, UsageError) as caught:
            error = [caught]
    if accelerator.num_processes > 1:
        broadcast_object_list(error)  # also the barrier: the others build only after the main process has
    if error[0] is not None:
        raise error[0]
    return result if accelerator.is_main_process else build()


def build_loaders(accelerator, data, data_args: DataArguments, args: TrainArguments):
    """The train loader (global batches of whole blocks) and the optional eval loader, not yet prepared."""
    global_batch_blocks = args.per_device_train_batch_size * accelerator.num_processes * \
        args.gradient_accumulation_steps
    pin_memory = data_args.dataloader_pin_memory and torch.cuda.is_available()
    train_loader = data_utils.build_train_dataloader(data.train, args.per_device_train_batch_size, global_batch_blocks,
                                                     args.seed, data_args.dataloader_num_workers, pin_memory)
    eval_loader = None
    if data.validation is not None and args.eval_strategy != "no":
        eval_loader = data_utils.build_eval_dataloader(data.validation[: args.max_eval_samples],
                                                       args.per_device_eval_batch_size,
                                                       data_args.dataloader_num_workers, pin_memory)
    return train_loader, eval_loader, global_batch_blocks


def count_steps(num_blocks: int, global_batch_blocks: int, args: TrainArguments) -> int:
    steps_per_epoch = num_blocks // global_batch_blocks
    return args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)


def main(argv: list[str] | None = None) -> str:
    model_args, data_args, args = parse_args(argv)
    create_output_dirs(args)
    demo = is_demo(model_args, data_args)
    accelerator = build_accelerator(args)
    torch.manual_seed(args.seed)

    tokenizer, config, data = load_data(accelerator, model_args, data_args, args)
    train_loader, eval_loader, global_batch_blocks = build_loaders(accelerator, data, data_args, args)
    total_steps = count_steps(len(data.train), global_batch_blocks, args)

    model = build_model(model_args, config, tokenizer, args)
    logger.info(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {total_steps} steps "
                f"of {global_batch_blocks} blocks ({len(data.train) // global_batch_blocks} per epoch)")
    flops_token = flops_per_token(model, data_args.block_size)
    optimizer = build_optimizer(model, args, accelerator)
    model, optimizer, train_loader, scheduler = prepare(accelerator, model, optimizer, train_loader, args,
                                                        total_steps)
    eval_loader = accelerator.prepare_data_loader(eval_loader) if eval_loader is not None else None

    state = TrainState(num_processes=accelerator.num_processes, distributed_type=accelerator.distributed_type.value,
                       global_batch_blocks=global_batch_blocks, train_blocks=len(data.train),
                       zero_stage=zero_stage_of(accelerator))
    state = resume(accelerator, choose_checkpoint(accelerator, args), state)

    run_config = {"model": asdict(model_args), "data": asdict(data_args), "train": asdict(args),
                  "num_processes": accelerator.num_processes, "total_steps": total_steps}
    metrics = MetricsLogger(accelerator, args, total_steps, state, run_config)
    stop = StopRequest(accelerator.num_processes)
    profiler = StepProfiler(args.profile_dir, accelerator.process_index)
    try:
        ended = train(accelerator, model, optimizer, scheduler, train_loader, eval_loader, state, total_steps, args,
                      metrics, data_args.block_size, flops_token, stop, profiler)
    finally:
        profiler.stop()
        stop.restore()
        metrics.close()
    if ended != "done":
        logger.warning(f"stopped by {ended} at step {state.step}; checkpoint saved in {args.output_dir}: "
                       f"rerun the same command to resume")
        return ended

    save_final_model(accelerator, model, tokenizer, args)
    if demo:
        print_sample(model, tokenizer, accelerator)
    accelerator.end_training()
    return ended


def cli(argv: list[str] | None = None) -> None:
    """main() with the errors a user can fix turned into one line (and exit status 1) instead of a traceback."""
    try:
        main(argv)
    except (UsageError, DataError, NonFiniteLoss, CheckpointError) as error:
        sys.exit(f"error: {error}")
    except torch.OutOfMemoryError as error:  # the most common bad input on a GPU: a batch that does not fit
        what = ". ".join(first_line(error).split(". ")[:2])  # "CUDA out of memory. Tried to allocate 9.27 GiB"
        sys.exit(f"error: out of memory ({what}); lower --per_device_train_batch_size "
                 f"(raise --gradient_accumulation_steps to keep the global batch), or add --gradient_checkpointing "
                 f"or --loss_chunk_size 4096, or shard with accelerate_configs/zero2.yaml; rerunning resumes from "
                 f"the last checkpoint")


if __name__ == "__main__":
    cli()
