"""The trackers of `--report_to` (SwanLab, TensorBoard, Weights & Biases, Trackio), through Accelerate's own tracker
classes: which are asked for and installed, their folders under --logging_dir, and the keyword arguments that make
a resumed run continue the same experiment (one run id kept in the checkpoint; TensorBoard's purge_step).

Accelerate's classes do the logging; what stays here is what they cannot know: SwanLab's mode (online with a key,
else local or offline, never a prompt), W&B's key, and the resume. Only the main process logs (Accelerate's
`on_main_process`). It owns the set-up only; records are written by `pretrain.telemetry.metrics.MetricsLogger`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import UsageError, first_line
from pretrain.base.state import TrainState
from pretrain.telemetry import layer_stats, stragglers

TRACKERS = {"swanlab": "swanlab", "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # -> package


def requested_trackers(args: TrainArguments) -> list[str]:
    """--report_to as tracker names: several, comma- or space-separated; `all` is every supported one installed."""
    names = [name for value in args.report_to for name in value.split(",") if name]
    if "none" in names:
        return []
    if "all" in names:
        return [name for name, package in TRACKERS.items() if importlib.util.find_spec(package) is not None]
    for name in names:
        if name not in TRACKERS:
            raise UsageError(f"--report_to {name}: not a tracker this loop supports; use "
                             f"{', '.join(TRACKERS)}, all or none")
    return list(dict.fromkeys(names))


def check_tracker(args: TrainArguments) -> None:
    """Refuse, before any work, a tracker that is not installed or could only fail or prompt later."""
    trackers = requested_trackers(args)
    for name in trackers:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UsageError(f"--report_to {name}: the {TRACKERS[name]} package is not installed; pip install "
                             f"{TRACKERS[name]}, or drop it from --report_to")
    if "swanlab" in trackers and args.swanlab_mode == "online" and not has_swanlab_api_key():
        raise UsageError("--swanlab_mode online: no SwanLab API key; set SWANLAB_API_KEY or run `swanlab login`, or "
                         "use --swanlab_mode local or offline")
    if "wandb" in trackers and os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun") \
            and not has_wandb_api_key():
        raise UsageError("--report_to wandb: no W&B API key; set WANDB_API_KEY or run `wandb login`, or set "
                         "WANDB_MODE=offline to keep the run on disk")


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


def has_wandb_api_key() -> bool:
    """Whether W&B has a key: WANDB_API_KEY or a `wandb login` in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


def tracker_folders(args: TrainArguments) -> dict[str, Path]:
    """Where each tracker writes: under --logging_dir (SwanLab in it, as before; the others in a subfolder each),
    or by default beside the checkpoints."""
    root = Path(args.logging_dir) if args.logging_dir else None
    output = Path(args.output_dir)
    return {"swanlab": root or output / "swanlog", "tensorboard": (root or output) / "tensorboard",
            "wandb": (root or output) / "wandb"}


def start_trackers(accelerator, args: TrainArguments, state: TrainState, run_config: dict[str, Any]) -> None:
    """accelerator.init_trackers with each tracker's resume: the run id kept in the checkpoint (SwanLab, W&B), and
    TensorBoard's purge_step, which drops the steps logged after the checkpoint by the run that was cut short."""
    import uuid

    trackers = requested_trackers(args)
    if not trackers:
        return
    state.swanlab_run_id = state.swanlab_run_id or uuid.uuid4().hex[:21]  # every tracker's run id, despite the name
    name = args.run_name or Path(args.output_dir).name
    folders = tracker_folders(args)
    init_kwargs = {
        "swanlab": {"name": name, "log_dir": str(folders["swanlab"]), "mode": swanlab_mode(args),
                    "id": state.swanlab_run_id, "resume": "allow"},
        "tensorboard": {"purge_step": state.step + 1} if state.step else {},
        "wandb": {"name": name, "id": state.swanlab_run_id, "resume": "allow", "dir": str(folders["wandb"])},
        "trackio": {"name": name, "resume": "allow"},
    }
    if "swanlab" in trackers:
        os.environ.setdefault("SWANLAB_INTERACTIVE", "false")
    if "wandb" in trackers:
        folders["wandb"].mkdir(parents=True, exist_ok=True)
    config, resumed = flat_config(run_config), state.step > 0
    try:
        accelerator.init_trackers(args.swanlab_project, config=None if resumed else config,
                                  init_kwargs={tracker: init_kwargs[tracker] for tracker in trackers})
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_custom_scalars(tensorboard_layout())
            elif resumed:  # TensorBoard's hparams are a new subrun each time: once per run
                tracker.store_init_configuration(config)
    except Exception as error:  # a login, network or folder problem, before any step is trained
        raise UsageError(f"--report_to {' '.join(trackers)}: a tracker did not start ({first_line(error)}); fix "
                         f"that, or pass --report_to none") from None


def tensorboard_layout() -> dict[str, dict[str, list]]:
    """TensorBoard's Custom Scalars page: one chart per kind of per-layer value with a line per layer, and one per
    straggler timing with its slowest and fastest rank (its scalars page makes a chart per name)."""
    per_layer = {kind: ["Multiline", [rf"^{kind}/"]] for kind in (*layer_stats.KINDS, layer_stats.LOGIT)}
    per_rank = {f"straggler/{kind}": ["Multiline", [rf"^straggler/{kind}_(slowest|fastest)_s$"]]
                for kind in stragglers.KINDS}
    return {"per layer": per_layer, "stragglers": per_rank}


def flat_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The run's configuration as `section/flag` keys with plain values, which every tracker's config accepts
    (TensorBoard's hparams take no nested dictionaries, lists or None)."""
    flat = {}
    for section, values in run_config.items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            flat[f"{section}/{key}" if key else section] = value if isinstance(value, (int, float, str, bool)) \
                else str(value)
    return flat
