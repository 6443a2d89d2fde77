"""The launch: the Accelerator with its DeepSpeed plugin (gloo on a CPU-only machine), logging per rank, the output
folders, and the DeepSpeed config's "auto" entries that come from the flags.

It owns how a process joins the run; it must not build models, data or optimizers.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import signal
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from pretrain.base.arguments import TrainArguments
from pretrain.base.flag_values import read_json_object
from pretrain.base.errors import UsageError, unwritable
from pretrain.distributed.restarts import join_process_group
from pretrain.telemetry.tracking import requested_trackers, tracker_folders

logger = logging.getLogger("train_loop")
REPOSITORY = Path(__file__).resolve().parents[2]  # where accelerate_configs/ and ds_config_*.json are

def build_accelerator(args: TrainArguments):
    from accelerate import Accelerator
    from accelerate.utils import AORecipeKwargs, DeepSpeedPlugin, InitProcessGroupKwargs

    plugin = None
    launched_with = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if launched_with and not Path(launched_with).is_file() and (REPOSITORY / launched_with).is_file():
        # Our yamls name ds_config_*.json relative to the repository: found from any working directory.
        launched_with = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(REPOSITORY / launched_with)
    written = read_json_object("the accelerate config's deepspeed_config_file", launched_with) \
        if launched_with else None
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
    if args.ddp_timeout <= 0:
        raise UsageError(f"--ddp_timeout {args.ddp_timeout}: must be a positive number of seconds")
    # The process group's timeout. Under torch elastic the loop joins the group itself (join_process_group) with it;
    # elsewhere Accelerate forwards only values that differ from its class defaults (nccl, 600 s), so there
    # --ddp_timeout 600 means each backend's own default: 600 s, except 1800 s for gloo without DeepSpeed.
    timeout = timedelta(seconds=args.ddp_timeout)
    backend = "gloo" if not torch.cuda.is_available() and launched else "nccl"  # gloo: DeepSpeed/DDP on a CPU
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=timeout)]
    if args.fp8:  # torchao's float8 Linear layers, swapped in by prepare() before DeepSpeed wraps the model
        handlers.append(AORecipeKwargs())
    if args.deepspeed:
        written = read_json_object("--deepspeed", args.deepspeed)
    if written is not None:  # refused before DeepSpeed loads, and perhaps compiles, its op: no work done yet
        refuse_what_deepspeed_cannot_run(args, written)
    op_build_seconds = load_deepspeed_comm_op() if uses_deepspeed else None
    if launched:  # on keys of this attempt's own: a restart must not read the keys of the attempt before
        join_process_group(backend, timeout, args.heartbeat_timeout)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="fp8" if args.fp8 else "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimizer step itself
        log_with=requested_trackers(args) or None,
        project_dir=str(tracker_folders(args)["tensorboard"]),  # TensorBoard's folder; nothing else uses it
        # Without CUDA, Accelerate makes DDP across processes (MULTI_CPU) only when told it runs on the CPU;
        # `cpu=True` would drop a DeepSpeed plugin, so it is set only for runs without DeepSpeed.
        cpu=not torch.cuda.is_available() and launched and not uses_deepspeed,
    )
    if written is None and deepspeed_config(accelerator) is not None:  # DeepSpeed set up in the accelerate yaml
        refuse_what_deepspeed_cannot_run(args, deepspeed_config(accelerator))
    if accelerator.num_processes > 1 and accelerator.distributed_type.value == "NO":
        raise UsageError(f"{accelerator.num_processes} processes but no distributed backend: they would train "
                         f"independently; check the accelerate config's distributed_type")
    configure_logging(accelerator.is_main_process)
    stop_with_the_launcher()
    if op_build_seconds is not None and accelerator.is_main_process:
        logger.info(f"DeepSpeed's CPU communication op was built in {op_build_seconds:.0f} s, into "
                    f"{os.environ['TORCH_EXTENSIONS_DIR']}; later launches from this Python environment reuse it")
    if not torch.cuda.is_available() and accelerator.is_main_process:
        logger.warning(f"no CUDA GPU is visible: training runs on the CPU ({accelerator.num_processes} process"
                       f"{'es' if accelerator.num_processes > 1 else ''})")
    return accelerator


def extensions_folder() -> Path:
    """Where this Python environment's compiled torch extensions go: torch's default is one folder per Python
    version, which every environment on the machine shares, so two environments with different builds of torch or
    DeepSpeed evict each other's op there and each launch compiles it again (70-86 s on 2 CPU cores)."""
    from torch.utils.cpp_extension import get_default_build_root

    identity = hashlib.sha256(f"{sys.prefix}\n{torch.__version__}".encode()).hexdigest()[:12]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(get_default_build_root()) / f"{python}-torch{torch.__version__}-{identity}"


def load_deepspeed_comm_op() -> float | None:
    """Load DeepSpeed's CPU communication op in this rank before DeepSpeed does, compiling it first when this
    environment has no up-to-date build (in extensions_folder() unless TORCH_EXTENSIONS_DIR is set). Returns the
    seconds a real build took, or None: a build already there, or no such op here (a GPU; an op shipped built)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_folder()))
    import importlib

    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None  # DeepSpeed's own test: then it uses no such op
    library = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / builder.name / f"{builder.name}.so"

    def stamp() -> tuple[int, int] | None:
        return (library.stat().st_ino, library.stat().st_mtime_ns) if library.exists() else None

    before, start = stamp(), time.perf_counter()
    if before is None and os.environ.get("RANK", "0") == "0":  # logging is set up later, with the Accelerator
        print(f"{time.strftime('%H:%M:%S')} INFO building DeepSpeed's CPU communication op for this Python "
              f"environment, once (1-2 minutes on 2 CPU cores), into {os.environ['TORCH_EXTENSIONS_DIR']}",
              file=sys.stderr, flush=True)
    module = builder.load()
    seconds = time.perf_counter() - start
    backend = importlib.import_module("deepspeed.comm.torch")  # the attribute deepspeed.comm.torch is torch itself
    if hasattr(backend, "build_shm_op"):
        # DeepSpeed's loader prints "built successfully" even when it only loaded a build already there.
        backend.build_shm_op = lambda: module
    return seconds if stamp() != before else None


# bf16 matmuls against fp32 where oneDNN emulates bf16, at Qwen2.5-1.5B's widths (bench/bf16_emulation.py, oneDNN
# capped at AVX2 on an AMD EPYC, 2026-12-02). A table, not a probe: a timing at start-up is decided by a busy machine.
EMULATED_BF16_SLOWDOWN = "40-80x"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bf16 natively here: the CPU has AVX-512 (BF16) or AMX, and ONEDNN_MAX_CPU_ISA does not
    cap oneDNN below them. Without it oneDNN emulates bf16, tens of times slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_precision_is_emulated(args: TrainArguments) -> None:
    """--bf16 on a CPU where oneDNN emulates bf16: say so before the first step, every time."""
    if not args.bf16 or torch.cuda.is_available() or cpu_has_native_bf16():
        return
    logger.warning(f"--bf16: oneDNN reports no native bf16 on this CPU (it needs AVX-512 BF16 or AMX), so bf16 "
                   f"matmuls are emulated, about {EMULATED_BF16_SLOWDOWN} slower than fp32 (bench/bf16_emulation.py); "
                   f"drop --bf16 (and --torch_dtype bfloat16) for runs on this CPU")


def create_output_dirs(args: TrainArguments) -> None:
    """Fail before any work, not at the first save, when --output_dir (or the trackers' --logging_dir) is not
    writable."""
    folders = [("--output_dir", args.output_dir)]
    if requested_trackers(args) and args.logging_dir:
        folders.append(("--logging_dir", args.logging_dir))
    for flag, folder in folders:
        problem = unwritable(Path(folder))
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
    # DeepSpeed 0.19.8's ZeRO calls torch's deprecated all_gather_into_tensor on every step: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    if not sys.stderr.isatty():  # a log file gets lines, not a bar redrawn with carriage returns
        transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").addFilter(not_the_tied_head_note)


def not_the_tied_head_note(record: logging.LogRecord) -> bool:
    """Drop Accelerate's note on every save that the tied output projection is stored once: transformers ties it
    back on load, as the final model's reload test shows."""
    return "Removed shared tensor {'lm_head.weight'}" not in record.getMessage()


def refuse_what_deepspeed_cannot_run(args: TrainArguments, config: dict[str, Any]) -> None:
    """One line for flags that this DeepSpeed config cannot train with: Muon off ZeRO stage 2, chunked loss on
    ZeRO-3."""
    from pretrain.optim.optimizers import refuse_muon_where_deepspeed_differs

    refuse_muon_where_deepspeed_differs(args, config)
    if args.loss_chunk_size and config.get("zero_optimization", {}).get("stage") == 3:
        raise UsageError("--loss_chunk_size with ZeRO-3: the output projection's weight is partitioned outside its "
                         "own forward; use accelerate_configs/zero2.yaml or --loss_chunk_size 0")


def deepspeed_config(accelerator) -> dict[str, Any] | None:
    plugin = accelerator.state.deepspeed_plugin
    return plugin.deepspeed_config if plugin is not None else None


def zero_stage_of(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this launch, or None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin is not None else None


def fill_deepspeed_config(accelerator, args: TrainArguments) -> None:
    """Resolve the "auto" entries that Accelerate would otherwise fill with its own defaults."""
    config = deepspeed_config(accelerator)
    if config is None:
        return
    if str(config.get("optimizer", {}).get("type", "")).lower() != "muon":
        from pretrain.optim.optimizers import load_deepspeed_muon_uncompiled

        load_deepspeed_muon_uncompiled()
    if config.get("gradient_clipping") == "auto":
        config["gradient_clipping"] = args.max_grad_norm
    for key, value in config.get("optimizer", {}).get("params", {}).items():
        if value == "auto":
            config["optimizer"]["params"][key] = {
                "lr": args.learning_rate, "betas": [args.adam_beta1, args.adam_beta2], "eps": args.adam_epsilon,
                "weight_decay": args.weight_decay}[key]


def stop_with_the_launcher() -> None:
    """Ask Linux for SIGTERM when the launcher dies. torch elastic puts each worker in a session of its own, so a
    launcher killed by SIGKILL (the OOM killer, kill -9) would leave the workers training headless, holding the
    GPUs and the output folder; with this they take the ordinary stop path instead: save, then exit."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def run_program(entry: Callable[[], object]) -> None:
    """Run a command's entry point as the whole life of its process. On the way out Python collects garbage once
    more over every object that the imports of torch, transformers and DeepSpeed made, which nothing needs by then:
    about 2 s of every process's exit on a 2-core CPU (`python bench/startup_time.py`). Frozen, they are left out."""
    try:
        entry()
    finally:
        gc.freeze()
