"""The watchdog (pretrain/resilience/watchdog.py): a hung rank ends the run with every rank's stack in a file and one
line; evaluations and saves longer than the limit are no hang; a frozen rank is found by its missing heartbeats. A lost
node is tests/test_distributed.py's two-node test."""

import re
import time

import psutil
import pytest
from conftest import kill_tree, launch_in_background, logged_steps, processes_of, read_metrics, tiny_flags

from pretrain.base.errors import UsageError
from pretrain.base.faults import parse_faults


def test_a_fault_can_be_limited_to_one_rank_and_one_attempt(monkeypatch):
    assert [f.kind for f in parse_faults("hang@step=3@rank=1,spike@step=5", rank=1)] == ["hang", "spike"]
    assert [f.kind for f in parse_faults("hang@step=3@rank=1,spike@step=5", rank=0)] == ["spike"]
    with pytest.raises(UsageError, match="optionally followed by @rank=R and @attempt=A"):
        parse_faults("hang@step=3@rank=x", rank=0)
    faults = "kill@step=3@rank=1@attempt=0,hang@step=4@attempt=1,spike@step=5"
    assert [f.kind for f in parse_faults(faults, rank=1)] == ["kill", "spike"]  # outside torch elastic: attempt 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torch elastic's first restart
    assert [f.kind for f in parse_faults(faults, rank=1)] == ["hang", "spike"]


def test_a_restart_that_not_every_process_comes_back_to_ends_in_a_line(monkeypatch, capsys):
    """The roll call of a restart, on the keys of its attempt in a real store: a node gone for good ends the restart
    after the limit with one line, instead of a wait in the process group until --ddp_timeout."""
    from datetime import timedelta

    import torch.distributed as dist
    from conftest import free_port

    from pretrain.distributed.restarts import attempt_store, roll_call

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "1",
                        "TORCHELASTIC_MAX_RESTARTS": "2"}.items():
        monkeypatch.setenv(name, value)
    for name in ("TORCHELASTIC_ERROR_FILE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    server.add("pretrain/attempt-0/back", 2)  # the roll of the attempt before does not count
    with pytest.raises(SystemExit):
        roll_call(attempt_store(timedelta(seconds=5)), world_size=2, limit_s=1)
    assert capsys.readouterr().err.strip() == (
        "error: restart 1: 1 of 2 processes came back within 1 s; the others' node is gone or cannot restart them: "
        "the launcher restarts every worker to resume (restart 2 of 2, --max_restarts)")
    server.add("pretrain/attempt-1/back", 1)  # one more process came back: now the roll is complete
    roll_call(attempt_store(timedelta(seconds=5)), world_size=3, limit_s=1)


@pytest.mark.slow
def test_a_hung_rank_leaves_every_ranks_stack_and_one_line_and_long_evaluations_are_no_hang(assets, tmp_path):
    """The hang comes back at every attempt of a launch with --max_restarts 1: the restart resumes from checkpoint-9,
    hangs again at step 11, and the job ends after its one restart with one last line, exit 1, nothing left running."""
    output = tmp_path / "run"
    argv = tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 40, "--eval_steps", 3, "--save_steps", 3,
                      "--hang_timeout", 1, "--validation_files", assets["corpus"], "--max_eval_samples", 1000,
                      "--per_device_eval_batch_size", 1)
    process = launch_in_background("zero2.yaml", 2, argv, tmp_path / "launch.log",
                                   extra_env={"PRETRAIN_FAULT": "hang@step=11@rank=1"},
                                   extra_launch=("--max_restarts", "1"))
    try:
        out = process.output(timeout=300)
    finally:
        kill_tree(process)
    assert process.returncode == 1 and not processes_of(output), out[-3000:]
    pattern = (r"^error: no optimizer step finished for ([\d.]+) s after step 10 \(limit ([\d.]+) s, --hang_timeout\): "
               r"every rank's Python stack is in (\S+)/hang-rank\{0\.\.1\}\.txt; the newest complete checkpoint is "
               r"(\S+)/checkpoint-9: (.+)$")
    lines = re.findall(pattern, out, re.M)
    assert [what_follows for *_, what_follows in lines] == [
        "the launcher restarts every worker to resume (restart 1 of 1, --max_restarts)",
        "that was the last of 2 attempts (--max_restarts 1): rerun every node's command to resume once the cause is "
        "fixed"], out[-3000:]
    assert re.search(rf"WARNING restart 1 of 1 \(--max_restarts\): the last attempt ended \(no optimizer step finished "
                     rf"for [\d.]+ s after step 10 .+\); resumed from {output}/checkpoint-9 at step 9$", out, re.M)
    assert out.rstrip().splitlines()[-1].startswith("===") and "last of 2 attempts" in out.split("Root Cause")[1]
    waited, limit, folder, *_ = lines[-1]
    assert folder == str(output) and float(waited) >= float(limit) >= 1
    asleep, waiting = (output / "hang-rank1.txt").read_text(), (output / "hang-rank0.txt").read_text()
    assert 'faults.py", line' in asleep and "in loss" in asleep  # where the hung rank sleeps
    assert "in all_reduce" in waiting and "in train" in waiting  # where the other waits for it
    assert "Traceback" not in out.split("error: no optimizer step")[0]

    # No false alarm before the hang: an evaluation and a save every 3 steps, the evaluations longer than the limit.
    train, evals = read_metrics(output)
    assert sorted(train) == list(range(1, 11)) and [e["step"] for e in evals] == [3, 6, 9]
    assert max(record["eval_s"] for record in train.values()) > float(limit), "the evaluations must outlast the " \
        "limit, or this test shows nothing"


@pytest.mark.slow
def test_a_frozen_rank_is_found_by_its_missing_heartbeats(assets, tmp_path):
    """SIGSTOP one worker mid-run: its connections stay open, so the collective that waits for it neither fails nor
    ends, as under NCCL; its heartbeats stop, and the run ends with the lost-rank line after --heartbeat_timeout."""
    output = tmp_path / "run"
    argv = tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 400, "--save_steps", 5,
                      "--heartbeat_timeout", 5)
    process = launch_in_background("zero2.yaml", 2, argv, tmp_path / "launch.log")
    try:
        process.wait_until(lambda: len(logged_steps(output)) >= 6)
        worker = next(child for child in psutil.Process(process.pid).children(recursive=True)
                      if "train_loop.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == "1")
        worker.suspend()
        frozen_at = time.monotonic()
        line = re.compile(r"^error: rank 1 \(node 0\) went away at step (\d+); the newest complete checkpoint is "
                          r"(\S+)/checkpoint-(\d+): rerun every node's command to resume$", re.M)
        process.wait_until(lambda: line.search(process.output()), timeout=60)
        waited = time.monotonic() - frozen_at
    finally:
        kill_tree(process)
    step, folder, saved = line.search(process.output()).groups()
    assert 5 <= waited < 30 and folder == str(output) and int(saved) % 5 == 0 and 5 <= int(saved) < int(step)


@pytest.mark.parametrize("attempt", [0, 1])
def test_the_first_step_after_a_restart_is_watched_with_a_grace(attempt, tmp_path, monkeypatch):
    """A first attempt's first step is not watched (it holds the data build and the compilation); a restart's is,
    from the loop's start, with FIRST_STEP_AFTER_A_RESTART_S more: a fault that comes back in that step ends the
    attempt instead of holding it until --ddp_timeout."""
    from pretrain.base.arguments import TrainArguments
    from pretrain.resilience import watchdog

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
    monkeypatch.setattr(watchdog, "FIRST_STEP_AFTER_A_RESTART_S", 0.5)
    ended = []
    monkeypatch.setattr(watchdog.Watchdog, "_end", lambda self, what, hang=False: (ended.append(what), self.stop()))
    dog = watchdog.Watchdog(TrainArguments(output_dir=str(tmp_path), hang_timeout=0.5), 0, 1, 0)
    try:
        time.sleep(2.5)  # two beats past the limit of 0.5 s + 0.5 s
    finally:
        dog.stop()
    if attempt == 0:
        assert ended == []
    else:
        assert len(ended) == 1 and re.match(r"no optimizer step finished for [\d.]+ s since the restarted loop began "
                                            r"\(limit 1\.0 s, --hang_timeout\)", ended[0]), ended
