"""Throughput and MFU fields on a CPU run, the FLOPs count against a hand count, and --profile_dir."""

import json

import pytest
from conftest import read_metrics, run_in_process, tiny_flags
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pretrain.metrics import PEAK_TFLOPS, flops_per_token


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
