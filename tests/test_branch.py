"""--branch_from: a cooldown branch from a stable-phase checkpoint is the in-line WSD run to the bit (one process and
ZeRO-2); a branch on a new mixture, beside its running parent, whose folder it never writes, resumed after SIGKILL;
the manifest, the refusals and the warning on a checkpoint already in its decay."""

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, LoggedProcess, kill_tree, launch, read_metrics, run_in_process, tiny_flags
from safetensors.torch import load_file

from pretrain.base.errors import UsageError

pytestmark = pytest.mark.slow  # every test here trains
TOTAL, BRANCH, DECAY = 60, 48, 12  # the numbers: a 60-step WSD run decaying over its last 12 steps


def flags(assets, output, cache, *extra):
    return tiny_flags(assets, output, cache, "--train_files", assets["tiny"], "--validation_split_percentage", 0,
                      "--warmup_steps", 5, "--max_steps", TOTAL, *extra)


INLINE = ("--lr_scheduler_type", "wsd", "--decay_steps", DECAY)  # A: the decay from step 48 to 60
STABLE = ("--lr_scheduler_type", "constant_with_warmup", "--save_steps", BRANCH)  # B: the same, never decaying


def folder_hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (and every folder, as None) by relative path: what a write would change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def same_weights(first: Path, second: Path) -> bool:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The token caches, built once for the module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def inline(assets, cache, tmp_path_factory):
    """A (WSD, decay from step 48), B (no decay, saved at 48) and C, the branch from B's checkpoint-48 with a
    12-step WSD decay, on one process; B's folder hashed before and after the branch; C's log."""
    root = tmp_path_factory.mktemp("branch")
    run_in_process(flags(assets, root / "A", cache, *INLINE, "--save_steps", TOTAL - DECAY // 2))
    run_in_process(flags(assets, root / "B", cache, *STABLE, "--report_to", "tensorboard"))
    before = folder_hashes(root / "B")
    log = root / "C.log"
    handler = logging_to(log)
    try:
        run_in_process(flags(assets, root / "C", cache, *INLINE, "--branch_from", root / "B" / f"checkpoint-{BRANCH}",
                             "--report_to", "tensorboard"))
    finally:
        handler()
    return root, before, log.read_text()


def logging_to(path: Path):
    """Copy the loop's log lines to `path`; returns the function that stops it."""
    import logging

    handler = logging.FileHandler(path)
    logging.getLogger("train_loop").addHandler(handler)
    return lambda: (logging.getLogger("train_loop").removeHandler(handler), handler.close())


def test_a_branch_from_a_stable_checkpoint_is_the_inline_wsd_run_to_the_bit(inline):
    root, before, log = inline
    a, _ = read_metrics(root / "A")
    c, _ = read_metrics(root / "C")
    assert sorted(c) == list(range(BRANCH + 1, TOTAL + 1))
    for step in c:
        assert (c[step]["loss"], c[step]["lr"], c[step]["tokens_seen"]) == \
            (a[step]["loss"], a[step]["lr"], a[step]["tokens_seen"]), step
    assert c[BRANCH + 1]["lr"] < a[BRANCH]["lr"] == 3e-3 and c[TOTAL]["lr"] == 0  # the decay, from the peak to 0
    assert same_weights(root / "A", root / "C")
    assert folder_hashes(root / "B") == before  # the parent's folder: not a byte written, no lock, no metrics
    assert f"resumed from {root / 'B' / f'checkpoint-{BRANCH}'} at step {BRANCH}" in log
    assert "already in its decay" not in log and "is scaled" not in log
    run_ids = [json.loads((root / run / f"checkpoint-{TOTAL}" / "trainer_state.json").read_text())["swanlab_run_id"]
               for run in ("B", "C")]
    assert None not in run_ids and run_ids[0] != run_ids[1]  # the branch is a run of its own in the trackers


def test_a_branch_resumed_from_its_own_checkpoint_with_a_longer_schedule_says_so(inline, assets, cache, tmp_path):
    """Past its branch point a branch is a run like any: a resume with another schedule says which rate it takes."""
    root, _, _ = inline
    shutil.copytree(root / "C", tmp_path / "C")  # the branch and its own checkpoint-60, left as the others read it
    log = tmp_path / "C.log"
    handler = logging_to(log)
    try:
        run_in_process(flags(assets, tmp_path / "C", cache, *INLINE, "--branch_from",
                             root / "B" / f"checkpoint-{BRANCH}", "--max_steps", TOTAL + 4))
    finally:
        handler()
    assert f"resumed from {tmp_path / 'C' / f'checkpoint-{TOTAL}'} at step {TOTAL}" in log.read_text()
    assert "the learning-rate schedule changed since the checkpoint" in log.read_text()


def test_a_branch_is_the_inline_wsd_run_to_the_bit_under_zero2_too(assets, cache, tmp_path):
    """A, B (stopped at 48: its constant rate does not depend on the length) and the branch C, each launched with
    zero2.yaml on 2 processes (micro-batch 1, the same global batch of 2 blocks)."""
    checkpoint = tmp_path / "B" / f"checkpoint-{BRANCH}"
    zero2 = ("--per_device_train_batch_size", 1)
    launch("zero2.yaml", 2, flags(assets, tmp_path / "A", cache, *INLINE, *zero2))
    launch("zero2.yaml", 2, flags(assets, tmp_path / "B", cache, *STABLE, *zero2, "--max_steps", BRANCH))
    before = folder_hashes(tmp_path / "B")
    log = launch("zero2.yaml", 2, flags(assets, tmp_path / "C", cache, *INLINE, *zero2, "--branch_from",
                                        checkpoint)).stderr
    assert log.count(f"resumed from {checkpoint} at step {BRANCH}") == 1 and log.count("branched from") == 1, log
    a, _ = read_metrics(tmp_path / "A")
    c, _ = read_metrics(tmp_path / "C")
    assert sorted(c) == list(range(BRANCH + 1, TOTAL + 1))
    assert [(c[s]["loss"], c[s]["lr"]) for s in c] == [(a[s]["loss"], a[s]["lr"]) for s in c]
    assert same_weights(tmp_path / "A", tmp_path / "C") and folder_hashes(tmp_path / "B") == before
    # The same branch on one process without DeepSpeed cannot load ZeRO shards: one line that says how to launch it.
    with pytest.raises(UsageError, match=r"was written with DeepSpeed and this launch runs without it; .*; a branch "
                                         r"is launched as its parent was \(its accelerate config and --optim\)$"):
        run_in_process(flags(assets, tmp_path / "D", cache, *INLINE, "--branch_from", checkpoint))
    assert folder_hashes(tmp_path / "B") == before


def test_the_manifest_records_the_branch_point_its_hash_schedule_and_mixture(inline):
    root, _, _ = inline
    manifest = json.loads((root / "C" / "branch.json").read_text())
    checkpoint = root / "B" / f"checkpoint-{BRANCH}"
    files = sorted(json.loads((checkpoint / "manifest.json").read_text())) + ["manifest.json"]
    digest = hashlib.sha256("".join(f"{name}\0{hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()}\n"
                                    for name in files).encode()).hexdigest()
    assert manifest["parent"] == str((root / "B").resolve()) and manifest["checkpoint"] == str(checkpoint.resolve())
    assert manifest["step"] == BRANCH and manifest["checkpoint_sha256"] == digest and manifest["lr_at_branch"] == 3e-3
    assert manifest["tokens_seen"] == BRANCH * 2 * 64
    assert {key: manifest["schedule"][key] for key in ("lr_scheduler_type", "total_steps", "decay_steps")} == \
        {"lr_scheduler_type": "wsd", "total_steps": TOTAL, "decay_steps": DECAY}
    assert manifest["mixture"] is None and manifest["parent_mixture"] is None


def test_the_parents_folder_a_missing_or_incomplete_checkpoint_and_another_branchs_folder_are_refused(inline, assets,
                                                                                                      cache):
    root, before, _ = inline
    checkpoint = root / "B" / f"checkpoint-{BRANCH}"
    incomplete = root / "incomplete" / "checkpoint-3"
    shutil.copytree(checkpoint, incomplete)
    (incomplete / "manifest.json").unlink()
    cases = [(root / "B", checkpoint, f"--output_dir {root / 'B'} is in the folder of the run it branches from "
                                      f"({(root / 'B').resolve()}), which a branch never writes; give the branch a "
                                      f"new --output_dir"),
             (root / "B" / "cooldown", checkpoint, "is in the folder of the run it branches from"),
             (root / "D", checkpoint, "--logging_dir " + str(root / "B" / "logs") + " is in the folder of the run"),
             (root / "D", root / "B" / "checkpoint-47", "--branch_from " + str(root / "B" / "checkpoint-47") +
              ": no such checkpoint folder (a run's checkpoint-N)"),
             (root / "D", incomplete, "incomplete checkpoint (no manifest); branch from another one"),
             (root / "C", root / "A" / f"checkpoint-{TOTAL}", f"--output_dir {root / 'C'} is a branch from "
                                                              f"{checkpoint.resolve()}; rerun with that --branch_from"),
             (root / "A", checkpoint, "holds a run that is not a branch (checkpoint-60)")]
    for output, branch_from, message in cases:
        logs = ("--logging_dir", root / "B" / "logs") if "--logging_dir" in message else ()
        with pytest.raises(UsageError) as error:
            run_in_process(flags(assets, output, cache, *INLINE, "--branch_from", branch_from, *logs))
        assert message in str(error.value) and "\n" not in str(error.value), output
    for other in (("--resume_from_checkpoint", checkpoint), ("--overwrite_output_dir",)):
        with pytest.raises(UsageError, match="--branch_from with --resume_from_checkpoint or --overwrite_output_dir"):
            run_in_process(flags(assets, root / "D", cache, *INLINE, "--branch_from", checkpoint, *other))
    assert not (root / "D").exists() and folder_hashes(root / "B") == before


def test_a_branch_from_a_checkpoint_in_its_decay_warns_and_goes_on_from_its_rate(inline, assets, cache, capfd):
    """A's checkpoint-60 is at the end of its decay (rate 0: refused); its checkpoint-54 is half-way: a 6-step
    1-sqrt decay from there warns once, starts at A's rate there (the schedule scaled) and ends at 0."""
    root, _, _ = inline
    with pytest.raises(UsageError, match="the checkpoint's learning rate is 0"):
        run_in_process(flags(assets, root / "E", cache, *INLINE, "--branch_from",
                             root / "A" / f"checkpoint-{TOTAL}"))
    middle = TOTAL - DECAY // 2
    capfd.readouterr()
    run_in_process(flags(assets, root / "E", cache, "--lr_scheduler_type", "wsd", "--decay_steps",
                         DECAY // 2, "--branch_from", root / "A" / f"checkpoint-{middle}"))
    log = capfd.readouterr().err
    a, _ = read_metrics(root / "A")
    e, _ = read_metrics(root / "E")
    rate = a[middle]["lr"]
    assert rate == pytest.approx(3e-3 * (1 - math.sqrt(0.5)), rel=1e-12)
    warned = [line for line in log.splitlines() if "already in its decay" in line]
    assert len(warned) == 1 and f"its rate after step {middle} is {rate:.4g}, below its peak 0.003" in warned[0], log
    assert log.count(f"the checkpoint trained at {rate:.4g}: the schedule is scaled by {rate / 3e-3:.4g}") == 1
    assert e[middle + 1]["lr"] == pytest.approx(rate * (1 - math.sqrt(1 / (DECAY // 2))), rel=1e-12)
    assert e[TOTAL]["lr"] == 0 and json.loads((root / "E" / "branch.json").read_text())["lr_at_branch"] == rate


PARENT, ANNEAL = {"small": 0.75, "tiny": 0.25}, {"small": 0.25, "tiny": 0.75}  # the anneal reads mostly "tiny"
SAME = ["loss", "lr", "grad_norm", "tokens_seen", *(f"{kind}/{name}" for kind in ("loss", "blocks", "tokens_seen")
                                                    for name in ANNEAL)]  # what a bitwise resume logs again


def mixture_flags(assets, output, cache, weights, *extra):
    """16 steps of 8 blocks from two sources, WSD decaying over the last 4 steps, saved every 4."""
    argv = tiny_flags(assets, output, cache, "--validation_split_percentage", 0, "--max_steps", 16,
                      "--gradient_accumulation_steps", 4, "--save_steps", 4, "--lr_scheduler_type", "wsd",
                      "--decay_steps", 4, *extra)
    at = argv.index("--train_files")
    return argv[:at] + ["--train_mixture", *(f"{name}={w}:{assets[name]}" for name, w in weights.items())] + \
        argv[at + 2:]


def start(argv, log, fault):
    return LoggedProcess([sys.executable, str(ROOT / "train_loop.py"), *map(str, argv)], log, cwd=ROOT,
                         env=dict(os.environ, PRETRAIN_FAULT=fault))


def test_a_branch_on_a_new_mixture_beside_its_running_parent_resumes_after_sigkill_to_the_bit(assets, cache, tmp_path,
                                                                                               capfd):
    """The parent runs (hanging at step 10, its lock held) while a branch from its checkpoint-8 anneals for 8 steps
    on the other weights: once straight, and once killed (SIGKILL to its whole tree) after its own checkpoint-12
    and rerun. Each source's blocks since the branch are within one block of the new weights at every step; the
    parent's folder is the same to the byte after both; the rerun is the straight branch to the bit and leaves
    branch.json as it was; the parent then trains on to its end."""
    parent, straight, branch = tmp_path / "parent", tmp_path / "straight", tmp_path / "branch"
    running = start(mixture_flags(assets, parent, cache, PARENT), tmp_path / "parent.log", "hang@step=10")
    running.wait_until(lambda: "hangs at step 10" in running.output(), timeout=120)
    before = folder_hashes(parent)
    anneal = ("--decay_steps", 8, "--branch_from", parent / "checkpoint-8")
    killed = start(mixture_flags(assets, branch, cache, ANNEAL, *anneal), tmp_path / "branch.log", "hang@step=14")
    run_in_process(mixture_flags(assets, straight, cache, ANNEAL, *anneal))  # while the killed one starts
    killed.wait_until(lambda: "hangs at step 14" in killed.output(), timeout=120)
    kill_tree(killed)
    killed.wait()
    manifest = (branch / "branch.json").read_bytes()
    capfd.readouterr()
    run_in_process(mixture_flags(assets, branch, cache, ANNEAL, *anneal))
    rerun = capfd.readouterr().err
    assert f"resumed from {branch / 'checkpoint-12'} at step 12" in rerun and "mixture changed" not in rerun, rerun
    assert (branch / "branch.json").read_bytes() == manifest
    assert folder_hashes(parent) == before and running.poll() is None  # untouched, while the parent was running
    kill_tree(running)
    running.wait()

    at_branch, _ = read_metrics(parent)
    expected, _ = read_metrics(straight)
    got, _ = read_metrics(branch)
    assert sorted(expected) == sorted(got) == list(range(9, 17))
    for step in range(9, 17):
        for name, weight in ANNEAL.items():
            since = (expected[step][f"tokens_seen/{name}"] - at_branch[8][f"tokens_seen/{name}"]) // 64
            assert abs(since - weight * (step - 8) * 8) <= 1, (step, name, since)
        assert [got[step][key] for key in SAME] == [expected[step][key] for key in SAME], step
    assert same_weights(straight, branch)
    assert "the mixture changed since the checkpoint (source small weight 0.75 -> 0.25" in \
        (tmp_path / "branch.log").read_text()
    assert json.loads(manifest)["mixture"] == ANNEAL and json.loads(manifest)["parent_mixture"] == PARENT

    run_in_process(mixture_flags(assets, parent, cache, PARENT))  # the parent goes on, from its checkpoint-8
    assert sorted(read_metrics(parent)[0]) == list(range(1, 17)) and (parent / "model.safetensors").exists()
