"""Shared fixtures: a generated corpus, a tokenizer trained on it, a tiny model config, and run helpers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One thread per process, in this process and in every process the tests start (as launch_env gives each rank): a
# tiny model's ops are too small to share between threads, which spin while they wait (twice the CPU time for the
# same run, and slower still when the machine is busy), and every run then adds its floats in one order.
os.environ["OMP_NUM_THREADS"] = "1"

from pretrain.data import demo_corpus  # noqa: E402
from pretrain.distributed.launch import free_local_port as free_port  # noqa: E402,F401  (a port nothing listens on)

TINY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """corpus.jsonl (the demo generator), its BPE tokenizer, and a tiny Qwen2 config folder."""
    from transformers import AutoTokenizer, Qwen2Config

    root = tmp_path_factory.mktemp("assets")
    corpus, tokenizer_dir = demo_corpus.ensure_demo_assets(root)
    small = demo_corpus.write_demo_corpus(root / "small.jsonl", documents=800, seed=1)
    tiny = demo_corpus.write_demo_corpus(root / "tiny.jsonl", documents=120, seed=2)  # ~8 steps of 8 blocks
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_dir = root / "tiny_config"
    Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **TINY_MODEL).save_pretrained(config_dir)
    return {"corpus": corpus, "small": small, "tiny": tiny, "tokenizer": tokenizer_dir, "config": config_dir}


def tiny_flags(assets, output_dir, cache_dir, *extra):
    """Flags for a tiny fp32 run on the small corpus; later flags override earlier ones."""
    return ["--config_name", str(assets["config"]), "--tokenizer_name", str(assets["tokenizer"]),
            "--train_files", str(assets["small"]), "--data_cache_dir", str(cache_dir),
            "--output_dir", str(output_dir), "--block_size", "64", "--report_to", "none",
            "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--warmup_steps", "3",
            "--logging_steps", "1", "--save_steps", "1000", "--eval_steps", "1000", *map(str, extra)]


def run_in_process(argv, entry="main"):
    """train_loop.main (or another entry point, e.g. cli) in this process, with Accelerate's singletons reset."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import train_loop

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    try:
        return getattr(train_loop, entry)(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def launch_command(config, num_processes, argv, extra_launch=(), script=ROOT / "train_loop.py",
                   python=sys.executable):
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
            "--num_processes", str(num_processes), *extra_launch, str(script), *argv]


def launch_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["MASTER_PORT"] = str(free_port())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # a script's too
    return env


def launch_in_background(config, num_processes, argv, log, extra_env=None, extra_launch=(), **popen):
    """`accelerate launch` left running, its output in the file `log`; `extra_launch`: more flags of the launcher."""
    env = {**launch_env(), **(extra_env or {})}
    return LoggedProcess(launch_command(config, num_processes, argv,
                                        ("--main_process_port", env["MASTER_PORT"], *extra_launch)), log, env=env,
                         **popen)


def launch(config, num_processes, argv, timeout=300, extra_launch=(), cwd=ROOT, script=ROOT / "train_loop.py",
           python=sys.executable, env_changes=None):
    """`accelerate launch` of train_loop.py (or another script), from the repository root unless told, as a user
    would; fails with the output's tail. `python`: the environment it runs in; `env_changes`: variables set, or
    removed where the value is None."""
    env = launch_env()
    for name, value in (env_changes or {}).items():
        env.pop(name, None) if value is None else env.__setitem__(name, value)
    command = launch_command(config, num_processes, argv,
                             ("--main_process_port", env["MASTER_PORT"], *extra_launch), script, python)
    # In a session of its own, so that a launch past its timeout is killed with its workers: torch elastic's
    # workers outlive a SIGKILLed launcher and would train on, holding the CPU, through the rest of the suite.
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"the launch ran past {timeout} s (killed with its workers):\n{stdout[-3000:]}{stderr[-5000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


class LoggedProcess(subprocess.Popen):
    """A process in the background with its stdout and stderr in the file `log`: a pipe that nobody reads while
    the test waits fills up (64 KiB of step lines and progress bars) and blocks the process in its next print."""

    def __init__(self, command, log, **popen):
        self.log = Path(log)
        with open(self.log, "w") as handle:
            super().__init__(command, stdout=handle, stderr=subprocess.STDOUT, text=True, **popen)

    def output(self, timeout=None):
        """Everything it printed so far; with a timeout, once it has exited."""
        if timeout is not None:
            self.wait(timeout)
        return self.log.read_text(errors="replace")

    def wait_until(self, predicate, timeout=300, poll_s=0.02):
        """Return once `predicate()` holds; fail, with the output's tail, if the process ends or time runs out."""
        deadline = time.time() + timeout
        while not predicate():
            assert self.poll() is None, self.output()[-3000:]
            assert time.time() < deadline, "timed out:\n" + self.output()[-3000:]
            time.sleep(poll_s)


def logged_steps(output_dir):
    """The steps of the training records in metrics.jsonl so far."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def assert_stopped_under_the_launcher(out, launcher, signal_name):
    """One "stopped by" line for the whole launch, and the launcher's own exit: torch elastic raises
    SignalException once its workers have ended (exit code 1, as the README says a scheduler sees it)."""
    stopped = [line for line in out.splitlines() if "stopped by" in line]
    assert len(stopped) == 1 and f"stopped by {signal_name} at step" in stopped[0], out[-3000:]
    assert launcher.returncode == 1
    assert out.count("Traceback (most recent call last)") == 1 and out.rstrip().endswith(
        f"SignalException: Process {launcher.pid} got signal: {signal.Signals[signal_name].value}"), out[-3000:]


def read_metrics(output_dir):
    """Training records by step (the last one written wins, as after a resume) and eval records."""
    train, evals = {}, []
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" in record:  # a skipped step or a rewind, beside the step's own record
            continue
        if "eval_loss" in record:
            evals.append(record)
        else:
            train[record["step"]] = record
    return train, evals


def data_stats(stderr):
    """The stats of the data line a run logs ("data: {...}")."""
    return json.loads(next(line for line in stderr.splitlines() if " data: {" in line).split(" data: ", 1)[1])


def cosine_lr(step, peak, warmup, total):
    """The learning rate after `step` optimizer steps: linear warmup, then half a cosine down to zero."""
    import math

    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def processes_of(output_dir):
    """The processes still running whose command line names `output_dir`: a launch's workers left behind."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if str(output_dir) in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            pass
    return found


def kill_tree(process, sig=9):
    """Signal a launcher and every process under it (SIGKILL by default), as a crash or preemption would."""
    import psutil

    try:
        parent = psutil.Process(process.pid)
        targets = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for target in targets:
        try:
            target.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def checkpoint_estimate_error(log, checkpoint):
    """The logged estimate of one checkpoint's size ("checkpoints: about X MB each") against a real checkpoint's
    bytes on disk, as a relative error."""
    import re

    number, unit = re.search(r"checkpoints: about ([\d.]+) (MB|GB) each", log).groups()
    estimate = float(number) * (1e6 if unit == "MB" else 1e9)
    real = sum(p.stat().st_size for p in Path(checkpoint).rglob("*") if p.is_file())
    return abs(estimate - real) / real


def scalars(folder):
    """{tag: [steps]} of the TensorBoard events under `folder`, as TensorBoard shows them (orphans purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [path.parent for path in folder.rglob("events.out.tfevents.*")]
    assert runs, f"no event files under {folder}"
    steps = {}
    for run in set(runs):
        events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
        for tag in events.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(event.step for event in events.Scalars(tag))
    return steps


def weight_norms_by_part(weights):
    """{"layer_weight_norm/PART": norm} of weights by name, as --telemetry_steps names the parts; a tied head (equal
    to the embedding, which a ZeRO checkpoint may list again) counted once, as the model's parameters count it."""
    import torch

    from pretrain.telemetry.layer_stats import KINDS, part_of

    embedding = weights.get("model.embed_tokens.weight")
    squares = {}
    for name, tensor in weights.items():
        if "lm_head" in name and embedding is not None and torch.equal(tensor, embedding):
            continue
        squares[part_of(name, 1)] = squares.get(part_of(name, 1), 0.0) + float(tensor.double().square().sum())
    return {f"{KINDS[3]}/{part}": value ** 0.5 for part, value in squares.items()}
