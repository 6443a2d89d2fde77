"""Throughput and MFU fields on a CPU run, the FLOPs count against a hand count, and --profile_dir."""

import json
import re
import statistics

import pytest
from conftest import ROOT, read_metrics, run_in_process, tiny_flags
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pretrain.telemetry.metrics import PEAK_TFLOPS, flops_per_token


def hand_count_flops_per_token(vocab, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, seq=64):
    """6 x (every parameter but the input embedding, plus the tied output projection) + 12 x L x H x S."""
    head_dim = hidden // heads
    attention = hidden * hidden + hidden + 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim) + hidden * hidden
    mlp = 3 * hidden * intermediate
    norms = 2 * hidden
    matmul_params = layers * (attention + mlp + norms) + hidden + vocab * hidden
    return 6 * matmul_params + 12 * layers * hidden * seq


def test_flops_per_token_matches_a_hand_count(assets):
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets["config"]))
    assert flops_per_token(model, 64) == hand_count_flops_per_token(model.config.vocab_size)
    untied = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets["config"], tie_word_embeddings=False))
    assert flops_per_token(untied, 64) == flops_per_token(model, 64)


def test_throughput_fields_are_present_and_sane(assets, tmp_path):
    output = tmp_path / "run"
    run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 8, "--logging_steps", 4,
                              "--peak_tflops", "0.5"))
    train, _ = read_metrics(output)
    flops = hand_count_flops_per_token(len(AutoTokenizer.from_pretrained(assets["tokenizer"])))
    for record in train.values():
        assert record["tokens_per_s"] > 0 and record["tokens_per_s_per_device"] == record["tokens_per_s"]
        assert record["step_time_s"] == pytest.approx(2 * 64 / record["tokens_per_s"], rel=1e-6)
        assert 0 <= record["data_wait_share"] < 0.5
        assert 0.05 < record["peak_mem_gb"] < 24
        assert record["mfu"] == pytest.approx(flops * record["tokens_per_s"] / 0.5e12, rel=1e-9)
        assert 0 < record["mfu"] < 1


def test_no_mfu_on_a_cpu_without_a_peak(assets, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the peak is looked up")
    output = tmp_path / "run"
    run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 2))
    assert all(record["mfu"] is None for record in read_metrics(output)[0].values())


def test_known_gpu_peaks_are_dense_figures():
    peaks = dict(PEAK_TFLOPS)
    assert peaks["A100"] == 312 and peaks["H100"] == 989 and peaks["H200"] == 989


def test_profile_dir_records_steps_6_to_8_without_changing_the_run(assets, tmp_path, capfd):
    losses = {}
    for name, extra in (("plain", []), ("profiled", ["--profile_dir", tmp_path / "profile"])):
        run_in_process(tiny_flags(assets, tmp_path / name, tmp_path / "cache", "--max_steps", 10, *extra))
        losses[name] = [record["loss"] for record in read_metrics(tmp_path / name)[0].values()]
    assert losses["profiled"] == losses["plain"] and len(losses["plain"]) == 10
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    steps = sorted({e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#5", "ProfilerStep#6", "ProfilerStep#7"]  # counted from 0: optimizer steps 6-8
    table = (tmp_path / "profile" / "top_ops_rank0.txt").read_text()
    assert "aten::mm" in table and "AdamW" in table
    capfd.readouterr()
    run_in_process(tiny_flags(assets, tmp_path / "short", tmp_path / "cache", "--max_steps", 3,
                              "--profile_dir", tmp_path / "short_profile"))
    assert "--profile_dir: fewer than 8 steps ran in this launch" in capfd.readouterr().err
    assert not (tmp_path / "short_profile").exists()


def test_flops_per_token_matches_a_flop_counter_and_leaves_out_the_recompute(assets):
    """MFU counts model FLOPs: torch's FLOP counter over one forward and backward agrees with flops_per_token
    (matmuls only: norms, biases and the softmax are not counted, a fraction of a percent at this width), also for a
    model with gradient checkpointing, whose recomputed forward the counter does see."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = AutoConfig.from_pretrained(assets["config"], hidden_size=256, intermediate_size=512,
                                        attn_implementation="eager")
    seq = 64
    input_ids = torch.randint(0, config.vocab_size, (2, seq))
    counted = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        model.train()
        with FlopCounterMode(display=False) as counter:
            model(input_ids=input_ids, labels=input_ids).loss.backward()
        counted[checkpointing] = counter.get_total_flops() / input_ids.numel()
    assert counted[True] > 1.2 * counted[False]  # the recomputed forward is real work...
    assert flops_per_token(model, seq) == pytest.approx(counted[False], rel=0.02)  # ...left out of MFU


@pytest.mark.slow
def test_evaluations_and_saves_are_not_charged_to_the_training_windows(assets, tmp_path):
    """tokens/s of the window after an evaluation and a save is that of the windows around it; the time set aside
    shows as eval_s and save_s, and the steps' time plus what was set aside adds up to the wall clock."""
    output = tmp_path / "run"
    run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 80, "--logging_steps", 10,
                              "--eval_steps", 20, "--save_steps", 20, "--validation_split_percentage", 30,
                              "--max_eval_samples", 200, "--per_device_eval_batch_size", 1,
                              "--per_device_train_batch_size", 8))
    train, evals = read_metrics(output)
    assert [e["step"] for e in evals] == [20, 40, 60, 80]
    after_aside = [train[step] for step in (30, 50, 70)]  # each follows an evaluation and a save
    others = [train[step] for step in (20, 40, 60, 80)]  # nothing set aside in them
    assert all(record["eval_s"] > 0 and record["save_s"] > 0 for record in after_aside)
    assert all(record["eval_s"] == 0 and record["save_s"] == 0 for record in others)
    steps_time = statistics.median(10 * r["step_time_s"] for r in after_aside)
    assert statistics.median(r["eval_s"] for r in after_aside) > steps_time, "the evaluation must outlast the " \
        "window's steps, or this test shows nothing"
    ratio = statistics.median(r["tokens_per_s"] for r in after_aside) / statistics.median(
        r["tokens_per_s"] for r in others)
    assert 0.8 < ratio < 1.25, ratio
    accounted = sum(10 * r["step_time_s"] + r["eval_s"] + r["save_s"] for r in train.values() if r["step"] % 10 == 0)
    assert accounted == pytest.approx(train[80]["elapsed_s"], rel=0.02)  # and the wall clock is all accounted for


def test_the_default_evaluation_is_4_percent_of_training_and_long_ones_show_progress(assets, tmp_path, monkeypatch,
                                                                                    capfd):
    from pretrain.base.arguments import TrainArguments
    from pretrain.evaluation import heldout

    # 0.12 x the 50 x 16 blocks trained between two evaluations: 96 of the 1000 (bench/eval_cost.py: 4.3 %).
    assert heldout.eval_blocks(TrainArguments(eval_steps=50), 1000, 16, 100, 2) == 96
    assert heldout.eval_blocks(TrainArguments(eval_steps=10), 1000, 16, 100, 2) == 32  # never fewer than 32
    assert heldout.eval_blocks(TrainArguments(eval_steps=10, max_eval_samples=7), 1000, 16, 100, 2) == 7
    assert heldout.eval_blocks(TrainArguments(eval_strategy="epoch"), 1000, 16, 100, 2) == 192
    assert heldout.eval_blocks(TrainArguments(save_steps=500), 278, 16, 100, 2) == 278  # all there is
    monkeypatch.setattr(heldout, "EVAL_PROGRESS_AFTER_S", 0.0)
    capfd.readouterr()
    run_in_process(tiny_flags(assets, tmp_path / "run", tmp_path / "cache", "--max_steps", 2, "--eval_steps", 2,
                              "--validation_split_percentage", 30))
    err = capfd.readouterr().err
    assert re.search(r"evaluation: 32 of \d+ held-out blocks each time \(the default", err), err[-2000:]
    assert "evaluating: batch 1 of 4" in err and "evaluated 4 batches in" in err


def test_bf16_on_a_cpu_that_emulates_it_is_warned_even_on_a_busy_machine():
    """oneDNN capped at AVX2 has no native bf16, as on the CPUs that lack AVX-512 BF16 and AMX. The decision is what
    oneDNN reports, not a timing: it holds while a CPU-bound process runs beside it."""
    import os
    import subprocess
    import sys

    probe = ("from pretrain.base.arguments import TrainArguments; "
             "from pretrain.distributed.launch import configure_logging, warn_if_precision_is_emulated; "
             "configure_logging(True); "
             "warn_if_precision_is_emulated(TrainArguments(bf16=True))")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2"), cwd=ROOT)
    finally:
        busy.kill()
    assert "--bf16: oneDNN reports no native bf16 on this CPU (it needs AVX-512 BF16 or AMX), so bf16 matmuls are " \
           "emulated, about 40-80x slower than fp32 (bench/bf16_emulation.py); drop --bf16" in result.stderr, \
        (result.returncode, result.stdout[-2000:], result.stderr[-2000:])


def test_bf16_on_a_cpu_with_native_bf16_is_not_warned_about(monkeypatch, caplog):
    from pretrain.base.arguments import TrainArguments
    from pretrain.distributed import launch

    monkeypatch.setattr(launch, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING"):
        launch.warn_if_precision_is_emulated(TrainArguments(bf16=True))
    assert "--bf16" not in caplog.text


def test_a_stop_request_is_acknowledged_at_once(caplog):
    import os
    import signal

    from pretrain.resilience.run_control import StopRequest

    stop = StopRequest(1, is_main_process=True)
    try:
        stop.last_step = 6
        with caplog.at_level("WARNING"):
            os.kill(os.getpid(), signal.SIGTERM)
        assert "SIGTERM: stopping after step 7; saving a checkpoint then" in caplog.text
        assert stop.agreed()
    finally:
        stop.restore()


def test_a_step_longer_than_the_launchers_grace_is_warned_about_once(monkeypatch, caplog):
    from pretrain.base.arguments import TrainArguments
    from pretrain.resilience.run_control import RunControl

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")
    with caplog.at_level("WARNING"), RunControl(TrainArguments(), 1, 0, 0) as control:
        control.warn_if_a_stop_cannot_save(82.0)
        control.warn_if_a_stop_cannot_save(90.0)
    assert caplog.text.count("a step takes 82 s, longer than the 30 s the launcher gives workers after a signal") == 1
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=328" in caplog.text
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with RunControl(TrainArguments(), 1, 0, 0) as control:
        assert control.grace_s is None  # python train_loop.py: no launcher, no grace period


def test_a_rank_slow_for_two_records_is_named_once_per_episode_and_noise_never(caplog):
    """The verdict on the gathered per-rank rows (step time, data wait, forward: seconds per step), four ranks."""
    from pretrain.telemetry.stragglers import Stragglers

    named = []
    stragglers = Stragglers(4, True, named.append)

    def record(step, forward, data=(0.001,) * 4):
        stragglers.rows = [[0.5, wait, seconds] for wait, seconds in zip(data, forward)]
        return stragglers.fields(step)

    fields = record(1, (0.010, 0.300, 0.012, 0.011))  # the launch's first record is not judged
    assert fields["straggler/forward_slowest_rank"] == 1 and fields["straggler/forward_slowest_s"] == 0.3
    assert fields["straggler/forward_fastest_rank"] == 0 and fields["straggler/data_wait_fastest_s"] == 0.001
    for step in (2, 3):  # 5x, but 44 ms: the noise of tiny steps, under the floor
        record(step, (0.010, 0.055, 0.012, 0.011))
    for step in (4, 5):  # 1.15x and 60 ms: under the ratio
        record(step, (0.400, 0.400, 0.460, 0.400))
    assert named == []
    for step in range(6, 10):  # rank 2 at 1.6x and 60 ms more, for four records: named once, at the second
        record(step, (0.100, 0.100, 0.160, 0.101))
    record(10, (0.100, 0.100, 0.100, 0.101))  # recovered: a new episode may be named again
    record(11, (0.100, 0.100, 0.160, 0.101))
    record(12, (0.100, 0.100, 0.100, 0.101), data=(0.101, 0.001, 0.002, 0.001))  # rank 0 waits for its data
    record(13, (0.100, 0.100, 0.100, 0.101), data=(0.101, 0.001, 0.002, 0.001))
    assert [(r["step"], r["straggler/rank"], r["straggler/slow_in"]) for r in named] == [(7, 2, "compute"),
                                                                                          (13, 0, "data")]
    assert named[0]["straggler/own_s"] == 0.161 and named[0]["straggler/peers_s"] == 0.101
    assert [line for line in caplog.messages if line.startswith("straggler:")] == [
        "straggler: rank 2 is slow in compute: 0.161 s per step on its own (data wait + forward) against 0.101 s for "
        "the median of the other ranks, 1.6x, over the last 2 records to step 7; every rank waits for it "
        "(docs/resilience.md#stragglers)",
        "straggler: rank 0 is slow in reading data: 0.201 s per step on its own (data wait + forward) against 0.102 s "
        "for the median of the other ranks, 2.0x, over the last 2 records to step 13; every rank waits for it "
        "(docs/resilience.md#stragglers)"]


def test_slow_data_delays_the_reads_of_its_steps_on_its_rank_only(monkeypatch):
    import time

    from pretrain.base.faults import SLOW_S, FaultInjector
    from pretrain.base.state import TrainState

    monkeypatch.setenv("PRETRAIN_FAULT", "slow_data@step=2@rank=1")
    batches = iter(range(3))
    assert FaultInjector(None, rank=0).slow_reads(batches, TrainState()) is batches  # nothing to delay there
    state = TrainState(global_batch_blocks=1, train_blocks=10)
    reads = FaultInjector(None, rank=1).slow_reads(iter(range(3)), state)
    seconds = []
    for step in range(3):
        state.step = step  # the read of step `step + 1`
        begin = time.perf_counter()
        next(reads)
        seconds.append(time.perf_counter() - begin)
    assert seconds[1] >= SLOW_S and seconds[0] < SLOW_S / 2 and seconds[2] < SLOW_S / 2
