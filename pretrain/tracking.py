"""SwanLab: which mode a run uses (online with a key, else local or offline, never a prompt) and starting it under
the run id kept in the checkpoint, so that a resume continues the same experiment.

It owns the tracker's set-up only; records are written by `pretrain.metrics.MetricsLogger`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pretrain.arguments import TrainArguments
from pretrain.errors import UsageError, first_line
from pretrain.state import TrainState


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


def check_tracker(args: TrainArguments) -> None:
    """Refuse, before any work, a tracker set-up that could only fail or prompt later."""
    if args.report_to == "swanlab" and args.swanlab_mode == "online" and not has_swanlab_api_key():
        raise UsageError("--swanlab_mode online: no SwanLab API key; set SWANLAB_API_KEY or run `swanlab login`, or "
                         "use --swanlab_mode local or offline")


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
