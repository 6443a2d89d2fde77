"""Skipped steps and rewinds, provoked with PRETRAIN_FAULT (pretrain/base/faults.py): a loss spike and NaN gradients are
skipped with weights and optimizer state unchanged to the bit, on one process and under ZeRO-2; a poisoned stretch of
data is rewound past; trouble that comes back stops the run in one line; SIGKILL right after a skip and after a
rewind resumes to the bit; a run that diverges on a real-sized vocabulary stops in one line, and a spike does not."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, LoggedProcess, kill_tree, launch, launch_command, launch_env, read_metrics, run_in_process, \
    tiny_flags

STEPS = 60
SPIKE, NAN_GRAD = 40, 44  # after the rolling window (32 steps) is full, at a third of the peak learning rate
GUARD = ("--spike_window", 32, "--rewind_margin_steps", 2, "--learning_rate", 1e-3)
# A wider model than the tiny default, so that a step takes long enough for a kill to land between two steps.
SLOW = ("--config_overrides", "hidden_size=192,intermediate_size=768,num_attention_heads=6,num_key_value_heads=2")


def flags(assets, output, cache, *extra):
    return tiny_flags(assets, output, cache, "--max_steps", STEPS, "--gradient_accumulation_steps", 2,
                      "--eval_steps", STEPS, "--max_eval_samples", 64, *GUARD, *extra)


def train(argv, fault="", timeout=300, expect=0):
    result = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), *map(str, argv)], cwd=ROOT, timeout=timeout,
                            env=dict(os.environ, PRETRAIN_FAULT=fault), capture_output=True, text=True)
    assert result.returncode == expect, result.stderr[-4000:]
    return result.stderr


def events(output, kind):
    """The skip or rewind records of metrics.jsonl (a line being written is left for the next look)."""
    found = []
    for line in (Path(output) / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == kind:
            found.append(record)
    return found


def flat(obj, prefix=""):
    """Every leaf of a nested checkpoint object by its path."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from flat(value, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from flat(value, f"{prefix}/{index}")
    else:
        yield prefix, obj


# A real-sized vocabulary (a uniform guess scores ln 32000 = 10.37) at a learning rate that diverges at its first
# update: 10.36 at step 1, then 1.6e4, 2.7e4, 5.1e4, 1.4e5. At --learning_rate 5 it falls back to 30 by step 30 of a
# linear decay (10.36, 420, 624, ... 114 at step 20, 30 at step 30), as the runs seen with Qwen's tokenizer did.
DIVERGING = ("--config_overrides", "vocab_size=32000", "--learning_rate", 30, "--lr_scheduler_type", "constant",
             "--warmup_steps", 0, "--max_steps", 30, "--divergence_steps", 4, "--save_steps", 1, "--eval_steps", 3,
             "--max_eval_samples", 8)
DIVERGED = ("error: the run diverged: its loss stayed above 20.72 (a uniform guess over 32,000 tokens scores 10.37, "
            "the run's lowest was 10.36) over steps 2-5, and was ")
# What may change over a skipped step: the learning rate (the schedule goes on), DeepSpeed's own step and skip
# counters, and its overflow flag (the skip itself). Weights, master weights, moments and AdamW's step may not.
MAY_CHANGE = ("/lr", "/global_steps", "/global_samples", "/skipped_steps", "/loss_scaler", "/overflow")


def changed_state(before: Path, after: Path) -> list[str]:
    """The leaves of the model and optimizer files that differ between two checkpoints, beyond MAY_CHANGE."""
    from safetensors.torch import load_file

    changed = []
    for path in sorted(before.rglob("*")):
        if path.suffix not in (".pt", ".bin", ".safetensors") or path.name == "scheduler.bin":
            continue
        load = load_file if path.suffix == ".safetensors" else lambda p: torch.load(p, weights_only=False)
        old, new = dict(flat(load(path))), dict(flat(load(after / path.relative_to(before))))
        assert old.keys() == new.keys() and len(old) > 4, path
        for key, value in old.items():
            same = torch.equal(value, new[key]) if isinstance(value, torch.Tensor) else value == new[key]
            if not same and not key.endswith(MAY_CHANGE):
                changed.append(f"{path.name}:{key}")
    return changed


def assert_skip_left_state_untouched(output):
    for step in (SPIKE, NAN_GRAD):
        before, after = output / f"checkpoint-{step - 1}", output / f"checkpoint-{step}"
        assert changed_state(before, after) == [], step
        assert changed_state(after, output / f"checkpoint-{step + 1}"), "the next step changed nothing"
    assert [e["step"] for e in events(output, "skipped")] == [SPIKE, NAN_GRAD]
    assert events(output, "skipped")[1]["why"].startswith("gradient norm")


def final_eval_loss(output):
    return read_metrics(output)[1][-1]["eval_loss"]


pytestmark = pytest.mark.slow  # every test here trains for tens of steps, several times


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory):
    """The same run: clean; with a spike and NaN gradients (skipped), saving every step around them to compare
    states; with the spike alone (skipped); and with the spike and skipping off."""
    root = tmp_path_factory.mktemp("guard")
    cache = root / "cache"
    log = train(flags(assets, root / "faulted", cache, "--save_steps", 1),
                fault=f"spike@step={SPIKE},nan_grad@step={NAN_GRAD}")  # as a user runs it: its lines are checked
    run_in_process(list(map(str, flags(assets, root / "clean", cache))))  # the others in this process
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRETRAIN_FAULT", f"spike@step={SPIKE}")
        run_in_process(list(map(str, flags(assets, root / "spiked", cache))))
        run_in_process(list(map(str, flags(assets, root / "unguarded", cache, "--skip_bad_steps", "false"))))
    return root, log


def test_a_spike_and_nan_gradients_are_skipped_with_state_untouched_on_one_process(one_process):
    root, log = one_process
    assert f"step {SPIKE} skipped (loss " in log and f"step {NAN_GRAD} skipped (gradient norm nan)" in log
    assert_skip_left_state_untouched(root / "faulted")
    train_records, _ = read_metrics(root / "faulted")
    assert train_records[STEPS]["skipped_steps"] == 2 and train_records[SPIKE - 1]["skipped_steps"] == 0


def test_a_skipped_spike_ends_within_one_percent_of_the_clean_run(one_process, capsys):
    root, _ = one_process
    clean, skipped, unguarded = (final_eval_loss(root / name) for name in ("clean", "spiked", "unguarded"))
    with capsys.disabled():
        print(f"\neval_loss after {STEPS} steps: clean {clean:.4f}, spike skipped {skipped:.4f}, "
              f"spike trained through {unguarded:.4f}")
    assert skipped == pytest.approx(clean, rel=0.01)
    assert [e["step"] for e in events(root / "spiked", "skipped")] == [SPIKE]
    train_records, _ = read_metrics(root / "unguarded")
    assert train_records[SPIKE]["loss"] > 100 and not events(root / "unguarded", "skipped")  # trained through


def test_a_spike_and_nan_gradients_are_skipped_with_state_untouched_under_zero2(assets, one_process, tmp_path):
    """The same global batch as the one-process runs (2 processes x 1 block x accumulation 2): the same skips, the
    same losses, and an end within 1 % of the clean one-process run."""
    root, _ = one_process
    faulted = tmp_path / "faulted"
    os.environ["PRETRAIN_FAULT"] = f"spike@step={SPIKE},nan_grad@step={NAN_GRAD}"
    try:
        result = launch("zero2.yaml", 2, flags(assets, faulted, root / "cache", "--per_device_train_batch_size", 1,
                                               "--save_steps", 1))
    finally:
        del os.environ["PRETRAIN_FAULT"]
    assert result.stderr.count(f"step {SPIKE} skipped (loss ") == 1  # said once, by the main process
    # DeepSpeed's overflow of a NaN gradient is said as such, and once: its own "OVERFLOW!" line is not repeated
    assert result.stderr.count(f"step {NAN_GRAD} skipped (gradient norm nan)") == 1
    assert "OVERFLOW" not in result.stdout + result.stderr
    assert_skip_left_state_untouched(faulted)
    assert final_eval_loss(faulted) == pytest.approx(final_eval_loss(root / "clean"), rel=0.01)
    single, _ = read_metrics(root / "faulted")
    for step, record in read_metrics(faulted)[0].items():
        assert record["loss"] == pytest.approx(single[step]["loss"], rel=1e-4), step


def test_zero3_skips_a_spike_and_nan_gradients_with_state_untouched(assets, one_process, tmp_path):
    """ZeRO-3 decides in its own step function; the same hook, the same untouched state (8 steps, short window)."""
    root, _ = one_process
    output = tmp_path / "zero3"
    os.environ["PRETRAIN_FAULT"] = "spike@step=6,nan_grad@step=7"
    try:
        result = launch("zero3.yaml", 2, flags(assets, output, root / "cache", "--per_device_train_batch_size", 1,
                                               "--max_steps", 8, "--spike_window", 8, "--save_steps", 1,
                                               "--eval_strategy", "no", "--learning_rate", 1e-3))
    finally:
        del os.environ["PRETRAIN_FAULT"]
    assert "step 6 skipped (loss " in result.stderr and "step 7 skipped (gradient norm nan)" in result.stderr
    assert changed_state(output / "checkpoint-5", output / "checkpoint-7") == []  # across both skips
    assert changed_state(output / "checkpoint-7", output / "checkpoint-8")


POISONED = "nan_loss@batch=15-17"  # three global batches of the data order


def test_a_poisoned_stretch_is_rewound_past_and_the_run_finishes(assets, tmp_path, monkeypatch, capfd):
    output = tmp_path / "run"
    monkeypatch.setenv("PRETRAIN_FAULT", POISONED)
    run_in_process(list(map(str, flags(assets, output, tmp_path / "cache", "--save_steps", 5,
                                       "--rewind_after_skips", 3))))
    log = capfd.readouterr().err
    rewind = [line for line in log.splitlines() if "rewind:" in line]
    assert len(rewind) == 1 and "steps 15-17 were skipped (the last: loss nan); reloaded checkpoint-10 (step 10) " \
        "and skipped blocks 40-76 of the data order, 2 global batches past the trouble; training goes on at step " \
        "18" in rewind[0], log[-3000:]
    assert [e["step"] for e in events(output, "skipped")] == [15, 16, 17]
    assert events(output, "rewind")[0]["from_block"] == 40 and events(output, "rewind")[0]["to_block"] == 76
    assert not (output / "checkpoint-15").exists() or json.loads(
        (output / "checkpoint-15" / "trainer_state.json").read_text())["guard"]["in_a_row"] == 0
    train_records, _ = read_metrics(output)
    assert sorted(train_records) == list(range(1, STEPS + 1)) and (output / "model.safetensors").is_file()
    assert train_records[STEPS]["skipped_steps"] == 3


def test_trouble_that_comes_back_after_a_rewind_stops_with_one_line(assets, tmp_path, monkeypatch, capfd):
    """Through cli(), as the command line runs it: the one line is what the process exits with. checkpoint-15, saved
    during the trouble (after the rewind, at the first skip of the second streak), is deleted with the stop: the
    rerun resumes from checkpoint-10, from before the trouble."""
    output = tmp_path / "run"
    argv = list(map(str, flags(assets, output, tmp_path / "cache", "--save_steps", 5, "--rewind_after_skips", 3)))
    monkeypatch.setenv("PRETRAIN_FAULT", "nan_loss@step=12-30")
    with pytest.raises(SystemExit) as exited:
        run_in_process(argv, entry="cli")
    assert exited.value.code == (
        "error: steps 15-17 were skipped (the last: loss nan), after a rewind at step 14 to checkpoint-10 that "
        "skipped blocks 40-64: the trouble came back; lower --learning_rate, or check the data from block 40 on")
    log = capfd.readouterr().err
    assert log.count("rewind:") == 1 and "Traceback" not in log and f"saved {output / 'checkpoint-15'}" in log
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    monkeypatch.delenv("PRETRAIN_FAULT")
    run_in_process([*argv, "--max_steps", "11"])
    assert f"resumed from {output / 'checkpoint-10'} at step 10" in capfd.readouterr().err


def test_sigkill_right_after_a_skip_and_right_after_a_rewind_resumes_to_the_bit(assets, tmp_path, monkeypatch,
                                                                             capfd):
    """One run killed twice, right after its skip at step 8 and, rerun, right after its rewind at step 17, then
    rerun to the end: every step from the first kill on equals the run never killed, to the bit."""
    argv = flags(assets, tmp_path / "x", tmp_path / "cache", *SLOW, "--save_steps", 5, "--rewind_after_skips", 3,
                 "--max_steps", 22)
    fault = "nan_loss@step=8," + POISONED  # a skip at 8, then the rewind at 17 to checkpoint-10
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    monkeypatch.setenv("PRETRAIN_FAULT", fault)
    run_in_process([*map(str, argv), "--output_dir", str(straight)])  # the reference, in this process
    command = [sys.executable, str(ROOT / "train_loop.py"), *map(str, argv), "--output_dir", str(resumed)]
    killed_at = []
    for after in ("skipped", "rewind"):
        process = LoggedProcess(command, tmp_path / f"{after}.log", cwd=ROOT,
                                env=dict(os.environ, PRETRAIN_FAULT=fault))
        process.wait_until(lambda: (resumed / "metrics.jsonl").is_file() and events(resumed, after), poll_s=0.005)
        kill_tree(process)
        process.wait()
        killed_at.append(max(read_metrics(resumed)[0]))
    assert killed_at[1] < 22, "the run ended before the kill"
    assert "resumed from" in (tmp_path / "rewind.log").read_text()
    capfd.readouterr()
    run_in_process([*map(str, argv), "--output_dir", str(resumed)])  # the last rerun, in this process
    assert "resumed from" in capfd.readouterr().err
    expected, got = read_metrics(straight)[0], read_metrics(resumed)[0]
    for step in range(killed_at[0], 23):
        assert got[step]["loss"] == expected[step]["loss"], step  # exact, not approximate
        assert got[step]["skipped_steps"] == expected[step]["skipped_steps"]
    assert final_eval_loss(resumed) == final_eval_loss(straight)


def test_a_change_of_level_is_taken_in_after_a_few_skips_and_never_causes_a_rewind():
    """The window takes in every finite value, a skipped step's too (OLMo-core's rule): a gradient norm that jumps
    from about 0.9 to about 8 and stays there, as on the one-process demo at step 199, is skipped for a few steps, not
    until a rewind; a NaN never enters the window."""
    import random
    import types

    from pretrain.base.arguments import TrainArguments
    from pretrain.base.state import TrainState
    from pretrain.resilience.step_guard import StepGuard

    accelerator = types.SimpleNamespace(device="cpu", state=types.SimpleNamespace(deepspeed_plugin=None))
    guard = StepGuard(accelerator, None, TrainArguments(), TrainState(), vocab_size=387)
    noise = random.Random(0)
    skipped = []
    for step in range(1, 301):
        guard.loss = 2.0 + noise.gauss(0, 0.01)
        norm = (0.9 if step < 200 else 8.0) + noise.gauss(0, 0.05)
        guard.judge(float("nan") if step == 150 else norm)
        if guard.skipped:
            skipped.append(step)
    assert skipped[0] == 150 and 200 in skipped  # the NaN, and the jump
    assert max(skipped) < 200 + guard.window // 32 and guard.records["in_a_row"] == 0
    assert all(value == value for value in guard.records["norms"])  # no NaN in the window


def test_a_diverged_run_stops_with_one_line_and_saves_no_model_on_one_process(assets, one_process, tmp_path, capfd):
    """Through cli(), as the command line runs it (on the fixture's data cache). The checkpoints of the diverged
    stretch are deleted, the one from before it stays; an eval loss beyond a float's exp has perplexity inf."""
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        run_in_process(list(map(str, tiny_flags(assets, output, one_process[0] / "cache", *DIVERGING))), entry="cli")
    line = exited.value.code
    assert line.startswith(DIVERGED) and line.endswith(
        "at step 5 at learning rate 30; lower --learning_rate or raise --warmup_steps, and run again (checkpoints "
        "from step 2 on were deleted)"), line
    assert "Traceback" not in capfd.readouterr().err
    assert not (output / "model.safetensors").exists()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1"]
    [diverged] = events(output, "diverged")
    assert diverged["step"] == 5 and diverged["since_step"] == 2 and diverged["step_loss"] > 1000
    [evaluated] = read_metrics(output)[1]
    assert evaluated["eval_loss"] > 709.79 and evaluated["perplexity"] == math.inf  # exp overflows a float there


def test_a_diverged_run_stops_every_rank_with_one_line_under_zero2(assets, one_process, tmp_path):
    """The same run under zero2.yaml x 2 (1 block per rank: the same global batch of 2 blocks): every rank stops
    at the same step from the same all-reduced loss, the launch exits 1, no rank hangs or prints a traceback, and
    the launcher's report names the line as the root cause."""
    output = tmp_path / "run"
    argv = tiny_flags(assets, output, one_process[0] / "cache", *DIVERGING, "--per_device_train_batch_size", 1,
                      "--eval_strategy", "no")
    env = launch_env()
    result = subprocess.run(launch_command("zero2.yaml", 2, list(map(str, argv)),
                                           ("--main_process_port", env["MASTER_PORT"])),
                            env=env, capture_output=True, text=True, timeout=300)
    [line] = [line for line in result.stderr.splitlines() if line.startswith(DIVERGED)]  # printed once, by rank 0
    assert result.returncode == 1 and "at step 5 at learning rate 30;" in line, result.stderr[-3000:]
    ours, report = result.stderr.split("\n" + line + "\n")
    assert "Traceback" not in ours and f"traceback : {line}" in report.split("Root Cause")[1]  # the launcher's
    assert not (output / "model.safetensors").exists()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_spike_trained_through_does_not_count_as_divergence(one_process):
    """The unguarded run trained through a loss of over 100 at SPIKE (a uniform guess over the test tokenizer's 387
    tokens scores 5.96): one step above the line, then back under it; every run finished and saved its model."""
    root, _ = one_process
    train_records, _ = read_metrics(root / "unguarded")
    assert train_records[SPIKE]["loss"] > 100 and train_records[STEPS]["loss"] < math.log(387)
    for name in ("faulted", "clean", "spiked", "unguarded"):
        assert not events(root / name, "diverged") and (root / name / "model.safetensors").is_file(), name
