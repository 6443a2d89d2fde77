"""The background writer on its own (pretrain/background_save.py): what a snapshot copies, the synchronous fallback
when memory is short, and a failed write reported in one line. The runs that save in the background under
`accelerate launch` are in test_distributed.py."""

import logging
import types

import pytest
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from pretrain import background_save
from pretrain.background_save import CheckpointWriter, snapshot
from pretrain.errors import CheckpointError


def test_a_snapshot_is_a_compact_copy_that_training_cannot_change():
    weight = torch.randn(8, 4)
    flat = torch.zeros(1000)
    view = flat[10:20]  # a parameter that lives in a flat buffer, as under ZeRO
    state = {"embed": weight.detach(), "head": weight.detach(), "partition": view, "step": [3], "config": {"lr": 1e-3}}
    copied = snapshot(state, {})
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

    monkeypatch.setattr(background_save, "MEMORY_HEADROOM", 0.0)
    with caplog.at_level(logging.WARNING, logger="train_loop"), writer.snapshots():
        engine.checkpoint_engine.save({"w": torch.ones(3)}, str(folder / "b.pt"))
        assert (folder / "b.pt").is_file()  # written before save_state returns
    said = [r.getMessage() for r in caplog.records if "does not fit in the free memory" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("the snapshot of b.pt (0.00 GB)") and "saved synchronously" in said[0]


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
