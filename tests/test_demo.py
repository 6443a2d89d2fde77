"""The README's demo command on a fresh machine (no flags, ZeRO-2 with 2 processes, in under 3 minutes), then the
README's debugging lines in the same checkout."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, free_port, read_metrics, run_in_process, tiny_flags

PROJECT_FILES = ["train_loop.py", "data_utils.py", "pretrain", "ds_config_zero2.json", "accelerate_configs",
                 "README.md"]


@pytest.mark.slow
def test_demo_command_from_a_fresh_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in PROJECT_FILES:  # what a clone holds, without any output or cache
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, checkout / name)
    env = dict(os.environ, PRETRAIN_LOOP_CACHE=str(tmp_path / "cache"), SWANLAB_INTERACTIVE="false",
               PYTHONUNBUFFERED="1")
    env.pop("SWANLAB_API_KEY", None)
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             "accelerate_configs/zero2.yaml", "--main_process_port", str(free_port()),
                             "train_loop.py"], cwd=checkout, env=env, capture_output=True, text=True, timeout=400)
    seconds = time.time() - start
    assert result.returncode == 0, result.stderr[-4000:]
    assert seconds < 180, f"the demo took {seconds:.0f} s"
    first, last = map(float, re.search(r"loss ([\d.]+) at step \d+ -> ([\d.]+) at step", result.stderr).groups())
    assert last < first - 3.0  # from about ln(vocab) to well under 2
    sample = re.search(r"sample: '(.*)'", result.stderr).group(1)
    assert sample.startswith("alice went to") and len(sample) > 40
    output = checkout / "output" / "demo"
    assert (output / "model.safetensors").is_file() and (output / "tokenizer.json").is_file()
    assert len(list((output / "swanlog").glob("run-*"))) == 1  # one SwanLab run, not one per rank
    train, evals = read_metrics(output)
    assert evals and evals[-1]["eval_loss"] < 2.0
    # A balanced launch (387 steps, 38 records, evaluations and saves between them) names no straggler.
    assert len(train) > 30 and all(record["straggler/forward_slowest_rank"] in (0, 1) for record in train.values())
    assert "straggler" not in result.stderr + result.stdout
    assert '"event": "straggler"' not in (output / "metrics.jsonl").read_text()

    # The debugging section right after it: output/demo now holds a 2-process ZeRO-2 checkpoint, which the
    # one-process debug run must not trip on.
    assert list(output.glob("checkpoint-*"))
    readme = (checkout / "README.md").read_text()
    command = re.search(r"^python( -m pdb .*? train_loop\.py [^#\n]*?)\s+#", readme, re.M).group(1)
    pdb_lines = [line.strip() for line in re.findall(r"^\(Pdb\) ([^#\n]*)", readme, re.M)] + ["q"]
    debug = subprocess.run(["bash", "-c", f"'{sys.executable}' {command}"], cwd=checkout, env=env, text=True,
                           timeout=300, input="\n".join(pdb_lines) + "\n", capture_output=True)
    assert "torch.Size([8, 128])" in debug.stdout, debug.stdout[-2000:] + debug.stderr[-2000:]
    assert "error:" not in debug.stderr and "NameError" not in debug.stdout
    assert "is as long as the run" not in debug.stderr  # its --warmup_steps 0 holds on the demo

    # Averaging the demo's last two checkpoints, as docs/averaging.md shows: the demo records no tokenizer flag.
    last_two = sorted(output.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))[-2:]
    soup = subprocess.run([sys.executable, "-m", "pretrain.average_checkpoints", "--checkpoints", *map(str, last_two),
                           "--output_dir", "output/soup"], cwd=checkout, env=env, text=True, capture_output=True,
                          timeout=300)
    assert soup.returncode == 0 and (checkout / "output" / "soup" / "model.safetensors").is_file(), soup.stderr[-2000:]


def test_swanlab_run_id_survives_a_resume(assets, tmp_path):
    output = tmp_path / "run"
    argv = tiny_flags(assets, output, tmp_path / "cache", "--report_to", "swanlab", "--swanlab_mode", "offline",
                      "--max_steps", 4, "--save_steps", 2)
    run_in_process(argv)
    saved_id = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())["swanlab_run_id"]
    assert saved_id
    run_in_process(argv[:-4] + ["--max_steps", "6", "--save_steps", "2"])
    assert json.loads((output / "checkpoint-6" / "trainer_state.json").read_text())["swanlab_run_id"] == saved_id
    runs = sorted(p.name for p in (output / "swanlog").glob("run-*"))
    assert len(runs) == 2 and all(name.endswith(saved_id) for name in runs)
