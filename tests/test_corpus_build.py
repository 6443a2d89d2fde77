"""The streamed build: the same bytes for any number of workers and any cut of the input, byte ranges that start
mid-line, bad lines found inside a worker's range, a rerun after SIGKILL, two builders on one cache, bounded memory
on the training side."""

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import data_utils
from conftest import ROOT, kill_tree
from data_utils import DataArguments, DataError
from pretrain.data import cache_claims
from pretrain.data import corpus_files
from pretrain.data.corpus_files import Piece


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets["tokenizer"])


def build(files, cache, tokenizer, workers, **overrides):
    values = dict(train_files=[str(f) for f in files], data_cache_dir=str(cache), block_size=32,
                  validation_split_percentage=10, preprocessing_num_workers=workers)
    values.update(overrides)
    return data_utils.prepare_data(DataArguments(**values), tokenizer, seed=5, show_progress=False)


def test_same_blocks_and_split_for_1_2_and_3_workers(assets, tokenizer, tmp_path):
    built = {workers: build([assets["small"]], tmp_path / f"w{workers}", tokenizer, workers) for workers in (1, 2, 3)}
    assert built[1].stats["shards"] >= 6  # the 108 kB file is cut into byte ranges, shared by the workers
    assert len({Path(b.stats["cache_dir"]).name for b in built.values()}) == 1  # the key ignores parallelism
    for workers in (2, 3):
        np.testing.assert_array_equal(built[workers].train, built[1].train)
        np.testing.assert_array_equal(built[workers].validation, built[1].validation)
    # the split holds out whole documents: the validation stream is the held-out documents, in corpus order
    texts = [json.loads(line)["text"] for line in assets["small"].read_text().splitlines()]
    offsets = np.cumsum([0] + [len(line) + 1 for line in assets["small"].read_bytes().splitlines()])[:-1]
    from pretrain.data.corpus_build import held_out

    chosen = held_out(5, 0, offsets, 10.0)
    assert 0.05 < chosen.mean() < 0.16
    expected = np.concatenate([tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                               for t, out in zip(texts, chosen) if out])
    kept = np.asarray(built[1].validation).reshape(-1)
    np.testing.assert_array_equal(kept, expected[: len(kept)])


def test_same_bytes_whatever_the_piece_size(assets, tokenizer, tmp_path, monkeypatch):
    fine = build([assets["small"]], tmp_path / "fine", tokenizer, 2)
    monkeypatch.setattr(corpus_files, "MIN_PIECE_BYTES", 1 << 20)
    coarse = build([assets["small"]], tmp_path / "coarse", tokenizer, 2)
    assert coarse.stats["shards"] == 1 < fine.stats["shards"]
    np.testing.assert_array_equal(fine.train, coarse.train)
    np.testing.assert_array_equal(fine.validation, coarse.validation)


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_byte_ranges_starting_mid_line_read_every_line_once(tmp_path, fmt):
    lines = [f"document {i} " + "x" * (i % 7) for i in range(40)]
    path = tmp_path / f"corpus.{fmt}"
    path.write_text("".join((json.dumps({"text": t}) if fmt == "jsonl" else t) + "\n" for t in lines))
    size = path.stat().st_size
    for step in (1, 5, 13, 64, size):  # most cuts fall in the middle of a line
        texts = []
        for start in range(0, size, step):
            piece = Piece("train", 0, str(path), fmt, "range", start, min(size, start + step), 0, step)
            texts += [text for _, text in corpus_files.iter_piece(piece, "text")]
        assert texts == lines, step


def test_malformed_line_inside_a_workers_range_names_file_and_line(assets, tokenizer, tmp_path):
    lines = assets["small"].read_text().splitlines()
    lines[613] = '{"text": broken'
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as raised:
        build([path], tmp_path / "cache", tokenizer, 3)
    assert str(raised.value) == f"{path}:614: malformed JSON (Expecting value at column 10); fix or remove that line"
    lines[613] = '{"content": "no text field"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"{path}:614: no 'text' field"):
        build([path], tmp_path / "cache", tokenizer, 2)
    # Fixed: the two failed builds' pieces (each under its own key) are removed once their launches have had time
    # to read the error; only the finished cache is left.
    lines[613] = '{"text": "fixed"}'
    path.write_text("\n".join(lines) + "\n")
    failed = sorted((tmp_path / "cache").glob("*.build"))
    assert len(failed) == 2
    for error in (tmp_path / "cache").glob("*.build/*.error"):
        os.utime(error, (time.time() - 60, time.time() - 60))
    packed = build([path], tmp_path / "cache", tokenizer, 2)
    assert os.listdir(tmp_path / "cache") == [Path(packed.stats["cache_dir"]).name]


def cli(assets, cache, workers=1, **env):
    return [sys.executable, str(ROOT / "data_utils.py"), "--train_files", str(assets["small"]), "--tokenizer_name",
            str(assets["tokenizer"]), "--block_size", "32", "--preprocessing_num_workers", str(workers),
            "--data_cache_dir", str(cache)], dict(os.environ, **env)


def stats_of(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_rerun_after_sigkill_redoes_only_unfinished_pieces_and_gives_the_same_bytes(assets, tmp_path):
    reference = stats_of(subprocess.run(cli(assets, tmp_path / "straight", 2)[0], capture_output=True, text=True,
                                        timeout=120))
    command, env = cli(assets, tmp_path / "cache", 1, PRETRAIN_LOOP_TEST_BUILD_DELAY="0.7")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "cache" / (Path(reference["cache_dir"]).name + ".build")
    deadline = time.time() + 60
    while len(list(folder.glob("0*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(process, signal.SIGKILL)
    process.wait()
    time.sleep(0.2)
    done = sorted(p.name for p in folder.glob("0*.json"))
    assert 2 <= len(done) < reference["shards"]
    rerun = stats_of(subprocess.run(cli(assets, tmp_path / "cache", 2)[0], capture_output=True, text=True,
                                    timeout=120))
    assert rerun["shards_reused"] == len(done) and not rerun["cache_hit"]
    assert rerun["tokens_per_s"] * rerun["seconds"] < 0.9 * rerun["tokens"]  # the reused pieces' tokens not counted
    assert Path(rerun["cache_dir"], "train.npy").read_bytes() == Path(reference["cache_dir"], "train.npy").read_bytes()
    assert Path(rerun["cache_dir"], "validation.npy").read_bytes() == \
        Path(reference["cache_dir"], "validation.npy").read_bytes()
    assert sorted(os.listdir(tmp_path / "cache")) == [Path(rerun["cache_dir"]).name]  # build folder removed


@pytest.mark.slow
def test_two_concurrent_builders_of_one_cache(assets, tmp_path):
    reference = stats_of(subprocess.run(cli(assets, tmp_path / "straight", 2)[0], capture_output=True, text=True,
                                        timeout=120))
    command, env = cli(assets, tmp_path / "cache", 1, PRETRAIN_LOOP_TEST_BUILD_DELAY="0.3")
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = []
    for process in processes:  # communicate, not wait: a builder blocked on a full pipe would never end
        out, err = process.communicate(timeout=120)
        results.append(stats_of(subprocess.CompletedProcess(process.args, process.returncode, out, err)))
    assert {r["cache_dir"] for r in results} == {str(tmp_path / "cache" / Path(reference["cache_dir"]).name)}
    assert sum(r["cache_hit"] for r in results) <= 1
    train = Path(results[0]["cache_dir"], "train.npy").read_bytes()
    assert train == Path(reference["cache_dir"], "train.npy").read_bytes()
    assert sorted(os.listdir(tmp_path / "cache")) == [Path(reference["cache_dir"]).name]  # no half-written folder
    for key in ("blocks", "validation_blocks", "tokens", "documents"):
        assert results[0][key] == results[1][key] == reference[key]


def test_a_claim_whose_owner_died_is_taken_over(tmp_path):
    claim = tmp_path / "000001.claim"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim.write_text(f"{cache_claims.HOST} {dead.pid}")
    assert cache_claims.try_claim(claim) and claim.read_text() == f"{cache_claims.HOST} {os.getpid()}"
    assert not cache_claims.try_claim(claim)  # held by a live process: this one
    other_host = tmp_path / "000002.claim"
    other_host.write_text("another-host 1")
    assert not cache_claims.try_claim(other_host)  # alive as long as it is touched
    os.utime(other_host, (time.time() - 120, time.time() - 120))
    assert cache_claims.try_claim(other_host)


@pytest.mark.slow
def test_cli_reports_throughput_and_peak_memory(assets, tmp_path):
    stats = stats_of(subprocess.run(cli(assets, tmp_path, 2)[0], capture_output=True, text=True, timeout=120))
    assert stats["tokens_per_s"] > 0 and 0 < stats["peak_rss_gb"] < 4


def test_epoch_order_is_unchanged_and_never_a_list_of_every_block():
    sampler = data_utils.EpochShuffledSampler(num_blocks=1000, global_batch_blocks=8, seed=3)
    sampler.set_epoch(2)
    generator = torch.Generator().manual_seed(3 * 100_003 + 2)
    assert list(sampler) == torch.randperm(1000, generator=generator)[:1000].tolist()  # the order resumes rely on

    big = data_utils.EpochShuffledSampler(num_blocks=5_000_000, global_batch_blocks=8, seed=3)
    tracemalloc.start()
    iterator = iter(big)
    first = [next(iterator) for _ in range(1000)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(set(first)) == 1000 and peak < 20 * 2**20  # a list of 5 M ints would take about 180 MB


def test_relative_cache_dir(assets, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the workers run elsewhere: the folder they are given must be absolute
    built = build([assets["small"]], "relative_cache", tokenizer, 2)
    assert built.stats["cache_dir"].startswith(str(tmp_path / "relative_cache")) and len(built.train) > 0
