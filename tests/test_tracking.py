"""--report_to through Accelerate's trackers: W&B offline runs that keep one id across a resume, `all`, and one line
for a tracker that is not installed. TensorBoard's events with no step twice after a SIGKILL and a resume are
checked by the SIGKILL test of test_checkpoints.py; SwanLab's own behaviour in test_demo and test_train_loop."""

import importlib.util
import json

import pytest
from conftest import run_in_process, tiny_flags

from pretrain.base.errors import UsageError


def test_wandb_offline_keeps_one_run_id_across_a_resume(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    output, logs = tmp_path / "run", tmp_path / "logs"
    argv = tiny_flags(assets, output, tmp_path / "cache", "--report_to", "wandb", "--logging_dir", logs,
                      "--max_steps", 2, "--save_steps", 2)
    run_in_process(argv)
    run_id = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())["swanlab_run_id"]
    run_in_process(argv[:-4] + ["--max_steps", "4", "--save_steps", "2"])
    runs = sorted((logs / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs), runs
    assert all(list(run.glob("*.wandb")) for run in runs)  # the records W&B syncs later


def test_report_to_all_starts_every_installed_tracker(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "run"
    run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--report_to", "all", "--swanlab_mode", "offline",
                              "--max_steps", 2))
    installed = {name for name in ("swanlab", "tensorboard", "wandb") if importlib.util.find_spec(name)}
    assert {"swanlab", "tensorboard"} <= installed  # requirements-dev.txt
    assert ("swanlab" in installed) == (output / "swanlog").is_dir()
    assert ("tensorboard" in installed) == bool(list((output / "tensorboard").rglob("events.out.tfevents.*")))
    assert ("wandb" in installed) == (output / "wandb").is_dir()
    assert tensorboard_charts(output / "tensorboard") == {
        "per layer": {"layer_grad_norm": ["^layer_grad_norm/"], "layer_update_norm": ["^layer_update_norm/"],
                      "layer_update_ratio": ["^layer_update_ratio/"], "layer_weight_norm": ["^layer_weight_norm/"],
                      "attn_logit_max": ["^attn_logit_max/"]},
        "stragglers": {f"straggler/{kind}": [f"^straggler/{kind}_(slowest|fastest)_s$"]
                       for kind in ("step_time", "data_wait", "forward")}}


def tensorboard_charts(folder):
    """The Custom Scalars layout a run wrote to TensorBoard, read back from its event file: {category: {chart: regexes
    of its lines}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(str(next(folder.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return {category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
            for category in layout.category}


def test_a_tracker_that_is_not_installed_is_one_line(assets, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else find_spec(name, *a))
    with pytest.raises(UsageError, match=r"^--report_to tensorboard: the tensorboard package is not installed; pip "
                                         r"install tensorboard, or drop it from --report_to$"):
        run_in_process(tiny_flags(assets, tmp_path / "run", tmp_path / "cache", "--report_to", "swanlab",
                                  "tensorboard"))


def test_wandb_without_a_key_online_is_one_line(assets, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    with pytest.raises(UsageError, match=r"^--report_to wandb: no W&B API key; set WANDB_API_KEY or run `wandb "
                                         r"login`, or set WANDB_MODE=offline"):
        run_in_process(tiny_flags(assets, tmp_path / "run", tmp_path / "cache", "--report_to", "wandb"))
