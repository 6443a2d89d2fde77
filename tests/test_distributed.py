"""Two processes through `accelerate launch` on the CPU (gloo): DDP, ZeRO-2, ZeRO-3 and a two-"machine" run.

The same global batch of 8 blocks per step must give the same losses and learning rates whatever the layout.
"""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, LoggedProcess, assert_stopped_under_the_launcher, checkpoint_estimate_error, cosine_lr, \
    data_stats, free_port, kill_tree, launch, launch_command, launch_env, launch_in_background, logged_steps, \
    processes_of, read_metrics, run_in_process, scalars, tiny_flags, weight_norms_by_part

from pretrain.checkpointing.checkpoints import checkpoint_damage
from pretrain.telemetry.layer_stats import KINDS

pytestmark = pytest.mark.slow  # every test here launches training processes

STEPS = 12
# Rank 1 of the ZeRO-2 run is slow in compute at steps 2-3, then in reading data at 9-10 (0.2 s per micro-batch: the
# faults only sleep, so the losses stay those of every other layout); the writes of checkpoint-6 are over by then.
SLOW_RANK = "slow_compute@step=2-3@rank=1,slow_data@step=9-10@rank=1"
RESTARTS_WITHIN_S = 150  # from a worker's kill to the end of the job that restarted by itself (measured: see docs)
COUNTED = ROOT / "tests" / "collectives_counted.py"  # train_loop.py with torch.distributed's collectives counted


def flags(assets, output, cache, micro, accumulation, *extra):
    """The tiny corpus for training; the small one for validation, in uneven batches of 5 across processes."""
    return tiny_flags(assets, output, cache, "--train_files", assets["tiny"], "--validation_files", assets["small"],
                      "--eval_steps", 6, "--per_device_eval_batch_size", 5, "--max_steps", STEPS,
                      "--per_device_train_batch_size", micro, "--gradient_accumulation_steps", accumulation, *extra)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """(a) 1 process mb 2 x GA 4; (b) ddp.yaml 2 x mb 2 x GA 2; (c) zero2.yaml 2 x mb 2 x GA 2 (checkpoints at 6, 12;
    rank 1 slow at times: SLOW_RANK; TensorBoard); (d) as (a) with attention masked at documents, and (e) as (c) with
    attention masked at documents and the loss computed in chunks. (a)-(c) log per-layer telemetry every 2 steps, (e)
    none; (c) and (e) count their collectives (tests/collectives_counted.py)."""
    root = tmp_path_factory.mktemp("layouts")
    cache = root / "cache"
    telemetry = ("--telemetry_steps", 2)
    run_in_process(flags(assets, root / "single", cache, 2, 4, "--save_steps", 6, *telemetry))
    launch("ddp.yaml", 2, flags(assets, root / "ddp", cache, 2, 2, *telemetry))
    (root / "zero2.log").write_text(launch("zero2.yaml", 2, flags(assets, root / "zero2", cache, 2, 2,
                                                                   "--save_steps", 6, "--report_to", "tensorboard",
                                                                   *telemetry), script=COUNTED,
                                           env_changes={"PRETRAIN_FAULT": SLOW_RANK,
                                                        "COUNT_FILE": str(root / "zero2")}).stderr)
    run_in_process(flags(assets, root / "single_masked", cache, 2, 4, "--attn_mask_type", "block_causal"))
    launch("zero2.yaml", 2, flags(assets, root / "zero2_masked", cache, 2, 2, "--attn_mask_type", "block_causal",
                                  "--loss_chunk_size", 50, "--save_steps", 6, "--telemetry_steps", 0),
           script=COUNTED, env_changes={"COUNT_FILE": str(root / "zero2_masked")})
    return root


def test_same_losses_and_lrs_on_every_layout(runs):
    single, _ = read_metrics(runs / "single")
    assert sorted(single) == list(range(1, STEPS + 1))
    for layout in ("ddp", "zero2"):
        other, _ = read_metrics(runs / layout)
        for step in range(1, 11):
            assert other[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-4), (layout, step)
            assert other[step]["lr"] == pytest.approx(single[step]["lr"], rel=1e-4, abs=1e-12), (layout, step)
            assert other[step]["tokens_seen"] == single[step]["tokens_seen"]


def telemetry_records(output):
    return {step: record for step, record in read_metrics(output)[0].items() if f"{KINDS[0]}/embed" in record}


def test_per_layer_norms_add_up_to_the_global_norm_and_match_on_one_process_ddp_and_zero2(runs):
    """At every second step: the root of the summed squares of the per-layer gradient norms is the step's gradient
    norm (clip_grad_norm_'s, DeepSpeed's) within 1e-5, and every per-layer value (gradient, update, update ratio and
    weight norms, the largest attention logit) of DDP and ZeRO-2 x 2 equals one process's within 1e-6."""
    single = telemetry_records(runs / "single")
    assert sorted(single) == list(range(2, STEPS + 1, 2))
    layers = [key for key in single[2] if "/" in key]
    assert len(layers) == 4 * 8 + 2 and all(single[2][key] is not None for key in layers)
    for layout in ("single", "ddp", "zero2"):
        records = telemetry_records(runs / layout)
        for step, record in records.items():
            squares = sum(record[key] ** 2 for key in layers if key.startswith(f"{KINDS[0]}/"))
            assert math.sqrt(squares) == pytest.approx(record["grad_norm"], rel=1e-5), (layout, step)
            assert [record[key] for key in layers] == pytest.approx([single[step][key] for key in layers],
                                                                    rel=1e-6), (layout, step)


def test_telemetry_steps_add_one_all_gather_and_the_steps_between_none(runs):
    """ZeRO-2 x 2 with telemetry every 2 steps against the same launch with it off (the masked run: the same
    collectives otherwise, as its counts show), rank by rank: one all_gather more in each telemetry step, the same
    calls in every other step, in the set-up and in the steps with a save and an evaluation."""
    for rank in (0, 1):
        on = json.loads((runs / f"zero2-rank{rank}.json").read_text())
        off = json.loads((runs / f"zero2_masked-rank{rank}.json").read_text())
        assert sorted(on, key=int) == sorted(off, key=int) == [str(step) for step in range(STEPS + 1)]
        for finished in on:  # step k's optimizer step and telemetry are counted under k - 1 steps finished
            extra = {"all_gather": 1} if (int(finished) + 1) % 2 == 0 and int(finished) < STEPS else {}
            assert on[finished] == {name: off[finished].get(name, 0) + extra.get(name, 0)
                                    for name in {**off[finished], **extra}}, (rank, finished)


def test_document_masked_zero2_matches_one_process_and_differs_from_causal(runs):
    """The ZeRO-2 side computes its loss in chunks of 50 positions as well: the same losses all the same."""
    single, single_evals = read_metrics(runs / "single_masked")
    zero2, zero2_evals = read_metrics(runs / "zero2_masked")
    causal, _ = read_metrics(runs / "single")
    for step in range(1, STEPS + 1):
        assert zero2[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-4), step
    assert [e["eval_loss"] for e in zero2_evals] == pytest.approx([e["eval_loss"] for e in single_evals], rel=1e-5)
    assert single[1]["loss"] != pytest.approx(causal[1]["loss"], rel=1e-4)  # the mask changed what was computed


def test_document_masked_eval_under_zero2_is_each_documents_loss_alone(runs):
    """The last eval_loss of the ZeRO-2 x 2 masked run, recomputed from its final model one document at a time
    (each on its own, positions from 0, nothing before it): equal within 1e-5."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import data_utils
    from pretrain.base.arguments import DEFAULT_SPLIT_SEED, DataArguments, TrainArguments
    from pretrain.evaluation import heldout

    output = runs / "zero2_masked"
    data_args = DataArguments(**json.loads((output / "run_config.json").read_text())["data"])
    tokenizer = AutoTokenizer.from_pretrained(output)
    eos = tokenizer.eos_token_id
    validation = np.asarray(data_utils.prepare_data(data_args, tokenizer, seed=DEFAULT_SPLIT_SEED).validation)
    train_args = TrainArguments(**json.loads((output / "run_config.json").read_text())["train"])
    count = heldout.eval_blocks(train_args, len(validation), 8, STEPS, 2)  # as the run chose: 2 x 2 x 2 blocks
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    block_means = []
    with torch.no_grad():
        for block in torch.from_numpy(validation[:count].astype(np.int64)):
            ends = (block == eos).nonzero().flatten().tolist()
            documents = [block[start:end + 1] for start, end in zip([0] + [e + 1 for e in ends], ends + [len(block) - 1])
                         if end + 1 > start]
            losses = [torch.nn.functional.cross_entropy(model(input_ids=doc[None]).logits[0, :-1], doc[1:],
                                                        reduction="sum") for doc in documents if len(doc) > 1]
            block_means.append(sum(losses) / sum(len(doc) - 1 for doc in documents))
    _, evals = read_metrics(output)
    assert float(torch.stack(block_means).mean()) == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)


def test_a_slow_rank_is_named_within_two_records_in_compute_and_in_data(runs):
    """Step time cannot tell a rank slow in compute: the other waits for it in the step's collectives. Its forward
    can; a rank slow in reading data shows in its data wait. Each is named once, at its first or second record
    (one a step here; the launch's first record is not judged), and nobody else at any record."""
    records = [json.loads(line) for line in (runs / "zero2" / "metrics.jsonl").read_text().splitlines()]
    compute, data = [(r["step"], r["straggler/rank"], r["straggler/slow_in"]) for r in records
                     if r.get("event") == "straggler"]
    assert compute == (3, 1, "compute")
    assert data[0] in (9, 10) and data[1:] == (1, "data"), data
    log = (runs / "zero2.log").read_text()
    assert re.findall(r"straggler: rank (\d) is slow in (compute|reading data): .* to step (\d+);", log) == [
        ("1", "compute", str(compute[0])), ("1", "reading data", str(data[0]))]
    train, _ = read_metrics(runs / "zero2")
    for step, kind in ((3, "forward"), (10, "data_wait")):  # 2 micro-batches, each 0.2 s late
        record = train[step]
        assert record[f"straggler/{kind}_slowest_rank"] == 1 and record[f"straggler/{kind}_slowest_s"] >= 0.4
        assert record[f"straggler/{kind}_fastest_s"] < 0.1
        assert record["straggler/step_time_slowest_s"] < 1.1 * record["straggler/step_time_fastest_s"], record
    tags = scalars(runs / "zero2")  # the trackers get every field, grouped under straggler/
    assert tags["straggler/forward_slowest_s"] == list(range(1, STEPS + 1)) and tags["straggler/rank"] == [3, data[0]]


def test_eval_gathers_every_validation_block_once(runs):
    """The mean over all validation blocks is the same whether 1 or 2 processes computed it."""
    _, single = read_metrics(runs / "single")
    assert [e["step"] for e in single] == [6, 12]
    for layout in ("ddp", "zero2"):
        _, other = read_metrics(runs / layout)
        for mine, theirs in zip(other, single, strict=True):
            assert mine["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5), layout


def test_lr_follows_the_formula_on_two_processes(runs):
    for layout in ("ddp", "zero2"):
        train, _ = read_metrics(runs / layout)
        for step, record in train.items():
            assert record["lr"] == pytest.approx(cosine_lr(step, 3e-3, 3, STEPS), abs=1e-12), (layout, step)


def test_zero2_checkpoint_has_one_optimizer_shard_per_rank(runs):
    checkpoint = runs / "zero2" / "checkpoint-6"
    shards = sorted(p.name for p in checkpoint.rglob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1]
    assert (checkpoint / "scheduler.bin").is_file()  # the HF schedule, which DeepSpeed does not save itself


def test_zero2_says_what_runs_and_estimates_its_checkpoints_within_ten_percent(runs):
    log = (runs / "zero2.log").read_text()
    assert "running: float32 (no mixed precision); attention sdpa, causal; optimizer AdamW (torch); DeepSpeed " \
           "ZeRO-2 on 2 processes, 1 node (CPU, gloo)" in log
    assert checkpoint_estimate_error(log, runs / "zero2" / "checkpoint-6") < 0.10


def final_model_matches_checkpoint(output, checkpoint):
    """The saved HF model gives the logits of the fp32 weights DeepSpeed held at the end of training (returned, by
    name)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    from safetensors import safe_open

    with safe_open(output / "model.safetensors", "pt") as tensors:
        assert "lm_head.weight" not in tensors.keys()  # tied: stored once, as save_pretrained stores it
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(output)).eval()
    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    missing, unexpected = trained.load_state_dict(weights, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    trained.tie_weights()
    ids = torch.randint(0, reloaded.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
        assert not torch.allclose(expected, AutoModelForCausalLM.from_config(trained.config)(input_ids=ids).logits)
    return weights


def test_zero2_final_model_is_complete(runs):
    weights = final_model_matches_checkpoint(runs / "zero2", runs / "zero2" / f"checkpoint-{STEPS}")
    assert_weight_norms_are(weights, telemetry_records(runs / "zero2")[STEPS])  # read from the partitions


def two_nodes(argv, logs, fault_on_node1=None, max_restarts=0):
    """Two launches acting as two nodes of one process each (zero2.yaml), rendezvous on 127.0.0.1, left running;
    their output in `logs`-node0.log and -node1.log."""
    port, nodes = str(free_port()), []
    for rank in (0, 1):
        env = launch_env()
        env.pop("MASTER_PORT")
        if rank == 1 and fault_on_node1:
            env["PRETRAIN_FAULT"] = fault_on_node1
        node_flags = ("--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                      "--main_process_port", port, "--max_restarts", str(max_restarts))
        nodes.append(LoggedProcess(launch_command("zero2.yaml", 2, argv, node_flags), f"{logs}-node{rank}.log",
                                   env=env))
    return nodes


def test_two_machines_match_one_launch_and_a_lost_one_ends_the_run_in_a_line(assets, runs, tmp_path):
    """(a) Two nodes build a new cache together and train as one launch of 2 processes does, for 10 steps; (b) at
    step 11 node 1's rank hangs and every process of node 1 is SIGKILLed: node 0 ends within 60 s with one line, no
    summary, its checkpoint intact; (c) both commands again, with --max_restarts 1, resume from checkpoint-6, step
    for step as the run before the kill; node 1's worker is SIGKILLed at step 9, both nodes restart their workers by
    themselves, resume from checkpoint-6 again and finish; (d) the checkpoint resumes on one machine too."""
    output = tmp_path / "two_nodes"
    argv = flags(assets, output, tmp_path / "cache", 2, 2, "--save_steps", 6)
    nodes = two_nodes(argv, tmp_path / "a", fault_on_node1="hang@step=11@rank=1")
    nodes[1].wait_until(lambda: "PRETRAIN_FAULT: rank 1 hangs at step 11" in nodes[1].output())
    kill_tree(nodes[1])
    killed_at = time.monotonic()
    out = nodes[0].output(timeout=60)
    assert time.monotonic() - killed_at < 60 and nodes[0].returncode == 1
    assert "DeepSpeed ZeRO-2 on 2 processes, 2 nodes (CPU, gloo)" in out and not data_stats(out)["cache_hit"]
    before_kill, _ = read_metrics(output)
    one_launch, _ = read_metrics(runs / "zero2")
    assert sorted(before_kill) == list(range(1, 11))
    for step in before_kill:
        assert before_kill[step]["loss"] == pytest.approx(one_launch[step]["loss"], rel=1e-6), step
    line = (f"error: rank 1 (node 1) went away at step 11; the newest complete checkpoint is "
            f"{output / 'checkpoint-6'}: rerun every node's command to resume")
    ours = out.split("\n" + line + "\n")
    assert len(ours) == 2, out[-4000:]
    assert "Traceback" not in ours[0] and not re.search(r"INFO loss [\d.]+ at step", out)  # no summary
    assert f"traceback : {line}" in ours[1].split("Root Cause")[1]  # the launcher's report names it
    assert (output / "error-rank0.txt").read_text().startswith("Traceback")  # the whole story, kept in a file
    assert checkpoint_damage(output / "checkpoint-6") is None and not (output / "checkpoint-12").exists()

    nodes = two_nodes(argv, tmp_path / "b", fault_on_node1="kill@step=9@rank=1@attempt=0", max_restarts=1)
    try:
        nodes[1].wait_until(lambda: "rank 1 is killed (SIGKILL) at step 9" in nodes[1].output())
        killed_at = time.monotonic()
        for node in nodes:
            assert node.wait(RESTARTS_WITHIN_S) == 0, node.output()[-4000:]
        print(f"both nodes ended {time.monotonic() - killed_at:.1f} s after the kill")
    finally:
        for node in nodes:
            kill_tree(node)
    assert not processes_of(output)
    assert re.search(rf"WARNING restart 1 of 1 \(--max_restarts\): the last attempt ended \(rank 1 \(node 1\) went "
                     rf"away at step 9\); resumed from {output / 'checkpoint-6'} at step 6$", nodes[0].output(), re.M)
    resumed, _ = read_metrics(output)
    assert [resumed[step]["loss"] for step in range(7, 11)] == [before_kill[step]["loss"] for step in range(7, 11)]
    for step in range(11, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(one_launch[step]["loss"], rel=1e-6), step

    # The same world on one machine: nothing in the checkpoint depends on host names or local ranks.
    result = launch("zero2.yaml", 2, argv + ["--max_steps", str(STEPS + 2)])
    assert f"resumed from {output / f'checkpoint-{STEPS}'} at step {STEPS}" in result.stderr
    assert "resharded" not in result.stderr and sorted(read_metrics(output)[0])[-2:] == [STEPS + 1, STEPS + 2]


def test_plain_checkpoint_resumes_on_another_process_count(assets, runs, tmp_path):
    """A 1-process checkpoint continues under ddp.yaml with 2 processes and the same global batch."""
    output = tmp_path / "more_processes"
    launch("ddp.yaml", 2, flags(assets, output, runs / "cache", 2, 2,
                                "--resume_from_checkpoint", runs / "single" / "checkpoint-6"))
    resumed, _ = read_metrics(output)
    single, _ = read_metrics(runs / "single")
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-5), step


def test_a_killed_launcher_and_a_sigterm_each_save_on_every_rank_and_the_run_resumes(assets, runs, tmp_path):
    """(a) SIGKILL of the launcher alone (the OOM killer, kill -9): torch elastic put each worker in a session of its
    own, so nothing forwards a signal; the workers learn of it from Linux and take the ordinary stop path. (b) The
    rerun resumes from that checkpoint, and SIGTERM to its launcher alone, as Kubernetes sends it, is forwarded:
    every rank saves again, through the same stop path."""
    import psutil

    from pretrain.checkpointing.checkpoints import list_checkpoints
    from pretrain.checkpointing.output_lock import LOCK_FILE

    output = tmp_path / "preempted"
    argv = flags(assets, output, runs / "cache", 2, 2, "--max_steps", 400, "--save_steps", 1000)
    launcher = launch_in_background("zero2.yaml", 2, argv, tmp_path / "killed.log")
    launcher.wait_until(lambda: len(logged_steps(output)) >= 3)
    workers = psutil.Process(launcher.pid).children()
    assert len(workers) == 2
    try:
        launcher.kill()
        launcher.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, launcher.output()[-3000:]
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
    checkpoints = list_checkpoints(output)
    assert len(checkpoints) == 1 and checkpoint_damage(checkpoints[0]) is None, launcher.output()[-3000:]
    assert len(list(checkpoints[0].rglob("*optim_states.pt"))) == 2
    assert not (output / LOCK_FILE).exists()  # the folder is free for the rerun
    assert "SIGTERM: stopping after step" in launcher.output()

    killed_at = int(checkpoints[0].name.split("-")[1])
    process = launch_in_background("zero2.yaml", 2, argv, tmp_path / "sigterm.log")
    process.wait_until(lambda: max(logged_steps(output), default=0) >= killed_at + 3)
    process.send_signal(signal.SIGTERM)  # to the launcher alone: it forwards it to the workers
    out = process.output(timeout=120)
    assert f"resumed from {checkpoints[0]} at step {killed_at}" in out
    assert_stopped_under_the_launcher(out, process, "SIGTERM")
    checkpoints = list_checkpoints(output)
    assert len(checkpoints) == 2 and checkpoint_damage(checkpoints[1]) is None
    assert len(list(checkpoints[1].rglob("*optim_states.pt"))) == 2
    assert int(checkpoints[1].name.split("-")[1]) == max(logged_steps(output))  # the step it stopped after


def test_bad_data_stops_every_rank_with_the_same_line(assets, tmp_path):
    """The main process finds the bad line; the other rank says the same instead of dying on a closed connection."""
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": \n')
    env = launch_env()
    command = launch_command("zero2.yaml", 2, tiny_flags(assets, tmp_path / "out", tmp_path / "cache",
                                                         "--train_files", corpus),
                             ("--main_process_port", env["MASTER_PORT"]))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {corpus}:2: malformed JSON (Expecting value at the end of the line); fix or remove that line"]
    assert "[rank1]: Traceback" not in result.stderr and "[rank0]: Traceback" not in result.stderr


def test_each_python_environment_builds_deepspeed_comm_op_once_in_a_folder_of_its_own(assets, tmp_path):
    """Two Python environments on one machine (a venv over this one, then this one), TORCH_EXTENSIONS_DIR unset:
    the venv's first ZeRO-2 launch compiles DeepSpeed's CPU communication op into a folder of its own and says so,
    with the time; this environment's launch uses its own folder (a name of its own, so the two never evict each
    other in one root) and is silent where its build was there already; the venv's second launch, after it, loads
    the venv's build without a word. One compile: this environment's was made by the suite's earlier launches."""
    from pretrain.distributed.launch import extensions_folder

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    venv_cache = {"TORCH_EXTENSIONS_DIR": None, "XDG_CACHE_HOME": str(tmp_path / "home_cache")}  # a root of its own
    built = re.compile(r"DeepSpeed's CPU communication op was built in (\d+) s, into (\S+);")
    library = Path("deepspeed_shm_comm") / "deepspeed_shm_comm.so"

    def launch_in(name, python, env_changes):
        result = launch("zero2.yaml", 2, tiny_flags(assets, tmp_path / name, tmp_path / "cache", "--train_files",
                                                    assets["tiny"], "--max_steps", 1), python=python,
                        env_changes=env_changes)
        assert "built successfully" not in result.stdout  # DeepSpeed's line, printed on a cache hit too
        return built.findall(result.stderr), result.stderr

    lines, log = launch_in("venv1", str(venv / "bin" / "python"), venv_cache)
    assert len(lines) == 1 and int(lines[0][0]) > 0, log[-3000:]
    assert log.count("INFO building DeepSpeed's CPU communication op for this Python environment, once") == 1
    venv_folder = Path(lines[0][1])
    assert venv_folder.parent == tmp_path / "home_cache" / "torch_extensions"
    stamp = (venv_folder / library).stat().st_mtime_ns
    this_folder = extensions_folder()
    assert this_folder.name != venv_folder.name and this_folder.name.startswith("py3")
    this_was_built = (this_folder / library).exists()
    lines, log = launch_in("this", sys.executable, {"TORCH_EXTENSIONS_DIR": None})
    assert [Path(folder) for _, folder in lines] == ([] if this_was_built else [this_folder]), log[-3000:]
    lines, log = launch_in("venv2", str(venv / "bin" / "python"), venv_cache)
    assert lines == [] and (venv_folder / library).stat().st_mtime_ns == stamp, log[-3000:]
    assert "INFO building DeepSpeed's" not in log
    assert [path.name for path in venv_folder.parent.iterdir()] == [venv_folder.name]  # nothing in a shared folder


@pytest.mark.parametrize("config, processes, micro, accumulation, reference",
                         [("zero2.yaml", 2, 2, 2, "zero2"), ("single_gpu.yaml", 1, 2, 4, "single")])
def test_torch_compile_matches_eager_with_no_recompiles_after_warm_up(assets, runs, tmp_path, config, processes,
                                                                      micro, accumulation, reference):
    """Each decoder layer compiled in place (aot_eager: dynamo and AOT autograd graphs without inductor's minute of
    C++ compilation on this CPU): the eager run's losses, and no graph compiled after the warm-up."""
    output = tmp_path / "compiled"
    launch(config, processes, flags(assets, output, runs / "cache", micro, accumulation, "--torch_compile",
                                    "--torch_compile_backend", "aot_eager"))
    compiled, compiled_evals = read_metrics(output)
    eager, eager_evals = read_metrics(runs / reference)
    for step in range(1, 11):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4), step
    for mine, theirs in zip(compiled_evals, eager_evals, strict=True):
        assert mine["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-4)
    # Warm-up: the first step, and the first evaluation (no_grad, and a last batch of 4 blocks beside those of 5).
    training_graphs = compiled[1]["compiled_graphs"]
    assert training_graphs >= 1
    assert [compiled[step]["compiled_graphs"] for step in range(1, 7)] == [training_graphs] * 6
    warm = compiled_evals[0]["compiled_graphs"]
    assert training_graphs < warm <= training_graphs + 2
    after_warm_up = [compiled[step]["compiled_graphs"] for step in range(7, STEPS + 1)] + \
        [compiled_evals[1]["compiled_graphs"]]
    assert after_warm_up == [warm] * 7  # no recompile after warm-up


def universal_states(checkpoint, work):
    """{parameter: {fp32, exp_avg, exp_avg_sq}}: a ZeRO checkpoint's optimizer state whatever its world size."""
    from pretrain.checkpointing.universal import convert

    target = work / f"{checkpoint.parent.name}_{checkpoint.name}_universal"
    convert(checkpoint, target)
    states = {}
    for folder in (target / "pytorch_model" / "zero").iterdir():
        if folder.is_dir():
            states[folder.name] = {}
            for name in ("fp32", "exp_avg", "exp_avg_sq"):
                if (folder / f"{name}.pt").is_file():
                    value = torch.load(folder / f"{name}.pt", weights_only=False)
                    states[folder.name][name] = value["param"] if isinstance(value, dict) else value
    return states


def assert_resumed_exactly(resumed_run, straight_run, work):
    """Steps 7-12 within 1e-5 of the straight run; fp32 masters and AdamW moments after step 12 within 1e-6."""
    resumed, _ = read_metrics(resumed_run)
    straight, _ = read_metrics(straight_run)
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5), step
        assert resumed[step]["lr"] == pytest.approx(straight[step]["lr"], rel=1e-12)
    mine = universal_states(resumed_run / f"checkpoint-{STEPS}", work)
    theirs = universal_states(straight_run / f"checkpoint-{STEPS}", work)
    assert mine.keys() == theirs.keys() and len(mine) > 10
    for parameter, states in mine.items():
        assert states.keys() == theirs[parameter].keys()
        for name, value in states.items():
            assert torch.allclose(value, theirs[parameter][name], rtol=0, atol=1e-6), (parameter, name)


def resume_elsewhere(checkpoint, folder):
    """A new output_dir holding only this checkpoint, as after a preemption that left it behind."""
    folder.mkdir()
    shutil.copytree(checkpoint, folder / checkpoint.name)
    return folder


def reshard(assets, cache, straight, config, processes, micro, accumulation, work):
    """Resume the straight run's step-6 checkpoint with another process count and the same global batch of 8."""
    resumed = resume_elsewhere(straight / "checkpoint-6", work / f"{straight.name}_on_{processes}")
    result = launch(config, processes, flags(assets, resumed, cache, micro, accumulation, "--save_steps", 6))
    saved_with = json.loads((straight / "checkpoint-6" / "trainer_state.json").read_text())["num_processes"]
    assert f"resumed from {resumed / 'checkpoint-6'} at step 6 (epoch 0, step 6), resharded from {saved_with} to " \
           f"{processes} processes" in result.stderr
    assert_resumed_exactly(resumed, straight, work)
    return result


def test_a_resume_with_a_new_learning_rate_trains_at_it_under_zero2(assets, runs, tmp_path):
    """The demo case on the ZeRO-2 run's checkpoint-6, whose cosine would give step 7 2.25e-3: resumed at 1e-4,
    constant, the line says so, steps 7-9 log 1e-4, every rank's optimizer holds it, and the losses are those of the
    same resume on one process (whose rate is measured from its AdamW step in tests/test_first_hour.py)."""
    new = ("--max_steps", 9, "--learning_rate", 1e-4, "--lr_scheduler_type", "constant", "--warmup_steps", 0)
    zero2 = resume_elsewhere(runs / "zero2" / "checkpoint-6", tmp_path / "zero2")
    result = launch("zero2.yaml", 2, flags(assets, zero2, runs / "cache", 2, 2, *new))
    assert result.stderr.count("schedule changed") == 1 and "learning_rate 0.003 -> 0.0001" in result.stderr
    assert "step 7 trains at 0.0001, this run's schedule at step 6 (the checkpoint's schedule gave 0.00225)" in \
        result.stderr
    single = resume_elsewhere(runs / "single" / "checkpoint-6", tmp_path / "single")
    run_in_process(flags(assets, single, runs / "cache", 2, 4, *new))
    resumed, alone, straight = (read_metrics(folder)[0] for folder in (zero2, single, runs / "zero2"))
    assert sorted(resumed) == [7, 8, 9] and {resumed[step]["lr"] for step in resumed} == {1e-4}
    for step in (8, 9):
        assert resumed[step]["loss"] == pytest.approx(alone[step]["loss"], rel=1e-5), step
        assert resumed[step]["loss"] != pytest.approx(straight[step]["loss"], rel=1e-3), step  # the rate mattered
    shards = sorted((zero2 / "checkpoint-9" / "pytorch_model").glob("*optim_states.pt"))
    assert len(shards) == 2
    for shard in shards:
        groups = torch.load(shard, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
        assert {(group["lr"], group["initial_lr"]) for group in groups} == {(1e-4, 1e-4)}, shard.name


def test_zero2_resumes_on_fewer_and_on_more_processes_exactly(assets, runs, tmp_path):
    """2 -> 1 process (micro-batch 2 x accumulation 2 x 2 processes = 2 x 4 x 1: the same global batch), and
    1 -> 2, each from the checkpoint at step 6 of a 12-step run, against that run's steps 7-12."""
    result = reshard(assets, runs / "cache", runs / "zero2", "zero2.yaml", 1, 2, 4, tmp_path)
    assert "converted checkpoint-6 to DeepSpeed's universal format" in result.stderr
    reuse_and_redo_the_universal_conversion(assets, runs, tmp_path / "zero2_on_1", tmp_path)
    one = tmp_path / "one_process"
    launch("zero2.yaml", 1, flags(assets, one, runs / "cache", 2, 4, "--save_steps", 6))
    reshard(assets, runs / "cache", one, "zero2.yaml", 2, 2, 2, tmp_path)


def reuse_and_redo_the_universal_conversion(assets, runs, resumed, work):
    """One process with --deepspeed (no launcher) resumes the 2-process checkpoint that `resumed` converted: once
    reusing the conversion, once after it was damaged, which converts it again, to the same step."""
    source = resumed / "checkpoint-6"

    def resume_once(name):
        argv = flags(assets, work / name, runs / "cache", 2, 4, "--resume_from_checkpoint", source,
                     "--max_steps", 7, "--deepspeed", ROOT / "ds_config_zero2.json")
        result = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), *map(str, argv)], cwd=work,
                                env=launch_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    assert f"reusing the universal conversion {source / 'universal'}" in resume_once("reused")
    shard = next((source / "universal" / "pytorch_model" / "zero").rglob("exp_avg.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # a conversion cut short, as by a full disk
    (source / "universal.tmp").mkdir()  # and the leftover of one killed half-way
    log = resume_once("redone")
    assert "the universal conversion" in log and "is damaged (truncated" in log and "converting again" in log
    assert not (source / "universal.tmp").exists()
    redone, reused, launched = (read_metrics(folder)[0][7]["loss"] for folder in
                                (work / "redone", work / "reused", resumed))
    assert redone == reused == pytest.approx(launched, rel=1e-6)


def test_zero3_final_model_is_complete_and_resumes_on_fewer_processes(assets, runs, tmp_path):
    straight = tmp_path / "zero3"
    # From tmp_path, the yaml's relative "ds_config_zero3.json" is found beside train_loop.py.
    launch("zero3.yaml", 2, flags(assets, straight, runs / "cache", 2, 2, "--save_steps", 6, "--telemetry_steps", 6),
           cwd=tmp_path)
    assert list(straight.glob(f"checkpoint-{STEPS}/pytorch_model/zero_pp_rank_1_*_model_states.pt"))  # ZeRO-3 ran
    weights = final_model_matches_checkpoint(straight, straight / f"checkpoint-{STEPS}")
    averages_to_the_fp32_mean([straight / "checkpoint-6", straight / f"checkpoint-{STEPS}"], tmp_path / "soup")
    # Per-layer telemetry from the partitions: the gradient norms add up to DeepSpeed's, the weight norms are the
    # checkpoint's (1e-6)
    records = telemetry_records(straight)
    assert sorted(records) == [6, STEPS]
    for step, record in records.items():
        squares = sum(value ** 2 for key, value in record.items() if key.startswith(f"{KINDS[0]}/"))
        assert math.sqrt(squares) == pytest.approx(record["grad_norm"], rel=1e-5), step
    assert_weight_norms_are(weights, records[STEPS])
    reshard(assets, runs / "cache", straight, "zero3.yaml", 1, 2, 4, tmp_path)


def assert_weight_norms_are(weights, record):
    """A telemetry record's per-layer weight norms are those of the weights by name (1e-6)."""
    assert weight_norms_by_part(weights) == pytest.approx(
        {key: value for key, value in record.items() if key.startswith(f"{KINDS[3]}/")}, rel=1e-6)


def same_contents(a, b, where=""):
    """Every tensor equal bit for bit, and every other value equal, through nested dicts and lists."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            same_contents(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            same_contents(x, y, f"{where}[{index}]")
    elif not callable(a) and type(a).__module__ == "builtins":
        assert a == b, where


def test_background_saves_hold_what_synchronous_saves_hold(assets, runs, tmp_path):
    """The ZeRO-2 run saved in the background (the default) while it trained on; the same run saving synchronously
    wrote the same weights, optimizer shards and step counts at steps 6 and 12."""
    log = (runs / "zero2.log").read_text()
    assert re.search(r"snapshot of [\d.]+ GB \(this process's part\) taken in [\d.]+ s; writing it in the background",
                     log) and "written in the background in" in log
    sync = tmp_path / "sync"
    result = launch("zero2.yaml", 2, flags(assets, sync, runs / "cache", 2, 2, "--save_steps", 6,
                                           "--save_in_background", "false"))
    assert "in the background" not in result.stderr
    for step in (6, STEPS):
        files = sorted(p.relative_to(sync) for p in (sync / f"checkpoint-{step}").rglob("*.pt"))
        assert len(files) == 3  # the weights, and one optimizer shard per rank
        for relative in files:
            same_contents(torch.load(sync / relative, weights_only=False),
                          torch.load(runs / "zero2" / relative, weights_only=False), str(relative))


def test_in_job_restarts_after_a_kill_mid_write_and_a_hung_rank_resume_to_the_bit(assets, runs, tmp_path):
    """`accelerate launch --max_restarts 2`, with nobody to rerun anything. The write of checkpoint-6 starts 5 s late
    (PRETRAIN_FAULT=slow_write): steps 7 and 8 train meanwhile, then rank 1 is SIGKILLed at step 9. checkpoint-6 never
    became visible: restart 1 resumes from checkpoint-3, the newest complete one. In that attempt rank 1 hangs at step
    10: the watchdog ends it after --hang_timeout, and restart 2 resumes from checkpoint-9, crosses the epoch boundary
    at step 10 and, with its last write slow too, ends only once checkpoint-12 is complete. Exit 0 within a bound after
    the kill, each restart one line and one record, every step of every attempt bitwise the uninterrupted run's, and
    no process left behind."""
    output = tmp_path / "restarts"
    fault = "slow_write@step=6@attempt=0,kill@step=9@rank=1@attempt=0,hang@step=10@rank=1@attempt=1," \
            "slow_write@step=12@attempt=2"
    process = launch_in_background("zero2.yaml", 2, flags(assets, output, runs / "cache", 2, 2, "--save_steps", 3,
                                                           "--hang_timeout", 2), tmp_path / "launch.log",
                                   extra_env={"PRETRAIN_FAULT": fault}, extra_launch=("--max_restarts", "2"))
    try:
        process.wait_until(lambda: max(logged_steps(output), default=0) >= 8)
        assert (output / "checkpoint-6.tmp").is_dir() and not (output / "checkpoint-6").exists()
        process.wait_until(lambda: "rank 1 is killed (SIGKILL) at step 9" in process.output())
        killed_at = time.monotonic()
        out = process.output(timeout=RESTARTS_WITHIN_S)
        print(f"the job ended {time.monotonic() - killed_at:.1f} s after the kill")
    finally:
        kill_tree(process)
    assert process.returncode == 0, out[-4000:]
    assert not processes_of(output)
    restarts = re.findall(r"WARNING restart (\d) of 2 \(--max_restarts\): the last attempt ended \((.+)\); resumed "
                          r"from (\S+) at step (\d+)$", out, re.M)
    assert [(number, where, step) for number, _, where, step in restarts] == [
        ("1", str(output / "checkpoint-3"), "3"), ("2", str(output / "checkpoint-9"), "9")], out[-4000:]
    assert restarts[0][1] == "rank 1 (node 0) went away at step 9"
    assert re.fullmatch(rf"no optimizer step finished for [\d.]+ s after step 9 \(limit 2.0 s, --hang_timeout\): every "
                        rf"rank's Python stack is in {output}/hang-rank\{{0\.\.1\}}\.txt", restarts[1][1])
    assert f"the newest complete checkpoint is {output / 'checkpoint-3'}: the launcher restarts every worker to " \
           f"resume (restart 1 of 2, --max_restarts)" in out
    assert out.index("starts writing checkpoint-12 5 s late") < out.index(f"saved {output / 'checkpoint-12'}") < \
        out.index("saved the final model")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [{key: r[key] for key in ("step", "restart", "max_restarts", "previous_attempt_ended", "resumed_from")}
            for r in records if r.get("event") == "restart"] == [
        {"step": int(step), "restart": int(number), "max_restarts": 2, "previous_attempt_ended": why,
         "resumed_from": where} for number, why, where, step in restarts]
    straight, _ = read_metrics(runs / "zero2")
    trained = [r for r in records if "loss" in r]
    assert sorted({r["step"] for r in trained}) == list(range(1, STEPS + 1)) and trained[-1]["epoch"] > 1
    assert [r["step"] for r in trained].count(4) == 2  # steps 4-8 ran in the first attempt and again after it
    for record in trained:
        assert (record["loss"], record["lr"]) == (straight[record["step"]]["loss"], straight[record["step"]]["lr"])
    final_model_matches_checkpoint(output, output / f"checkpoint-{STEPS}")


def consolidated(checkpoint):
    """A checkpoint's weights as DeepSpeed's zero_to_fp32 gives them, or its model.safetensors."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    if (checkpoint / "pytorch_model").is_dir():
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    return load_file(checkpoint / "model.safetensors")


def averages_to_the_fp32_mean(checkpoints, soup, command=False):
    """The averaged model folder holds the fp32 mean of the checkpoints' consolidated weights (1e-7), its tied head
    once, and loads with from_pretrained beside its tokenizer. `command`: run as a user does, with python -m."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain import average_checkpoints

    argv = ["--checkpoints", *map(str, checkpoints), "--output_dir", str(soup)]
    if command:
        result = subprocess.run([sys.executable, "-m", "pretrain.average_checkpoints", *argv], cwd=ROOT,
                                env=launch_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        average_checkpoints.main(argv)
    weights = [consolidated(checkpoint) for checkpoint in checkpoints]
    averaged = load_file(soup / "model.safetensors")
    assert "lm_head.weight" not in averaged and len(averaged) > 10
    for name, value in averaged.items():
        mean = torch.stack([w[name].float() for w in weights]).mean(dim=0)
        assert value.dtype == torch.float32 and torch.allclose(value, mean, rtol=0, atol=1e-7), name
    assert not torch.equal(averaged["model.embed_tokens.weight"], weights[-1]["model.embed_tokens.weight"].float())
    model = AutoModelForCausalLM.from_pretrained(soup)
    assert torch.equal(model.lm_head.weight, averaged["model.embed_tokens.weight"])
    assert len(AutoTokenizer.from_pretrained(soup)) == model.config.vocab_size
    assert json.loads((soup / "soup.json").read_text())["checkpoints"] == [str(c) for c in checkpoints]


def test_averaged_checkpoints_are_the_fp32_mean_of_zero2_one_process_and_ddp_weights(runs, tmp_path):
    averages_to_the_fp32_mean([runs / "zero2" / "checkpoint-6", runs / "zero2" / f"checkpoint-{STEPS}"],
                              tmp_path / "zero2", command=True)
    averages_to_the_fp32_mean([runs / "single" / "checkpoint-6", runs / "ddp" / f"checkpoint-{STEPS}",
                               runs / "zero2" / f"checkpoint-{STEPS}"], tmp_path / "mixed")


def test_averaging_evaluates_each_checkpoint_as_its_run_did_and_the_average(runs, tmp_path, capsys):
    """--evaluate: each checkpoint's eval_loss and eval_bpb are those its run logged at its step (the same
    held-out blocks), and the average's are measured beside them."""
    from pretrain import average_checkpoints

    checkpoints = [runs / "single" / "checkpoint-6", runs / "single" / f"checkpoint-{STEPS}"]
    found = average_checkpoints.main(["--checkpoints", *map(str, checkpoints), "--output_dir",
                                      str(tmp_path / "soup"), "--evaluate"])["evaluation"]
    _, logged = read_metrics(runs / "single")
    for checkpoint, record in zip(checkpoints, logged, strict=True):
        measured = found[f"single/{checkpoint.name}"]
        assert measured["eval_loss"] == pytest.approx(record["eval_loss"], rel=1e-6)
        assert measured["eval_bpb"] == pytest.approx(record["eval_bpb"], rel=1e-6)
    assert found["average"]["eval_loss"] not in {record["eval_loss"] for record in logged}
    out = capsys.readouterr().out
    assert "| average |" in out and "average against single/checkpoint-12: eval_loss " in out


def test_averaging_refuses_bad_checkpoints_in_one_line(runs, tmp_path):
    from safetensors.torch import load_file, save_file

    from pretrain import average_checkpoints

    def refused(*checkpoints, output=tmp_path / "soup"):
        with pytest.raises(SystemExit) as exited:
            average_checkpoints.cli(["--checkpoints", *map(str, checkpoints), "--output_dir", str(output)])
        assert not output.exists() or output == runs
        return exited.value.code

    six = runs / "single" / "checkpoint-6"
    assert refused(six) == "error: --checkpoints: 1 given; an average needs at least 2"
    assert refused(six, six) == f"error: --checkpoints: {six} is given twice; give each checkpoint once"
    assert refused(six, runs / "single" / "checkpoint-7") == \
        f"error: --checkpoints: {runs / 'single' / 'checkpoint-7'}: no such checkpoint folder"
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(runs / "single" / "run_config.json", other)
    shutil.copytree(six, other / "checkpoint-6")
    weights = load_file(six / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(256, 64)  # a checkpoint of a wider model
    save_file(weights, other / "checkpoint-6" / "model.safetensors")
    manifest = json.loads((six / "manifest.json").read_text())
    manifest["model.safetensors"] = (other / "checkpoint-6" / "model.safetensors").stat().st_size
    (other / "checkpoint-6" / "manifest.json").write_text(json.dumps(manifest))
    assert refused(six, other / "checkpoint-6") == (
        f"error: --checkpoints: {six} and {other / 'checkpoint-6'} hold models of different shapes "
        f"(model.layers.0.mlp.up_proj.weight: [128, 64] against [256, 64]); average checkpoints of one model")
    assert refused(other / "checkpoint-6", runs / "zero2" / "checkpoint-6").startswith(
        f"error: --checkpoints: {other / 'checkpoint-6'} and {runs / 'zero2' / 'checkpoint-6'} hold models of "
        f"different shapes")
    (other / "checkpoint-6" / "model.safetensors").write_bytes(b"cut")  # a copy cut short
    assert refused(six, other / "checkpoint-6") == (
        f"error: --checkpoints: {other / 'checkpoint-6'} is incomplete (truncated model.safetensors (3 of "
        f"{manifest['model.safetensors']} bytes)); pick a complete checkpoint")
    assert refused(six, runs / "zero2" / "checkpoint-6", output=runs) == \
        f"error: --output_dir {runs}: already holds files; give a new or empty folder"
