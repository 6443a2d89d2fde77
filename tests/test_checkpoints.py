"""Checkpoints on one process: exact resume after SIGKILL, SIGTERM, random kills, damage, NaN, retention."""

import json
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, LoggedProcess, checkpoint_estimate_error, kill_tree, logged_steps, read_metrics, run_in_process, \
    scalars, tiny_flags

import train_loop
from pretrain.base.arguments import parse_args
from pretrain.base.errors import NonFiniteLoss, UsageError
from pretrain.checkpointing import checkpoints
from pretrain.checkpointing.checkpoints import TrainState

STEPS = 12
# A wider model than the tiny default, so that a step takes long enough for a kill to land mid-run.
SLOW = ("--config_overrides", "hidden_size=192,intermediate_size=768,num_attention_heads=6,num_key_value_heads=2")


def flags(assets, output, cache, *extra):
    return tiny_flags(assets, output, cache, "--train_files", assets["tiny"], "--validation_split_percentage", 0,
                      "--max_steps", STEPS, "--gradient_accumulation_steps", 4, *extra)


def start(argv, log):
    return LoggedProcess([sys.executable, str(ROOT / "train_loop.py"), *map(str, argv)], log, cwd=ROOT)


def finish(argv, capfd):
    """The rerun that resumes, to the end, in this process (a new process proves nothing more: the killed run was
    one); what it logged."""
    capfd.readouterr()
    run_in_process(list(map(str, argv)))
    return capfd.readouterr().err


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact_across_an_epoch_boundary(assets, tmp_path, capfd, mask="block_causal"):
    """12 steps straight against 6 steps, SIGKILL after step 8, the same command again: steps 7-12 identical to the
    bit. The tiny corpus holds 10 steps per epoch, so the resumed run starts mid-epoch and crosses into epoch 2. With
    attention masked at documents, whose positions come with each batch; the causal default resumes to the bit in
    test_step_guard.py and test_mixture.py, and under ZeRO-2 in test_distributed.py. Both report to TensorBoard:
    the steps logged after checkpoint-6 and lost with the kill show once after the resume."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = (*SLOW, "--attn_mask_type", mask, "--report_to", "tensorboard", "--eval_steps", 4, "--validation_files",
             assets["small"], "--max_eval_samples", 16)
    run_in_process(flags(assets, straight, tmp_path / "cache", *extra, "--logging_dir", tmp_path / "straight_logs"))
    logs = tmp_path / "logs"
    argv = flags(assets, resumed, tmp_path / "cache", *extra, "--save_steps", 6, "--logging_dir", logs)
    process = start(argv, tmp_path / "run.log")
    # Step 8 in metrics.jsonl: step 7 has reached TensorBoard too (it is logged there after metrics.jsonl).
    process.wait_until(lambda: (resumed / "checkpoint-6").is_dir() and max(logged_steps(resumed), default=0) >= 8,
                       timeout=120, poll_s=0.005)
    kill_tree(process)
    process.wait()
    assert not (resumed / "model.safetensors").exists(), "the run ended before the kill"
    assert 7 in scalars(logs / "tensorboard")["loss"]  # logged, then lost with the kill: the resume logs it again
    # TensorBoard reads a run's event files in name order, and a name starts with its writer's second. A rerun's new
    # process takes seconds to start, so its file sorts after the killed run's; this resume runs in the test process,
    # whose lower pid sorts first within the same second (a quick killed run): its purge would be read before the
    # steps it purges. Rerun in the next second, as a user's rerun does.
    killed_at = max(int(path.name.split(".")[3]) for path in (logs / "tensorboard").rglob("events.out.tfevents.*"))
    time.sleep(max(0.0, killed_at + 1 - time.time()))
    log = finish(argv, capfd)
    assert "resumed from" in log and "checkpoint-6" in log
    expected, _ = read_metrics(straight)
    got, _ = read_metrics(resumed)
    assert expected[10]["epoch"] == 1 and expected[12]["epoch"] > 1
    for step in range(7, STEPS + 1):
        assert got[step]["loss"] == expected[step]["loss"], step  # exact, not approximate
        assert got[step]["lr"] == expected[step]["lr"] and got[step]["tokens_seen"] == expected[step]["tokens_seen"]
    steps = scalars(logs / "tensorboard")
    assert sorted(steps["loss"]) == list(range(1, STEPS + 1)), steps["loss"]
    assert sorted(steps["lr"]) == list(range(1, STEPS + 1)) and sorted(steps["eval_loss"]) == [4, 8, 12]
    assert len(list((logs / "tensorboard").rglob("hparams.yml"))) == 1  # the configuration once, not per launch


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_a_rerun_continues(assets, tmp_path, capfd):
    output = tmp_path / "run"
    argv = flags(assets, output, tmp_path / "cache", *SLOW, "--max_steps", 24, "--save_steps", 1000)
    process = start(argv, tmp_path / "run.log")
    process.wait_until(lambda: len(logged_steps(output)) >= 3, timeout=120, poll_s=0.005)
    process.send_signal(signal.SIGTERM)
    out = process.output(timeout=60)
    assert process.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM" in out and "rerun the same command to resume" in out
    stopped_at = max(logged_steps(output))
    assert stopped_at < 24 and [p.name for p in output.glob("checkpoint-*")] == [f"checkpoint-{stopped_at}"]
    log = finish(argv, capfd)
    assert f"checkpoint-{stopped_at}" in log
    train, _ = read_metrics(output)
    assert sorted(train) == list(range(1, 25)) and (output / "model.safetensors").exists()


@pytest.mark.slow
def test_sigkill_at_random_moments_always_resumes_from_a_complete_checkpoint(assets, tmp_path, capfd):
    output = tmp_path / "run"
    argv = flags(assets, output, tmp_path / "cache", *SLOW, "--max_steps", 40, "--save_steps", 1,
                 "--save_total_limit", 2)
    rng = random.Random(1234)
    resumed_steps = []
    killed_mid_save, left = 0, []
    for attempt in range(5):
        before = max(logged_steps(output), default=0)
        process = start(argv, tmp_path / f"attempt{attempt}.log")
        # A new step, and a complete checkpoint to fall back on (a loaded machine may still be writing the first).
        process.wait_until(lambda: max(logged_steps(output), default=0) > before
                           and checkpoints.list_checkpoints(output), timeout=120, poll_s=0.005)
        if attempt % 2:  # odd attempts: the moment a save is under way
            process.wait_until(lambda: any(output.glob("checkpoint-*.tmp")), timeout=120, poll_s=0.005)
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        kill_tree(process)
        out = process.output(timeout=60)
        assert all(f"removed {name}, left by a save or a deletion that did not finish" in out for name in left), \
            out[-3000:]
        left = [p.name for p in [*output.glob("checkpoint-*.tmp"), *output.glob("checkpoint-*.deleting")]]
        killed_mid_save += any(name.endswith(".tmp") for name in left)
        assert "Traceback" not in out, out[-3000:]
        if attempt:
            assert "resumed from" in out, out[-3000:]
            resumed_steps.append(int(out.split("resumed from ")[1].split(" at step ")[1].split(" ")[0]))
        complete = checkpoints.list_checkpoints(output)
        assert complete and all(checkpoints.checkpoint_damage(c) is None for c in complete)
    assert killed_mid_save >= 1 and resumed_steps == sorted(resumed_steps)
    assert not (output / "model.safetensors").exists()
    log = finish(argv, capfd)
    assert "resumed from" in log
    train, _ = read_metrics(output)
    assert sorted(train) == list(range(1, 41)) and (output / "model.safetensors").exists()


def test_damaged_newest_checkpoint_falls_back_with_a_warning(assets, tmp_path, capfd):
    output = tmp_path / "run"
    argv = flags(assets, output, tmp_path / "cache", "--max_steps", 6, "--save_steps", 3)
    run_in_process(argv)
    weights = output / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a crash of the storage
    capfd.readouterr()
    run_in_process(argv)
    err = capfd.readouterr().err
    assert "checkpoint-6 is damaged (truncated model.safetensors" in err and "falling back" in err
    assert "checkpoint-3 at step 3" in err
    steps = logged_steps(output)
    assert steps.count(4) == 2 and steps.count(6) == 2  # steps 4-6 were trained again
    assert checkpoints.checkpoint_damage(output / "checkpoint-6") is None  # and saved whole


def test_interrupted_save_is_never_picked(assets, tmp_path):
    output = tmp_path / "run"
    argv = flags(assets, output, tmp_path / "cache", "--max_steps", 4, "--save_steps", 2)
    run_in_process(argv)
    (output / "checkpoint-8.tmp").mkdir()  # a save killed before its rename
    (output / "checkpoint-8.tmp" / "model.safetensors").write_bytes(b"partial")
    assert [c.name for c in checkpoints.list_checkpoints(output)] == ["checkpoint-2", "checkpoint-4"]
    args = parse_args(argv)[2]
    assert checkpoints.find_resume_checkpoint(args) == output / "checkpoint-4"
    assert not (output / "checkpoint-8.tmp").exists()  # its gigabytes are not left behind


def test_a_deletion_cut_short_never_leaves_a_damaged_checkpoint_under_its_name(assets, tmp_path, monkeypatch,
                                                                              capfd):
    """--save_total_limit's deletion killed half-way (here: rmtree fails after the rename): the old checkpoint is
    out of resume's sight at once, and the next start removes what is left, saying so."""
    output = tmp_path / "run"
    argv = flags(assets, output, tmp_path / "cache", "--max_steps", 4, "--save_steps", 2)
    run_in_process(argv)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoints.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            checkpoints.prune_checkpoints(output, 1)
    assert [c.name for c in checkpoints.list_checkpoints(output)] == ["checkpoint-4"]
    assert (output / "checkpoint-2.deleting").is_dir()
    capfd.readouterr()
    assert checkpoints.find_resume_checkpoint(parse_args(argv)[2]) == output / "checkpoint-4"
    assert not (output / "checkpoint-2.deleting").exists()
    assert "removed checkpoint-2.deleting, left by a save or a deletion that did not finish" in capfd.readouterr().err


def test_save_total_limit_keeps_the_newest(assets, tmp_path):
    output = tmp_path / "run"
    run_in_process(flags(assets, output, tmp_path / "cache", "--max_steps", 8, "--save_steps", 2,
                         "--save_total_limit", 2))
    assert [c.name for c in checkpoints.list_checkpoints(output)] == ["checkpoint-6", "checkpoint-8"]
    state = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["tokens_seen"] == 8 * 8 * 64 and state["epoch"] == 0


def test_the_checkpoint_estimate_is_within_ten_percent_of_a_real_save(assets, tmp_path, capfd):
    output = tmp_path / "run"
    run_in_process(flags(assets, output, tmp_path / "cache", "--max_steps", 2, "--save_steps", 2))
    log = capfd.readouterr().err
    assert "this run saves 1 more and keeps all of them (--save_total_limit is unset)" in log
    assert checkpoint_estimate_error(log, output / "checkpoint-2") < 0.10


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: a disk too small for a run that keeps every checkpoint."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.slow
def test_a_run_whose_checkpoints_do_not_fit_on_the_disk_is_warned_and_the_advice_fits(assets, tmp_path, small_disk,
                                                                                      capfd):
    argv = flags(assets, small_disk / "run", tmp_path / "cache", "--max_steps", 8, "--save_steps", 1,
                 "--validation_split_percentage", 0)
    full = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    warning = re.search(r"WARNING --output_dir \S+: the run will not fit: it needs about [\d.]+ MB more for its "
                        r"checkpoints \(8 of about [\d.]+ MB at the most\) and its final model, but the disk has "
                        r"[\d.]+ MB free; set --save_total_limit (\d+), free space, or choose another folder",
                        full.stderr)
    assert warning, full.stderr[-3000:]
    assert full.stderr.index("will not fit") < full.stderr.index("error: "), full.stderr[-3000:]
    # Warned, not refused: it trains until a save fails, then stops with one line and the last complete checkpoint.
    assert full.returncode == 1 and "free space or fix the folder, then rerun the same command: it resumes from " \
        "checkpoint-" in full.stderr
    # The advice fits: the rerun resumes, keeps only that many checkpoints before its first save, and finishes.
    log = finish(argv + ["--save_total_limit", warning.group(1)], capfd)
    assert "resumed from" in log and "will not fit" not in log and (small_disk / "run" / "model.safetensors").is_file()
    assert len(checkpoints.list_checkpoints(small_disk / "run")) == int(warning.group(1))


def test_the_last_step_is_saved_and_a_finished_run_reruns_without_training(assets, tmp_path, capfd):
    output = tmp_path / "run"
    argv = flags(assets, output, tmp_path / "cache", "--max_steps", 5, "--save_steps", 3)
    run_in_process(argv)
    assert [c.name for c in checkpoints.list_checkpoints(output)] == ["checkpoint-3", "checkpoint-5"]
    weights = (output / "model.safetensors").read_bytes()
    capfd.readouterr()
    run_in_process(argv)
    err = capfd.readouterr().err
    assert "checkpoint-5 at step 5" in err and "nothing left to train" in err
    assert logged_steps(output) == [1, 2, 3, 4, 5]  # no step trained or logged twice
    assert (output / "model.safetensors").read_bytes() == weights
    run_in_process(flags(assets, output, tmp_path / "cache", "--max_steps", 7, "--save_steps", 3))
    assert logged_steps(output) == [1, 2, 3, 4, 5, 6, 7]  # a longer run continues from the end


def test_resume_latest_needs_a_complete_checkpoint(assets, tmp_path):
    with pytest.raises(UsageError, match="latest: no complete checkpoint"):
        run_in_process(flags(assets, tmp_path / "empty", tmp_path / "cache", "--resume_from_checkpoint", "latest"))


def test_checkpoint_of_another_model_shape_is_refused_and_kept(assets, tmp_path):
    output = tmp_path / "run"
    run_in_process(flags(assets, output, tmp_path / "cache", "--max_steps", 2, "--save_steps", 2))
    saved = {p.name: p.read_bytes() for p in (output / "checkpoint-2").iterdir() if p.is_file()}
    with pytest.raises(UsageError) as raised:
        run_in_process(flags(assets, output, tmp_path / "cache", "--max_steps", 4,
                             "--config_overrides", "hidden_size=32"))
    message = str(raised.value)
    assert message.startswith(f"checkpoint {output / 'checkpoint-2'} does not fit this run (")
    assert "size mismatch" in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in (output / "checkpoint-2").iterdir() if p.is_file()} == saved


def test_out_of_memory_is_one_line_and_a_rerun_resumes(assets, tmp_path, monkeypatch):
    """A batch that does not fit (raised here in step 3's first micro-batch): one line with what to do, no work lost."""
    import torch

    build_model = train_loop.build_model

    def build_one_that_runs_out_of_memory(*args, **kwargs):
        model, calls = build_model(*args, **kwargs), []
        forward = model.forward

        def forward_until_step_3(*inputs, **named):
            calls.append(1)
            if len(calls) == 2 * 4 + 1:  # 4 micro-batches per step
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.27 GiB. GPU 0 has a total "
                                             "capacity of 79.19 GiB of which 1.02 GiB is free.")
            return forward(*inputs, **named)

        model.forward = forward_until_step_3
        return model

    output = tmp_path / "run"
    argv = flags(assets, output, tmp_path / "cache", "--max_steps", 5, "--save_steps", 2)
    monkeypatch.setattr(train_loop, "build_model", build_one_that_runs_out_of_memory)
    with pytest.raises(SystemExit) as exited:
        run_in_process(argv, entry="cli")
    assert exited.value.code == ("error: out of memory (CUDA out of memory. Tried to allocate 9.27 GiB); lower "
                                 "--per_device_train_batch_size (raise --gradient_accumulation_steps to keep the "
                                 "global batch), or add --gradient_checkpointing or --loss_chunk_size 4096, or shard "
                                 "with accelerate_configs/zero2.yaml; rerunning resumes from the last checkpoint")
    assert [c.name for c in checkpoints.list_checkpoints(output)] == ["checkpoint-2"]
    monkeypatch.undo()
    run_in_process(argv)
    assert logged_steps(output) == [1, 2, 3, 4, 5]


def test_resume_with_another_global_batch_continues_after_the_blocks_read(assets, tmp_path, capfd):
    output = tmp_path / "run"
    run_in_process(flags(assets, output, tmp_path / "cache", "--max_steps", 5, "--save_steps", 5))  # 5 x 8 blocks
    capfd.readouterr()
    run_in_process(flags(assets, output, tmp_path / "cache", "--max_steps", 8, "--gradient_accumulation_steps", 2))
    assert "global batch changed from 8 to 4 blocks: epoch 0 resumes at block 40 of its order (40 were read)" in \
        capfd.readouterr().err
    train, _ = read_metrics(output)
    blocks = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())["train_blocks"]
    # Epochs of 80 blocks before (87 cut to batches of 8), of 84 after: the logged epoch goes on from step 5's
    # 0.5 at the new length's rate, instead of falling back to 40 / 84 of an epoch.
    assert sorted(train) == list(range(1, 9)) and train[5]["epoch"] == 5 / (blocks // 8)
    assert train[6]["epoch"] == round(5 / (blocks // 8) + 1 / (blocks // 4), 4)


def test_resume_on_changed_data_starts_its_epoch_from_the_beginning(assets, tmp_path, capfd):
    output = tmp_path / "run"
    run_in_process(flags(assets, output, tmp_path / "cache", "--train_files", assets["small"], "--max_steps", 15,
                         "--save_steps", 15))  # 15 steps into an epoch of the small corpus
    capfd.readouterr()
    run_in_process(flags(assets, output, tmp_path / "cache", "--max_steps", 17))  # the tiny corpus: 10 steps/epoch
    assert "the data changed, so epoch 0 starts from its beginning" in capfd.readouterr().err
    train, _ = read_metrics(output)
    # The tiny corpus's epoch 0 starts afresh; the logged epoch goes on from step 15's, 0.1 per step of the tiny one.
    assert sorted(train) == list(range(1, 18))
    assert train[16]["epoch"] == round(train[15]["epoch"] + 0.1, 4) and train[17]["epoch"] == round(
        train[15]["epoch"] + 0.2, 4)


def test_a_data_position_past_the_new_epochs_end_rolls_over():
    saved = TrainState(epoch=2, step_in_epoch=43, global_batch_blocks=2, train_blocks=87)
    checkpoints.carry_data_position(saved, TrainState(global_batch_blocks=8, train_blocks=87))
    assert (saved.epoch, saved.step_in_epoch) == (3, 0)  # 86 blocks read; an epoch of 8-block batches has 80
    saved = TrainState(epoch=2, step_in_epoch=30, global_batch_blocks=2, train_blocks=87)
    checkpoints.carry_data_position(saved, TrainState(global_batch_blocks=8, train_blocks=87))
    assert (saved.epoch, saved.step_in_epoch) == (2, 7)  # 60 blocks read: 7 batches of 8, 4 blocks read again


def test_a_failed_save_is_one_line_and_leaves_the_previous_checkpoint(assets, tmp_path, monkeypatch):
    """The disk fills up while checkpoint-4 is written (raised here by torch.save): no half checkpoint remains."""
    import errno

    import torch

    save = torch.save

    def save_until_step_4(obj, path, *args, **kwargs):
        if "checkpoint-4.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path, *args, **kwargs)

    output = tmp_path / "run"
    argv = flags(assets, output, tmp_path / "cache", "--max_steps", 6, "--save_steps", 2)
    monkeypatch.setattr(torch, "save", save_until_step_4)
    with pytest.raises(SystemExit) as exited:
        run_in_process(argv, entry="cli")
    assert re.fullmatch(rf"error: --output_dir {output}: writing checkpoint-4.tmp failed \(\[Errno 28\] No space "
                        rf"left on device; the disk has [\d.]+ MB free\); free space or fix the folder, then rerun the "
                        rf"same command: it resumes from checkpoint-2", exited.value.code)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    monkeypatch.undo()
    run_in_process(argv)
    assert logged_steps(output) == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3-4 were not saved: redone from checkpoint-2


def rewrite_trainer_state(checkpoint, **changes):
    """Edit a checkpoint's trainer_state.json as another layout would have written it (manifest kept valid)."""
    state_path = checkpoint / "trainer_state.json"
    state_path.write_text(json.dumps({**json.loads(state_path.read_text()), **changes}))
    manifest = checkpoint / "manifest.json"
    sizes = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**sizes, "trainer_state.json": state_path.stat().st_size}))


@pytest.mark.slow
def test_checkpoint_of_another_layout_is_refused_in_one_line(assets, tmp_path):
    """A plain checkpoint under DeepSpeed, and a ZeRO-3 one under ZeRO-2 (both would fail deep inside the load)."""
    output = tmp_path / "run"
    argv = flags(assets, output, tmp_path / "cache", "--max_steps", 2, "--save_steps", 2)
    run_in_process(argv)
    expected = ["was written without DeepSpeed and this launch runs with it; resume with the accelerate config "
                "it was saved with", "holds ZeRO-3 shards and this launch runs ZeRO-2; resume with "
                                     "accelerate_configs/zero3.yaml"]
    for message in expected:
        result = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), *map(str, argv), "--max_steps", "4",
                                 "--deepspeed", str(ROOT / "ds_config_zero2.json")],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: checkpoint {output / 'checkpoint-2'} {message}; or start a new run with another --output_dir "
            f"(or --overwrite_output_dir, which deletes the checkpoints in {output})")
        rewrite_trainer_state(output / "checkpoint-2", distributed_type="DEEPSPEED", zero_stage=3)


@pytest.mark.slow
def test_a_zero_checkpoint_that_cannot_be_converted_is_one_line(assets, tmp_path):
    """A checkpoint that claims 8 ZeRO processes but holds no shards: the conversion for another world size fails
    in one line, and the checkpoint is left as it was."""
    output = tmp_path / "run"
    run_in_process(flags(assets, output, tmp_path / "cache", "--max_steps", 2, "--save_steps", 2))
    rewrite_trainer_state(output / "checkpoint-2", distributed_type="DEEPSPEED", num_processes=8)
    before = sorted(p.name for p in (output / "checkpoint-2").iterdir())
    result = subprocess.run([sys.executable, str(ROOT / "train_loop.py"),
                             *map(str, flags(assets, output, tmp_path / "cache", "--max_steps", 4, "--deepspeed",
                                             ROOT / "ds_config_zero2.json"))],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: checkpoint {output / 'checkpoint-2'}: the conversion to DeepSpeed's universal "
                        rf"format failed \(.+\); resume with the process count it was saved with",
                        result.stderr.strip().splitlines()[-1]), result.stderr[-2000:]
    assert sorted(p.name for p in (output / "checkpoint-2").iterdir() if p.name != "universal.failed") == before


def test_non_finite_loss_stops_without_overwriting_a_good_checkpoint(assets, tmp_path):
    """With --skip_bad_steps false (the behaviour before skipped steps, kept available): the first non-finite loss
    stops the run. With skipping on, tests/test_step_guard.py covers divergence."""
    from safetensors.torch import load_file

    output = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="non-finite loss") as raised:
        run_in_process(flags(assets, output, tmp_path / "cache", "--learning_rate", "1e6", "--warmup_steps", 0,
                             "--max_grad_norm", 0, "--save_steps", 1, "--logging_steps", 100, "--max_steps", 10,
                             "--skip_bad_steps", "false"))
    failed_at = int(str(raised.value).split(" at step ")[1].split(":")[0])
    saved = checkpoints.list_checkpoints(output)
    assert 1 <= len(saved) and int(saved[-1].name.split("-")[1]) == failed_at - 1 < 10
    for checkpoint in saved:  # every step until the failure was saved, and no weights are NaN or inf
        assert all(t.isfinite().all() for t in load_file(checkpoint / "model.safetensors").values())
    assert not (output / "model.safetensors").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_weight_that_is_not_finite_anywhere_stops_the_save(bad):
    """The check before every save: one bad value anywhere in any weight (here the last value of a large bf16
    matrix beside fp32 ones), or in the unlogged losses, is found; finite weights pass."""
    import types

    from pretrain.resilience.run_control import ensure_savable

    model = torch.nn.Sequential(torch.nn.LayerNorm(300), torch.nn.Linear(300, 4000).to(torch.bfloat16))
    accelerator = types.SimpleNamespace(reduce=lambda tensor, reduction: tensor)
    args = parse_args(["--output_dir", "unused"])[2]
    ensure_savable(accelerator, model, torch.zeros(2), 5, args)
    with pytest.raises(NonFiniteLoss, match="loss or weights"):
        ensure_savable(accelerator, model, torch.tensor([0.0, bad]), 5, args)
    with torch.no_grad():
        model[1].weight[-1, -1] = bad
    with pytest.raises(NonFiniteLoss, match="loss or weights"):
        ensure_savable(accelerator, model, torch.zeros(2), 5, args)


def test_resume_inside_a_later_epoch_keeps_that_epochs_order(assets, tmp_path):
    """Resuming from an explicit path at step 13 (3 steps into epoch 2) into a new output_dir replays epoch 2's
    shuffle, not epoch 1's."""
    straight = tmp_path / "straight"
    run_in_process(flags(assets, straight, tmp_path / "cache", "--max_steps", 16, "--save_steps", 13))
    resumed = tmp_path / "resumed"
    run_in_process(flags(assets, resumed, tmp_path / "cache", "--max_steps", 16,
                         "--resume_from_checkpoint", straight / "checkpoint-13"))
    expected, _ = read_metrics(straight)
    got, _ = read_metrics(resumed)
    assert sorted(got) == [14, 15, 16] and expected[13]["epoch"] == 1.3
    for step in got:
        assert got[step]["loss"] == expected[step]["loss"], step
