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
def inline(assets, tmp_path_factory):
    """A (WSD, decay from step 48), B (no decay, saved at 48) and C, the branch from B's checkpoint-48 with a
    12-step WSD decay, on one process; B's folder hashed before and after the branch; C's log."""
    root = tmp_path_factory.mktemp("branch")
    cache = root / "cache"
    run_in_process(flags(assets, root / "A", cache, *INLINE, "--save_steps", TOTAL - DECAY // 2))
    run_in_process(flags(assets, root / "B", cache, *STABLE))
    before = folder_hashes(root / "B")
    log = root / "C.log"
    handler = logging_to(log)
    try:
        run_in_process(flags(assets, root / "C", cache, *INLINE, "--branch_from", root / "B" / f"checkpoint-{BRANCH}"))
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


def test_the_parents_folder_a_missing_or_incomplete_checkpoint_and_another_branchs_folder_are_refused(inline, assets):
    root, before, _ = inline
    checkpoint = root / "B" / f"checkpoint-{BRANCH}"
    incomplete = root / "incomplete" / "checkpoint-3"
    shutil.copytree(checkpoint, incomplete)
    (incomplete / "manifest.json").unlink()
    cases = [(root / "B", checkpoint, f"--output_dir {root / 'B'} is in the folder of the run it branches from "
                                      f"({(root / 'B').resolve()}), which a branch never writes; give the branch a "
                                      f"new --output_dir"),
             (root / "B" / "cooldown", checkpoint, "is in the folder of the run it branches from"),
             (root / "D", root / "B" / "checkpoint-47", "--branch_from " + str(root / "B" / "checkpoint-47") +
              ": no such checkpoint folder (a run's checkpoint-N)"),
             (root / "D", incomplete, "incomplete checkpoint (no manifest); branch from another one"),
             (root / "C", root / "A" / f"checkpoint-{TOTAL}", f"--output_dir {root / 'C'} is a branch from "
                                                              f"{checkpoint.resolve()}; rerun with that --branch_from"),
             (root / "A", checkpoint, "holds a run that is not a branch (checkpoint-60)")]
    for output, branch_from, message in cases:
        with pytest.raises(UsageError) as error:
            run_in_process(flags(assets, output, root / "cache", *INLINE, "--branch_from", branch_from))
        assert message in str(error.value) and "\n" not in str(error.value), output
    assert not (root / "D").exists() and folder_hashes(root / "B") == before


def test_a_branch_from_a_checkpoint_in_its_decay_warns_and_goes_on_from_its_rate(inline, assets, capfd):
    """A's checkpoint-60 is at the end of its decay (rate 0: refused); its checkpoint-54 is half-way: a 6-step
    1-sqrt decay from there warns once, starts at A's rate there (the schedule scaled) and ends at 0."""
    root, _, _ = inline
    with pytest.raises(UsageError, match="the checkpoint's learning rate is 0"):
        run_in_process(flags(assets, root / "E", root / "cache", *INLINE, "--branch_from",
                             root / "A" / f"checkpoint-{TOTAL}"))
    middle = TOTAL - DECAY // 2
    capfd.readouterr()
    run_in_process(flags(assets, root / "E", root / "cache", "--lr_scheduler_type", "wsd", "--decay_steps",
                         DECAY // 2, "--branch_from", root / "A" / f"checkpoint-{middle}"))
    log = capfd.readouterr().err
    a, _ = read_metrics(root / "A")
    e, _ = read_metrics(root / "E")
    rate = a[middle]["lr"]
    assert rate == pytest.approx(3e-3 * (1 - math.sqrt(0.5)), rel=1e-12)
    warned = [line for line in log.splitlines() if "already in its decay" in line]
    assert len(warned) == 1 and f"its step {middle} trained at {rate:.4g}, below its peak 0.003" in warned[0], log
    assert log.count(f"the checkpoint trained at {rate:.4g}: the schedule is scaled by {rate / 3e-3:.4g}") == 1
    assert e[middle + 1]["lr"] == pytest.approx(rate * (1 - math.sqrt(1 / (DECAY // 2))), rel=1e-12)
    assert e[TOTAL]["lr"] == 0 and json.loads((root / "E" / "branch.json").read_text())["lr_at_branch"] == rate
