"""The background writer on its own (pretrain/checkpointing/background_save.py): what a snapshot copies, the
synchronous fallback when memory is short, and a failed write reported in one line. The runs that save in the
background under `accelerate launch` are in test_distributed.py."""

import logging
import types

import pytest
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from pretrain.base.errors import CheckpointError
from pretrain.checkpointing import background_save
from pretrain.checkpointing.background_save import CheckpointWriter, StagingBuffers, snapshot


def test_a_snapshot_is_a_compact_copy_that_training_cannot_change():
    weight = torch.randn(8, 4)
    flat = torch.zeros(1000)
    view = flat[10:20]  # a parameter that lives in a flat buffer, as under ZeRO
    state = {"embed": weight.detach(), "head": weight.detach(), "partition": view, "step": [3], "config": {"lr": 1e-3}}
    copied = snapshot(state, {}, StagingBuffers())
    assert copied["embed"] is copied["head"]  # a tied weight (two views of one storage) once, as torch.save stores it
    assert copied["partition"].untyped_storage().nbytes() == 10 * 4  # the view, not its 1000-element buffer
    weight.add_(1.0)
    view.fill_(7.0)
    state["step"].append(4)
    state["config"]["lr"] = 0.5
    assert not torch.equal(copied["embed"], weight) and torch.equal(copied["partition"], torch.zeros(10))
    assert copied["step"] == [3] and copied["config"] == {"lr": 1e-3}


def writer_for(tmp_path):
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=object()), process_index=0,
                                        num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    engine = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    return CheckpointWriter(accelerator, engine, background=True), engine


def test_the_write_waits_for_finish_and_a_snapshot_too_big_for_memory_is_written_at_once(tmp_path, monkeypatch,
                                                                                        caplog):
    writer, engine = writer_for(tmp_path)
    folder = tmp_path / "checkpoint-1.tmp"
    folder.mkdir()
    with writer.snapshots():
        engine.checkpoint_engine.save({"w": torch.ones(3)}, str(folder / "a.pt"))
    assert not (folder / "a.pt").exists()  # only a snapshot so far
    completed = []
    writer.finish(1, folder, lambda: completed.append(True))
    writer.wait()
    assert torch.equal(torch.load(folder / "a.pt")["w"], torch.ones(3)) and completed == [True]
    assert not list(folder.glob(".written-rank*"))

    monkeypatch.setattr(background_save, "MEMORY_HEADROOM", 0.0)  # (the buffer of a.pt would take 3 of them)
    with caplog.at_level(logging.WARNING, logger="train_loop"), writer.snapshots():
        engine.checkpoint_engine.save({"w": torch.ones(5)}, str(folder / "b.pt"))
        assert (folder / "b.pt").is_file()  # written before save_state returns
    said = [r.getMessage() for r in caplog.records if "does not fit in the free memory" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("the snapshot of b.pt (0.00 GB)") and "saved synchronously" in said[0]


def test_the_next_snapshot_is_copied_into_the_buffers_of_the_last_once_it_is_written(tmp_path):
    writer, engine = writer_for(tmp_path)
    weight, moments = torch.zeros(64, 8), torch.zeros(2, 100)
    buffers = []
    for step in (1, 2, 3):
        weight.fill_(step)
        moments.fill_(-step)
        folder = tmp_path / f"checkpoint-{step}.tmp"
        folder.mkdir()
        with writer.snapshots():
            engine.checkpoint_engine.save({"w": weight, "m": moments, "m0": moments[0]}, str(folder / "s.pt"))
        buffers.append(list(writer.staging.in_use))  # kept alive: a fresh allocation cannot reuse their memory
        weight.fill_(99)  # training goes on during the write
        writer.finish(step, folder, lambda: None)
        writer.wait()
        state = torch.load(folder / "s.pt")
        assert torch.equal(state["w"], torch.full((64, 8), float(step)))
        assert torch.equal(state["m"], torch.full((2, 100), -float(step))) and torch.equal(state["m0"], state["m"][0])
    assert len(buffers[0]) == 3  # no allocation after the first save:
    assert all({id(b) for b in buffers[0]} == {id(b) for b in later} for later in buffers[1:])


def test_a_failed_background_write_is_one_line_at_the_next_wait(tmp_path):
    writer, engine = writer_for(tmp_path)
    folder = tmp_path / "checkpoint-2.tmp"
    folder.mkdir()
    with writer.snapshots():
        engine.checkpoint_engine.save({"w": torch.ones(3)}, str(folder / "gone" / "a.pt"))  # no such folder
    writer.finish(2, folder, lambda: pytest.fail("an incomplete checkpoint must not be completed"))
    with pytest.raises(CheckpointError) as raised:
        writer.wait()
    message = str(raised.value)
    assert "\n" not in message and "writing checkpoint-2.tmp in the background failed" in message
    assert "rerun the same command" in message
    writer.wait()  # said once


def test_a_direct_file_holds_exactly_the_bytes_written(tmp_path, monkeypatch):
    """Writes that straddle the aligned buffer's chunks, and a last partial block cut back to the true size; a
    state dict saved through it loads back equal."""
    monkeypatch.setattr(background_save, "DIRECT_CHUNK", 8192)
    pieces = [bytes(range(256)) * 20, b"x" * 9000, memoryview(b"tail" * 1001)]
    with background_save.DirectFile(str(tmp_path / "raw.bin")) as target:
        for piece in pieces:
            assert target.write(piece) == len(piece)
    assert (tmp_path / "raw.bin").read_bytes() == b"".join(bytes(piece) for piece in pieces)

    state = {"w": torch.randn(5000), "nested": [torch.arange(7)], "step": 3}
    with background_save.DirectFile(str(tmp_path / "state.pt")) as target:
        torch.save(state, target)
    loaded = torch.load(tmp_path / "state.pt")
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["nested"][0], state["nested"][0])
    assert loaded["step"] == 3
