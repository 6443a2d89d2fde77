"""train_loop on one process: a real tiny run, the schedule, accumulation, the chapter's flags, bad arguments."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cosine_lr, data_stats, read_metrics, run_in_process, tiny_flags

from pretrain.base.arguments import parse_args
from pretrain.base.errors import DataError, UsageError

METRIC_KEYS = {"step", "epoch", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "elapsed_s"}


@pytest.fixture(scope="module")
def tiny_run(assets, tmp_path_factory):
    output = tmp_path_factory.mktemp("tiny_run")
    run_in_process(tiny_flags(assets, output, output.parent / "cache", "--max_steps", 40, "--eval_steps", 20,
                              "--validation_split_percentage", 10, "--per_device_eval_batch_size", 3))
    run_in_process(tiny_flags(assets, output.parent / "capped", output.parent / "cache", "--max_steps", 40,
                              "--eval_steps", 20, "--validation_split_percentage", 10, "--max_eval_samples", 5))
    return output


def test_loss_falls_and_metrics_have_the_schema(tiny_run):
    train, evals = read_metrics(tiny_run)
    assert sorted(train) == list(range(1, 41))
    for record in train.values():
        assert METRIC_KEYS <= record.keys()
        assert record["tokens_seen"] == record["step"] * 2 * 64
    assert train[40]["loss"] < train[1]["loss"] - 1.0
    assert [e["step"] for e in evals] == [20, 40]
    for record in evals:
        assert {"step", "eval_loss", "perplexity"} <= record.keys()
        assert record["perplexity"] == pytest.approx(math.exp(record["eval_loss"]))
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    capped_train, capped_evals = read_metrics(tiny_run.parent / "capped")
    assert capped_train[40]["loss"] == train[40]["loss"]  # the same run, evaluated on fewer blocks
    assert capped_evals[-1]["eval_loss"] != evals[-1]["eval_loss"]


def test_lr_follows_the_schedule_formula(tiny_run):
    train, _ = read_metrics(tiny_run)
    for step, record in train.items():
        assert record["lr"] == pytest.approx(cosine_lr(step, 3e-3, 3, 40), abs=1e-12), step


def test_final_model_reloads_and_matches_last_eval(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import data_utils
    from pretrain.evaluation import heldout

    config = json.loads((tiny_run / "run_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    data_args = data_utils.DataArguments(**config["data"])
    validation = np.asarray(data_utils.prepare_data(data_args, tokenizer, seed=42).validation)
    validation = validation[:heldout.MIN_EVAL_BLOCKS]  # evaluated every 20 steps of 2 blocks: the default floor
    model = AutoModelForCausalLM.from_pretrained(tiny_run).eval()
    with torch.no_grad():
        ids = torch.from_numpy(validation.astype(np.int64))
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:]).item()
    _, evals = read_metrics(tiny_run)
    assert loss == pytest.approx(evals[-1]["eval_loss"], abs=1e-4)
    generated = model.generate(ids[:1, :8], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 13)


def test_the_final_model_stores_a_tied_weight_once_like_save_pretrained(tiny_run, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    stored = tiny_run / "model.safetensors"
    with safe_open(stored, "pt") as tensors:
        assert "lm_head.weight" not in tensors.keys() and "model.embed_tokens.weight" in tensors.keys()
    model = AutoModelForCausalLM.from_pretrained(tiny_run)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied back on load
    model.save_pretrained(tmp_path / "plain")
    assert stored.stat().st_size <= (tmp_path / "plain" / "model.safetensors").stat().st_size


def test_continued_pretraining_starts_from_the_saved_weights(assets, tiny_run, tmp_path):
    """--model_name_or_path on a saved model (its own tokenizer): training resumes the learned model, not a new one."""
    output = tmp_path / "continued"
    argv = tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 3, "--eval_steps", 3,
                      "--validation_split_percentage", 10)
    argv[:4] = ["--model_name_or_path", str(tiny_run)]  # instead of --config_name and --tokenizer_name
    run_in_process(argv)
    first_run, first_evals = read_metrics(tiny_run)
    continued, continued_evals = read_metrics(output)
    assert continued[1]["loss"] < first_run[1]["loss"] - 1.0
    assert continued[1]["loss"] == pytest.approx(first_run[40]["loss"], abs=0.3)
    assert continued_evals[-1]["eval_loss"] < first_evals[-1]["eval_loss"] + 0.1
    assert json.loads((output / "config.json").read_text())["hidden_size"] == 64


def test_gradient_accumulation_is_equivalent(assets, tmp_path):
    """Micro-batch 2 x GA 4 and micro-batch 8 x GA 1 see the same blocks and give the same losses (fp32)."""
    losses = {}
    for micro, accumulation in ((2, 4), (8, 1)):
        output = tmp_path / f"mb{micro}"
        run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 6,
                                  "--per_device_train_batch_size", micro,
                                  "--gradient_accumulation_steps", accumulation))
        losses[micro] = [record["loss"] for record in read_metrics(output)[0].values()]
    np.testing.assert_allclose(losses[2], losses[8], rtol=0, atol=1e-5)
    assert len(losses[2]) == 6


@pytest.mark.slow
def test_chapter_pretrain_sh_flags_parse_and_run(assets, tmp_path):
    """pretrain.sh's flags with tiny local paths and sizes, its DeepSpeed config (AdamW + WarmupLR) included."""
    ds_config = tmp_path / "chapter_ds_config.json"
    ds_config.write_text(json.dumps({
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
        "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}))
    output = tmp_path / "pretrain"
    flags = ["--config_name", assets["config"], "--tokenizer_name", assets["tokenizer"],
             "--train_files", assets["small"], "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2,
             "--do_train", "--output_dir", output, "--evaluation_strategy", "no", "--learning_rate", "1e-3",
             "--num_train_epochs", 1, "--warmup_steps", 5, "--logging_dir", output / "logs",
             "--logging_strategy", "steps", "--logging_steps", 5, "--save_strategy", "steps", "--save_steps", 20,
             "--preprocessing_num_workers", 2, "--save_total_limit", 1, "--seed", 12, "--block_size", 64, "--bf16",
             "--gradient_checkpointing", "--deepspeed", ds_config, "--report_to", "swanlab",
             "--data_cache_dir", tmp_path / "cache", "--local_rank=0"]
    result = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), *map(str, flags)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=400, env=_env_without_swanlab_key())
    assert result.returncode == 0, result.stderr[-4000:]
    assert "WarmupLR warms up and then never decays" in result.stderr
    train, evals = read_metrics(output)
    assert evals == [] and len(train) >= 5
    last = max(train)
    assert train[last]["lr"] == pytest.approx(1e-3)  # WarmupLR: flat after warmup, as warned
    assert (output / "model.safetensors").is_file() and (output / "logs").is_dir()
    assert last > 40  # checkpoints at 20, 40 and the last step were written; --save_total_limit 1 kept the last
    assert [p.name for p in output.glob("checkpoint-*")] == [f"checkpoint-{last}"]
    # --bf16 reached DeepSpeed through "bf16": {"enabled": "auto"}: its optimizer shards are the bf16 kind
    assert list(output.glob("checkpoint-*/pytorch_model/bf16_zero_pp_rank_0_*optim_states.pt"))


def _env_without_swanlab_key():
    import os

    env = {k: v for k, v in os.environ.items() if k != "SWANLAB_API_KEY"}
    env.update(SWANLAB_INTERACTIVE="false", PYTHONUNBUFFERED="1")
    return env


def test_arguments_from_a_yaml_file(assets, tmp_path):
    flags = tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--max_steps", 2)
    values = {}
    for key, value in zip(flags[::2], flags[1::2]):
        values[key.lstrip("-")] = [value] if key == "--train_files" else value
    path = tmp_path / "args.yaml"
    import yaml

    path.write_text(yaml.safe_dump(values))
    model_args, data_args, args = parse_args([str(path)])
    assert args.max_steps == 2 and data_args.block_size == 64 and model_args.config_name == str(assets["config"])
    path.write_text(yaml.safe_dump({**values, "not_a_flag": 1}))
    with pytest.raises(UsageError, match="not_a_flag"):
        parse_args([str(path)])


# ---------------------------------------------------------------------------------------------------------------------
# Bad arguments: one line naming the flag
# ---------------------------------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["--no_such_flag", "1"], "unknown argument(s): --no_such_flag"),
    (["--report_to", "mlflow"], "--report_to mlflow: not a tracker this loop supports; use swanlab, tensorboard"),
    (["--lr_scheduler_kwargs", "[1]"], "--lr_scheduler_kwargs must be a JSON object"),
    (["--bf16", "--fp16"], "--bf16 and --fp16"),
    (["--model_name_or_path", "x", "--config_name", "y"], "--model_name_or_path and --config_name"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--max_steps", "0"], "--max_steps or --num_train_epochs"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--lr_scheduler_type", "sawtooth"], "sawtooth"),
    (["--lr_scheduler_kwargs", "{oops"], "--lr_scheduler_kwargs"),
    (["--config_overrides", "hidden_size"], "--config_overrides"),
    (["--config_overrides", "no_such_field=3"], "no_such_field"),
    (["--deepspeed", "missing.json"], "--deepspeed missing.json"),
    (["--block_size", "4096"], "--block_size 4096 exceeds the model's max_position_embeddings (256)"),
    (["--config_overrides", "vocab_size=100"], "but the model's vocab_size is 100"),
    (["--resume_from_checkpoint", "nowhere/checkpoint-3"], "--resume_from_checkpoint nowhere/checkpoint-3"),
    (["--eval_strategy", "sometimes"], "sometimes"),
    (["--loss_chunk_size", "-1"], "--loss_chunk_size must be >= 0"),
    (["--hang_timeout", "-1"], "--hang_timeout and --heartbeat_timeout must be >= 0"),
    (["--attn_implementation", "no_such_kernel"], "--attn_implementation no_such_kernel: "),
    (["--config_overrides", "hidden_size=abc"], "--config_overrides hidden_size=abc: "),
    (["--fp16", "--torch_dtype", "float16"], "--torch_dtype float16 with --fp16: fp16 weights cannot be loss-scaled"),
    (["--config_overrides", "num_attention_heads=5"], "num_attention_heads (5) must be a multiple of "
                                                      "num_key_value_heads (2)"),
    (["--lr_scheduler_type", "linear", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'],
     "--lr_scheduler_type linear / --lr_scheduler_kwargs: "),
    (["--lr_scheduler_type", "wsd", "--decay_steps", "2"],
     "--decay_steps 2: the decay and the warmup (3 steps) do not fit in the run's 1 steps"),
    (["--eval_tasks", "mc_test.csv"], "--eval_tasks mc_test.csv: expected NAME=TEST_FILE or NAME=TEST_FILE,DEV_FILE"),
]


@pytest.mark.parametrize("extra,expected", BAD_ARGUMENTS, ids=[b[1][:30] for b in BAD_ARGUMENTS])
def test_bad_argument_gets_one_line(assets, tmp_path, extra, expected):
    """Before the data build: no data cache was written (the model's errors, its attention kernel and its
    vocabulary, came after the build before)."""
    with pytest.raises(UsageError) as raised:
        run_in_process(tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--max_steps", 1, *extra))
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "cache").exists()


def test_the_config_overrides_example_of_the_docs_trains(assets, tmp_path):
    """docs/flags.md's --config_overrides example on a config of 2 layers: the per-layer layer_types is derived
    afresh for the new layer count, as Qwen2Config's own __init__ derives it (it was an IndexError in the model)."""
    example = re.search(r'--config_overrides "([^"]+)"', (ROOT / "docs" / "flags.md").read_text()).group(1)
    overrides = dict(item.split("=") for item in example.split(","))
    assert "num_hidden_layers" in overrides
    run_in_process(tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--max_steps", 1,
                              "--config_overrides", example))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {key: str(config[key]) for key in overrides} == overrides
    assert config["layer_types"] == ["full_attention"] * int(overrides["num_hidden_layers"])


def test_unusable_files_and_folders_are_refused_before_any_work(assets, tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    broken_json = tmp_path / "ds_config.json"
    broken_json.write_text('{"zero_optimization": ')
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    bad_rows = tmp_path / "mc_test.csv"
    bad_rows.write_text("question,A,B,answer\nWhich?,x,y,B\nWhich?,x,y,E\n")
    cases = [
        (["--output_dir", foreign], f"--output_dir {foreign} holds other files (notes.txt) and no checkpoint"),
        (["--eval_tasks", f"mc={bad_rows}"], f"{bad_rows}: row 3: answer 'E' is not one of the choices"),
        (["--output_dir", a_file / "out"], f"--output_dir {a_file / 'out'}: cannot write there"),
        (["--report_to", "swanlab", "--swanlab_mode", "offline", "--logging_dir", a_file / "logs"],
         f"--logging_dir {a_file / 'logs'}: cannot write there"),
        (["--deepspeed", broken_json], f"--deepspeed {broken_json}: not a readable JSON file"),
    ]
    for extra, expected in cases:
        with pytest.raises((UsageError, DataError)) as raised:
            run_in_process(tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--max_steps", 1, *extra))
        assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "cache").exists()  # refused before the data was read
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(broken_json))
    with pytest.raises(UsageError, match="the accelerate config's deepspeed_config_file .* not a readable JSON"):
        run_in_process(tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--max_steps", 1))


def test_swanlab_online_without_a_key_is_refused(assets, tmp_path, monkeypatch):
    from pretrain.telemetry.tracking import has_swanlab_api_key

    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    if has_swanlab_api_key():
        pytest.skip("this machine has a saved `swanlab login`")
    with pytest.raises(UsageError, match="--swanlab_mode online: no SwanLab API key; set SWANLAB_API_KEY"):
        run_in_process(tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--report_to", "swanlab",
                                  "--swanlab_mode", "online"))


def test_missing_flash_attention_package_is_named(assets, tmp_path):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(UsageError, match="--attn_implementation flash_attention_2: .*; use sdpa or eager"):
        run_in_process(tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--max_steps", 1,
                                  "--attn_implementation", "flash_attention_2"))


def test_low_precision_weights_without_deepspeed_are_warned_about(assets, tmp_path, capfd):
    run_in_process(tiny_flags(assets, tmp_path / "bf16_weights", tmp_path / "cache", "--max_steps", 1,
                              "--torch_dtype", "bfloat16"))
    assert "the weights are torch.bfloat16 and, without DeepSpeed, AdamW updates them in place" in capfd.readouterr().err
    run_in_process(tiny_flags(assets, tmp_path / "fp32_weights", tmp_path / "cache", "--max_steps", 1, "--bf16"))
    assert "AdamW updates them in place" not in capfd.readouterr().err


def test_fp16_on_cpu_is_refused(assets, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UsageError, match="--fp16 needs a CUDA GPU"):
        run_in_process(tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--fp16"))


def test_foreign_output_dir_is_refused_and_overwrite_deletes_only_once_the_checks_pass(assets, tmp_path):
    """And the weights follow the umask (here 027: 0640), the final model's and a one-process checkpoint's, where
    safetensors wrote them 0600 while every other file followed it."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="--output_dir .* holds other files .*--overwrite_output_dir"):
        run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 1))
    umask = os.umask(0o027)
    try:
        run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 2, "--save_steps", 1,
                                  "--overwrite_output_dir"))
    finally:
        os.umask(umask)
    weights = [output / "model.safetensors", output / "checkpoint-2" / "model.safetensors"]
    assert [oct(path.stat().st_mode & 0o777) for path in weights] == ["0o640"] * 2
    assert (output / "config.json").stat().st_mode & 0o777 == 0o640  # as every other file
    assert (output / "notes.txt").exists()
    bad_rows = tmp_path / "mc_test.csv"
    bad_rows.write_text("question,A,B,answer\nWhich?,x,y,E\n")
    with pytest.raises(DataError, match="row 2: answer 'E'"):  # refused before the deletion
        run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 1, "--overwrite_output_dir",
                                  "--eval_tasks", f"mc={bad_rows}"))
    assert (output / "checkpoint-2").is_dir()
    run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 1, "--overwrite_output_dir"))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1"]


def test_what_a_failed_run_leaves_before_its_first_checkpoint_is_no_foreign_file(assets, tmp_path):
    """The task scores, the hang stacks and the error traceback of a run that ended before its first save: the
    same command again starts, not refused."""
    output = tmp_path / "out"
    (output / "eval_tasks").mkdir(parents=True)
    for name in ("eval_tasks/mmlu.jsonl", "hang-rank0.txt", "error-rank1.txt", "metrics.jsonl"):
        (output / name).write_text("")
    run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 1))
    assert (output / "model.safetensors").exists()


def test_command_line_error_is_one_line_without_traceback(assets, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), "--train_files", str(tmp_path / "none*.jsonl"),
                             "--config_name", str(assets["config"]), "--tokenizer_name", str(assets["tokenizer"]),
                             "--report_to", "none", "--output_dir", str(tmp_path / "o"), "--block_size", "64"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and "--train_files" in lines[0] and "matches no file" in lines[0]


@pytest.mark.slow
def test_loss_chunks_under_zero3_are_refused(assets, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_loop.py"),
                             *tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--max_steps", 1,
                                         "--deepspeed", ROOT / "ds_config_zero3.json", "--loss_chunk_size", 64)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: --loss_chunk_size with ZeRO-3" in result.stderr and "zero2.yaml" in result.stderr


def test_missing_local_model_names_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--config_name .*cannot be loaded"):
        run_in_process(["--config_name", str(tmp_path / "no_model_here"), "--train_files", "x.jsonl"])


def test_bad_data_is_reported_before_training(assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    from data_utils import DataError

    with pytest.raises(DataError, match=f"{bad}:2: malformed JSON"):
        run_in_process(tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--train_files", bad))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_readme_debugger_breakpoint_is_on_the_forward():
    """The README's pdb line finds the forward by its text (no line number to go stale): exactly one line."""
    import re

    finder = re.search(r'-c "b \$\((grep .*)\)" train_loop\.py', (ROOT / "README.md").read_text()).group(1)
    found = subprocess.run(["bash", "-c", finder], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert len(found) == 1, found
    lines = (ROOT / "train_loop.py").read_text().splitlines()
    assert "losses_of(model, batch" in lines[int(found[0]) - 1]  # the forward and the loss, inside train()
    above = [line for line in lines[:int(found[0])] if line.startswith("def ")]
    assert above[-1].startswith("def train(")


def test_the_saved_tokenizer_is_the_trained_one_and_continuing_reuses_the_cache(assets, tmp_path, capfd):
    """A tokenizer.json without a normalizer (as many are) under a Qwen2 model: loaded plainly it would be one
    tokenizer, and the saved model's folder would reload another (Qwen2Tokenizer adds NFC), encoding decomposed
    accents differently and missing the data cache on continued pretraining."""
    from transformers import AutoConfig, AutoTokenizer

    from pretrain.data.corpus_cache import tokenizer_fingerprint

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    backend = json.loads((assets["tokenizer"] / "tokenizer.json").read_text())
    backend["normalizer"] = None
    (folder / "tokenizer.json").write_text(json.dumps(backend))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    output = tmp_path / "run"
    capfd.readouterr()
    run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--tokenizer_name", folder, "--max_steps", 2))
    used = data_stats(capfd.readouterr().err)
    saved = AutoTokenizer.from_pretrained(output)
    # The cache's key records the fingerprint of the tokenizer the run encoded its data with.
    assert json.loads((Path(used["cache_dir"]) / "key.json").read_text())["tokenizer"] == \
        tokenizer_fingerprint(saved)
    trained = AutoTokenizer.from_pretrained(folder, config=AutoConfig.from_pretrained(assets["config"]))
    text = "cafe\u0301 na\u0131\u0308ve 你好"
    assert saved(text)["input_ids"] == trained(text)["input_ids"]
    continued = tiny_flags(assets, tmp_path / "continued", tmp_path / "cache", "--max_steps", 1)
    continued[:4] = ["--model_name_or_path", str(output)]  # instead of --config_name and --tokenizer_name
    run_in_process(continued)
    assert data_stats(capfd.readouterr().err)["cache_hit"] is True



def test_fp8_is_refused_in_one_line_where_it_cannot_run(assets, tmp_path, monkeypatch):
    import importlib.util

    from pretrain.base import arguments

    argv = tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--fp8", "--max_steps", 1)
    if not arguments.has_fp8_tensor_cores():
        with pytest.raises(UsageError, match=r"^--fp8 needs an NVIDIA GPU with FP8 tensor cores \(compute capability "
                                             r"8\.9\+: Ada, Hopper or newer\), and this machine has (no CUDA GPU|a )"):
            run_in_process(argv)
    monkeypatch.setattr(arguments, "has_fp8_tensor_cores", lambda: True)  # as on an H100
    with pytest.raises(UsageError, match="^--fp8 and --fp16: choose one"):
        parse_args(argv + ["--fp16"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(UsageError, match=r"^--fp8: torchao is not installed; pip install -r requirements-gpu.txt$"):
        parse_args(argv)


def test_a_deepspeed_start_does_not_load_inductor_for_a_muon_it_does_not_use():
    """DeepSpeed's ZeRO check imports its Muon module, whose torch.compile decorators load inductor (about 1.5 s of
    every rank's start). Loaded through pretrain.optim.optimizers, the module is there, inductor is not, and
    torch.compile is torch's own again."""
    script = ("import sys, torch; compile = torch.compile\n"
              "from pretrain.optim.optimizers import load_deepspeed_muon_uncompiled\n"
              "load_deepspeed_muon_uncompiled()\n"
              "from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS\n"
              "print('deepspeed.runtime.zero.muon.muon_optimizer' in sys.modules,\n"
              "      'torch._inductor.compile_fx' in sys.modules, torch.compile is compile,\n"
              "      torch.optim.AdamW in ZERO_SUPPORTED_OPTIMIZERS)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1].split() == ["True", "False", "True", "True"], result.stderr[-2000:]
