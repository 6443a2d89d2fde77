"""Resume a ZeRO checkpoint on another number of processes: DeepSpeed's universal checkpoint, made once.

A ZeRO checkpoint holds each rank's slice of the fp32 master weights and AdamW moments, cut for its world size.
DeepSpeed's `ds_to_universal` rewrites the slices as one file per parameter (`zero/<name>/{fp32,exp_avg,
exp_avg_sq}.pt`), which any world size can load with `load_universal_checkpoint`. The conversion goes to
`checkpoint-N/universal/`, beside the shards, written as `universal.tmp/` and renamed when complete (with its own
manifest, so a damaged one is redone); a later resume on another world size reuses it. The main process
converts; the other ranks wait by watching the folder, not in a collective, so a long conversion cannot time out.

It owns the conversion and the universal load; it must not decide when to resume (`pretrain.checkpointing.checkpoints`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from pretrain.base.errors import UsageError, first_line, moved_api, private_api

logger = logging.getLogger("train_loop")
DEEPSPEED_TESTED = "0.19.8"  # the private parts below are checked against this release
UNIVERSAL = "universal"
FAILED = "universal.failed"  # the main process's one-line error, for the waiting ranks


def universal_copy(accelerator, checkpoint: Path, damage_of, target: Path | None = None) -> Path:
    """checkpoint/universal (or `target`: a branch never writes in its parent's folder), converted now by the main
    process unless a complete conversion is there already."""
    target = target or checkpoint / UNIVERSAL
    if accelerator.is_main_process:
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / FAILED).unlink(missing_ok=True)
        damage = damage_of(target) if target.exists() else "missing"
        if damage is None:
            logger.info(f"reusing the universal conversion {target}")
        else:
            if damage != "missing":
                logger.warning(f"the universal conversion {target} is damaged ({damage}): converting again")
            try:
                convert(checkpoint, target)
            except Exception as error:  # DeepSpeed's converter raises plain exceptions and assertions
                line = (f"checkpoint {checkpoint}: the conversion to DeepSpeed's universal format failed "
                        f"({first_line(error)}); resume with the process count it was saved with")
                (target.parent / FAILED).write_text(line)
                raise UsageError(line) from None
    else:
        waiting_since = time.time() - 5  # an older FAILED file is a previous run's
        while damage_of(target) is not None:
            failed = target.parent / FAILED
            if failed.exists() and failed.stat().st_mtime >= waiting_since:
                raise UsageError(failed.read_text())
            time.sleep(1.0)
    return target


def convert(checkpoint: Path, target: Path) -> None:
    """ds_to_universal on the DeepSpeed shards, plus Accelerate's own files (schedule, RNG, trainer state)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    start = time.perf_counter()
    tag = (checkpoint / "latest").read_text().strip()  # Accelerate saves the engine under the tag "pytorch_model"
    temporary = target.with_name(target.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    skipped = {tag, UNIVERSAL, temporary.name, FAILED, "manifest.json"}
    shutil.copytree(checkpoint, temporary, ignore=lambda folder, names: skipped if Path(folder) == checkpoint else [])
    momenta: list[tuple[list[str], torch.Tensor]] = []
    with contextlib.redirect_stdout(io.StringIO()), muon_groups_set_aside(momenta):  # its progress prints
        ds_to_universal(SimpleNamespace(input_folder=str(checkpoint / tag), output_folder=str(temporary / tag),
                                        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                        strict=True, inject_missing_state=True))
    write_muon_momenta(momenta, temporary / tag / "zero")
    files = {str(p.relative_to(temporary)): p.stat().st_size for p in temporary.rglob("*") if p.is_file()}
    (temporary / "manifest.json").write_text(json.dumps(files, indent=1))
    temporary.rename(target)
    logger.info(f"converted {checkpoint.name} to DeepSpeed's universal format in {time.perf_counter() - start:.1f} s "
                f"({sum(files.values()) / 1e9:.2f} GB): {target}")


@contextlib.contextmanager
def muon_groups_set_aside(momenta: list[tuple[list[str], torch.Tensor]]):
    """ds_to_universal with ZeRO-2's Muon groups: it reads AdamW's two moments in every group, and a Muon group
    holds one momentum instead, laid out as the whole matrices that touch the rank's partition, not as the
    partition. While it runs, each rank's Muon groups show it zero moments (their files are removed afterwards),
    and their momenta, read unstripped of padding, are set aside as (names in order, buffer) for
    `write_muon_momenta`."""
    from deepspeed.checkpoint import DeepSpeedCheckpoint

    what = "resuming a Muon checkpoint on another process count"
    original = private_api(DeepSpeedCheckpoint, "get_zero_checkpoint_state", "deepspeed", DEEPSPEED_TESTED, what)

    def with_muon_set_aside(self, pp_index, tp_index, dp_index, strip_tensor_paddings=True):
        state = original(self, pp_index=pp_index, tp_index=tp_index, dp_index=dp_index,
                         strip_tensor_paddings=strip_tensor_paddings)
        optimizer = state["optimizer_state_dict"]
        groups = optimizer["base_optimizer_state"]["state"]
        muon = [index for index, group in groups.items() if "momentum_buffer" in group and "exp_avg" not in group]
        if muon:
            whole = original(self, pp_index=pp_index, tp_index=tp_index, dp_index=dp_index,
                             strip_tensor_paddings=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
        for index in muon:
            names = list(optimizer["param_slice_mappings"][index])
            momenta.append((names, whole[index]["momentum_buffer"]))
            fp32 = optimizer["single_partition_of_fp32_groups"][index]
            groups[index].update(exp_avg=torch.zeros_like(fp32), exp_avg_sq=torch.zeros_like(fp32))
        return state

    DeepSpeedCheckpoint.get_zero_checkpoint_state = with_muon_set_aside
    try:
        yield
    finally:
        DeepSpeedCheckpoint.get_zero_checkpoint_state = original


def write_muon_momenta(momenta: list[tuple[list[str], torch.Tensor]], zero: Path) -> None:
    """Each Muon matrix's momentum as zero/<name>/momentum_buffer.pt, in place of the zero moments; a layout other
    than whole matrices in the partition's order stops the conversion."""
    for names, buffer in momenta:
        offset = 0
        for name in names:
            shape = torch.load(zero / name / "fp32.pt", weights_only=False)["param"].shape
            torch.save({"param": buffer[offset:offset + shape.numel()].view(shape).clone()},
                       zero / name / "momentum_buffer.pt")
            offset += shape.numel()
            for moment in ("exp_avg.pt", "exp_avg_sq.pt"):
                (zero / name / moment).unlink(missing_ok=True)
        if offset != buffer.numel():
            raise ValueError(f"a Muon momentum of {buffer.numel()} values for matrices of {offset}")


def restore_muon_momenta(zero_optimizer, zero: Path) -> None:
    """After the universal load, each ZeRO-2 Muon group's momentum as its rank keeps it: the whole matrices that
    touch the new partition, in its order (DeepSpeed's load cut it like the partition)."""
    for index, group in enumerate(zero_optimizer.optimizer.param_groups):
        if group.get("use_muon"):
            matrices = [torch.load(zero / zero_optimizer.param_names[p] / "momentum_buffer.pt",
                                   weights_only=False)["param"].flatten()
                        for p in zero_optimizer.params_in_partition[index]]
            zero_optimizer.optimizer.state[group["params"][0]]["momentum_buffer"] = torch.cat(matrices)


def load_universal(accelerator, universal: Path) -> None:
    """accelerator.load_state on the conversion, with DeepSpeed told to read the universal layout."""
    engine = accelerator.deepspeed_engine_wrapped.engine
    what = "resuming on another process count"
    private_api(engine._config, "load_universal_checkpoint", "deepspeed", DEEPSPEED_TESTED, what)
    engine._config.load_universal_checkpoint = True  # read once, at load_checkpoint
    try:
        accelerator.load_state(str(universal))
    finally:
        engine._config.load_universal_checkpoint = False  # this run's own checkpoints are ordinary ones
    restore_muon_momenta(engine.optimizer, universal / (universal / "latest").read_text().strip() / "zero")
    if engine.zero_optimization_stage() == 3:
        saved_state = universal / "pytorch_model" / "zero" / "optimizer_state.pt"
        inner = getattr(engine.optimizer, "optimizer", None)
        if not saved_state.is_file() or not hasattr(inner, "param_groups"):
            raise UsageError(moved_api("deepspeed", DEEPSPEED_TESTED, f"{what} under ZeRO-3"))
        _repair_zero3_groups(inner, saved_state)


def _repair_zero3_groups(optimizer: torch.optim.Optimizer, saved_state: Path) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load gives every parameter group the first group's settings (so the
    no-decay group decays) and one shared `step` tensor (which AdamW then advances once per group)."""
    saved_groups = torch.load(saved_state, map_location="cpu", weights_only=False)["param_groups"]
    for live, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        live.update({key: value for key, value in saved.items() if key != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
