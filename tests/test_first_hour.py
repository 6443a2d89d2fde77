"""What a new user meets in the first hour: a tokenizer that encodes nothing, two runs in one folder, errors and
Ctrl-C under the launcher, a resume with another schedule (the README's debugging section after the quickstart is
run by tests/test_demo.py, in the quickstart's own checkout)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, LoggedProcess, assert_stopped_under_the_launcher, launch_command, launch_env, \
    launch_in_background, logged_steps, read_metrics, run_in_process, tiny_flags

from pretrain.checkpointing.output_lock import LOCK_FILE


def test_a_tokenizer_that_encodes_nothing_is_refused_before_any_work(assets, tmp_path):
    """transformers 5 builds an empty Qwen2Tokenizer from a folder holding only config.json, as --config_name
    without --tokenizer_name gives: every text encodes to [] and the run would train on EOS tokens alone."""
    argv = tiny_flags(assets, tmp_path / "run", tmp_path / "cache", "--max_steps", 2)
    argv = argv[:2] + argv[4:]  # no --tokenizer_name: the tokenizer comes from the config folder
    for split in ("5", "0"):
        with pytest.raises(SystemExit) as exited:
            run_in_process(argv + ["--validation_split_percentage", split], entry="cli")
        assert exited.value.code == (f"error: --tokenizer_name: the tokenizer loaded from {assets['config']} has a "
                                     f"vocabulary of 1, so it cannot encode text; pass --tokenizer_name with the "
                                     f"model's tokenizer (a folder with tokenizer.json, or a Hub name)")
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]  # nothing was tokenized
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_tokenizer_that_encodes_a_document_to_at_most_one_token_is_refused(assets, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(20)}  # every word is unknown: one <0> per document at most
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.Split("\n", "removed")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<1>", unk_token="<0>").save_pretrained(
        tmp_path / "tok")
    argv = tiny_flags(assets, tmp_path / "run", tmp_path / "cache", "--tokenizer_name", tmp_path / "tok")
    # Loaded as the Qwen2 model's class (as its saved folder would reload it), the word-level vocabulary has no
    # byte-level pieces at all: 0 tokens.
    with pytest.raises(SystemExit) as exited:
        run_in_process(argv, entry="cli")
    assert exited.value.code == (f"error: --tokenizer_name: the tokenizer loaded from {tmp_path / 'tok'} encodes the "
                                 f"first 32 documents of {assets['small']} to 0 tokens (at most one per document); "
                                 f"pass --tokenizer_name with the model's tokenizer")


@pytest.mark.slow
def test_a_second_run_in_the_same_output_dir_is_refused_and_the_first_is_unharmed(assets, tmp_path):
    output = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "train_loop.py"),
            *map(str, tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 100000, "--save_steps", 5))]
    first = LoggedProcess(argv, tmp_path / "first.log", env=dict(os.environ, PYTHONUNBUFFERED="1"))
    first.wait_until(lambda: (output / "metrics.jsonl").exists(), timeout=120)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert re.fullmatch(rf"error: --output_dir {output}: another run is using it \(pid {first.pid} on .+, started "
                        rf"[\d-]+ [\d:]+\); wait for it to end, or choose another --output_dir",
                        second.stderr.strip().splitlines()[-1]), second.stderr[-2000:]
    first.send_signal(signal.SIGTERM)  # it has run well past the second's start: stop it, as a user would
    assert first.wait(timeout=300) == 0, first.output()[-3000:]
    train, _ = read_metrics(output)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "loss" in record]
    assert len(steps) > 5 and steps == sorted(train) == list(range(1, len(steps) + 1))  # each step once, in order
    assert (output / f"checkpoint-{len(steps)}").is_dir()  # the first run's own save at its stop
    assert not (output / LOCK_FILE).exists()  # released at exit


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(assets, tmp_path, capfd):
    output = tmp_path / "run"
    output.mkdir()
    (output / LOCK_FILE).write_text(json.dumps({"host": "gone", "pid": 999999, "started": "2026-01-01 00:00:00"}))
    run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 2))
    assert "taking over the lock of a run that is gone (pid 999999 on gone, started 2026-01-01 00:00:00)" in \
        capfd.readouterr().err
    assert read_metrics(output)[0].keys() == {1, 2}


@pytest.mark.slow
def test_a_restart_waits_for_its_own_launchs_lock_and_another_launch_is_refused_at_once(tmp_path, monkeypatch):
    """Under --max_restarts a process forked by the attempt before (a DataLoader worker) may hold the lock a moment
    longer: the restart waits for it, without a warning. A lock of another launch is refused at once, restart or not."""
    from pretrain.base.errors import UsageError
    from pretrain.checkpointing.output_lock import _acquire, _release

    path = tmp_path / LOCK_FILE
    holder = """if True:
        import fcntl, json, os, socket, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-07 00:00:00",
                                  "launcher": int(sys.argv[2])}).encode(), 0)
        print("locked", flush=True)
        time.sleep(float(sys.argv[3]))"""
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    for launcher, holds_s in ((os.getppid(), 1.5), (os.getpid(), 30)):  # this process's launcher, then another's
        process = subprocess.Popen([sys.executable, "-c", holder, str(path), str(launcher), str(holds_s)],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "locked\n"
        start = time.monotonic()
        try:
            if launcher == os.getppid():
                _release(path, _acquire(path))
                assert time.monotonic() - start >= 1.0  # it waited for the attempt before to go away
            else:
                with pytest.raises(UsageError, match="another run is using it"):
                    _acquire(path)
                assert time.monotonic() - start < 1.0
        finally:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_a_bad_flag_under_the_launcher_prints_our_line_once_and_names_it_as_the_cause(assets, tmp_path):
    env = launch_env()
    argv = tiny_flags(assets, tmp_path / "run", tmp_path / "cache", "--max_steps", 0)
    result = subprocess.run(launch_command("zero2.yaml", 2, argv, ("--main_process_port", env["MASTER_PORT"])),
                            env=env, capture_output=True, text=True, timeout=300)
    line = "error: --max_steps or --num_train_epochs must be positive"
    assert result.returncode == 1
    assert result.stderr.splitlines().count(line) == 1, result.stderr[-3000:]
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    assert f"traceback : {line}" in root_cause and "To enable traceback" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_under_the_launcher_saves_and_shows_no_traceback_of_ours(assets, tmp_path):
    """Ctrl-C reaches every process of the terminal's group, and the launcher forwards it once more: the second
    SIGINT must not be taken for a user's second Ctrl-C. (A SIGTERM to the launcher alone, as Kubernetes sends it,
    is tests/test_distributed.py's preemption test.)"""
    output = tmp_path / "run"
    argv = tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 400, "--save_steps", 1000)
    process = launch_in_background("zero2.yaml", 2, argv, tmp_path / "launch.log", start_new_session=True)
    process.wait_until(lambda: len(logged_steps(output)) >= 3)  # mid-run, a few steps in
    os.killpg(process.pid, signal.SIGINT)
    out = process.output(timeout=120)
    assert_stopped_under_the_launcher(out, process, "SIGINT")
    assert "KeyboardInterrupt" not in out
    checkpoint = next(output.glob("checkpoint-*"))
    assert len(list(checkpoint.rglob("*optim_states.pt"))) == 2


def rate_of_step(before, after, config):
    """The learning rate that one AdamW step took between two checkpoints of one process, from the weights and the
    moments: each weight without decay (norms, biases) moved by lr * m_hat / (sqrt(v_hat) + eps); solved for lr."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    old, new = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    optimizer = torch.load(after / "optimizer.bin", weights_only=False)
    group = optimizer["param_groups"][1]  # pretrain.optim.optimizers.parameter_groups: the group without decay
    names = [name for name, parameter in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config))
             .named_parameters() if parameter.dim() < 2]
    (beta1, beta2), moved, direction = group["betas"], [], []
    assert group["weight_decay"] == 0 and len(names) == len(group["params"])
    for index, name in zip(group["params"], names):
        state = optimizer["state"][index]
        step = float(state["step"])
        m_hat, v_hat = state["exp_avg"] / (1 - beta1 ** step), state["exp_avg_sq"] / (1 - beta2 ** step)
        moved.append((old[name] - new[name]).flatten())
        direction.append((m_hat / (v_hat.sqrt() + group["eps"])).flatten())
    moved, direction = torch.cat(moved).double(), torch.cat(direction).double()
    return float((moved @ direction) / (direction @ direction))


def test_a_resume_trains_at_the_schedule_on_its_command_line(assets, tmp_path, capfd):
    """The demo case of a new rate on resume: 6 steps at 5e-3 (cosine, no warmup), then 1e-4, constant: step 7
    trains at 1e-4 (the checkpoint's schedule would have given 0, where its cosine ended), as the line says, the
    metrics log and the optimizer holds. Then a WSD cooldown from that checkpoint: continuous, down to its floor."""
    output = tmp_path / "run"
    argv = tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 6, "--save_steps", 3, "--learning_rate",
                      5e-3, "--warmup_steps", 0)
    run_in_process(argv)
    capfd.readouterr()
    constant = argv + ["--max_steps", "9", "--save_steps", "1", "--learning_rate", "1e-4", "--lr_scheduler_type",
                       "constant"]
    run_in_process(constant)
    changed = [line for line in capfd.readouterr().err.splitlines() if "schedule changed" in line]
    assert len(changed) == 1 and changed[0].endswith(
        "the learning-rate schedule changed since the checkpoint (lr_scheduler_type cosine -> constant, "
        "learning_rate 0.005 -> 0.0001, total_steps 6 -> 9): step 7 trains at 0.0001, this run's schedule at step 6 "
        "(the checkpoint's schedule gave 0)")
    train, _ = read_metrics(output)
    assert [train[step]["lr"] for step in (6, 7, 8, 9)] == [0, 1e-4, 1e-4, 1e-4]
    assert rate_of_step(output / "checkpoint-6", output / "checkpoint-7", assets["config"]) == pytest.approx(
        1e-4, rel=1e-3)
    groups = torch.load(output / "checkpoint-9" / "optimizer.bin", weights_only=False)["param_groups"]
    assert {(group["lr"], group["initial_lr"]) for group in groups} == {(1e-4, 1e-4)}

    cooldown = constant + ["--max_steps", "12", "--lr_scheduler_type", "wsd", "--decay_steps", "3", "--decay_type",
                           "linear", "--min_lr_ratio", "0.1"]
    run_in_process(cooldown)
    assert ("schedule changed since the checkpoint (lr_scheduler_type constant -> wsd, total_steps 9 -> 12, "
            "decay_steps 3 (new), decay_type linear (new), min_lr_ratio 0.1 (new)): step 10 trains at 0.0001, "
            "this run's schedule at step 9 (the checkpoint's schedule gave 0.0001)") in capfd.readouterr().err
    train, _ = read_metrics(output)
    for step, progress in ((10, 1 / 3), (11, 2 / 3), (12, 1)):
        assert train[step]["lr"] == pytest.approx(1e-4 * (0.1 + 0.9 * (1 - progress)), rel=1e-12), step
    run_in_process(cooldown)  # unchanged: nothing said, nothing left to train
    assert "schedule changed" not in capfd.readouterr().err


def test_help_shows_each_default_once_and_flag_prefixes_are_refused(assets, tmp_path, capsys):
    """`--help` of train_loop.py and of data_utils.py, and their errors, each called as its command line calls it."""
    import data_utils

    with pytest.raises(SystemExit) as exited:
        run_in_process(["--help"], entry="cli")
    help_text = capsys.readouterr().out
    assert exited.value.code == 0 and "(default: the model's or config's own)." in help_text
    assert "(default: None)" not in help_text and "(default: 8)" in help_text
    with pytest.raises(SystemExit) as exited:
        run_in_process(tiny_flags(assets, tmp_path / "run", tmp_path / "cache", "--max_steps", 4, "--max_step", 5),
                       entry="cli")
    assert exited.value.code == "error: unknown argument(s): --max_step 5; see python train_loop.py --help"
    with pytest.raises(SystemExit) as exited:
        data_utils.main(["--tokenizer_name", str(assets["tokenizer"]), "--train_files", str(assets["tiny"])])
    assert exited.value.code == ("error: --block_size is required: the tokens per training block; pass the "
                                 "training run's value, e.g. --block_size 2048")
    with pytest.raises(SystemExit) as exited:
        data_utils.main(["--help"])
    data_help = capsys.readouterr().out
    assert exited.value.code == 0 and "--block_size" in data_help and "dataloader" not in data_help


def test_a_warmup_as_long_as_the_run_is_said(assets, tmp_path, capfd):
    run_in_process(tiny_flags(assets, tmp_path / "run", tmp_path / "cache", "--max_steps", 4, "--warmup_steps", 200))
    assert "the warmup (200 steps) is as long as the run (4 steps): the learning rate never reaches --learning_rate" \
        in capfd.readouterr().err
    assert max(record["lr"] for record in read_metrics(tmp_path / "run")[0].values()) < 3e-3 * 4 / 200 + 1e-12


def test_the_demos_defaults_never_replace_a_flag_the_user_gave(tmp_path):
    """--warmup_steps 0 on the demo (the README's debugging line) means no warmup, though 0 is the usual default."""
    from pretrain.base.arguments import DEMO_DEFAULTS, parse_args

    _, data_args, args = parse_args(["--warmup_steps", "0", "--max_steps", "2"])
    assert args.warmup_steps == 0 and args.max_steps == 2
    _, data_args, args = parse_args([])
    assert args.warmup_steps == DEMO_DEFAULTS["warmup_steps"] and data_args.block_size == DEMO_DEFAULTS["block_size"]
    (tmp_path / "demo.yaml").write_text("weight_decay: 0.1\n")
    assert parse_args([str(tmp_path / "demo.yaml")])[2].weight_decay == 0.1


@pytest.mark.parametrize("name, text", [
    ("args.yaml", "config_name: a\nlearning_rate: 1e-3\nlearning_rate: 2e-3\n"),
    ("args.yaml", "config_name: a\ntrain_mixture:\n  web: {weight: 1, files: a.jsonl}\n"
                  "  web: {weight: 1, files: b.jsonl}\n"),
    ("args.json", '{"config_name": "a", "learning_rate": 1e-3, "learning_rate": 2e-3}'),
])
def test_a_key_given_twice_in_an_arguments_file_is_one_line(tmp_path, name, text):
    """YAML and JSON keep the last of two equal keys without a word: a mixture source would lose its files."""
    from pretrain.base.arguments import parse_args
    from pretrain.base.errors import UsageError

    (tmp_path / name).write_text(text)
    with pytest.raises(UsageError, match="is given twice; give each key once") as error:
        parse_args([str(tmp_path / name)])
    assert "\n" not in str(error.value)
