"""The data build under `accelerate launch`: both ranks build, nobody waits in a collective, so a first build slower
than --ddp_timeout still completes and trains, with the blocks of a one-process build."""

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import data_utils
from conftest import launch, read_metrics, tiny_flags

pytestmark = pytest.mark.slow  # every test here launches training processes


def test_zero2_build_slower_than_the_ddp_timeout_completes_and_trains(assets, tmp_path, monkeypatch):
    # 7 pieces of the small corpus, 1 worker per rank, 2.5 s each: about 10 s of building, twice the timeout.
    monkeypatch.setenv("PRETRAIN_LOOP_TEST_BUILD_DELAY", "2.5")
    cache = tmp_path / "cache"
    result = launch("zero2.yaml", 2, tiny_flags(assets, tmp_path / "out", cache, "--max_steps", 3,
                                                "--ddp_timeout", 5, "--eval_strategy", "no"))
    train, _ = read_metrics(tmp_path / "out")
    assert sorted(train) == [1, 2, 3]
    assert '"cache_hit": false' in result.stderr  # the data line of a build
    (key,) = [p for p in cache.iterdir()]
    monkeypatch.delenv("PRETRAIN_LOOP_TEST_BUILD_DELAY")
    args = data_utils.DataArguments(train_files=[str(assets["small"])], block_size=64,
                                    data_cache_dir=str(tmp_path / "one"), preprocessing_num_workers=1)
    one = data_utils.prepare_data(args, AutoTokenizer.from_pretrained(assets["tokenizer"]), seed=42)
    assert Path(one.stats["cache_dir"]).name == key.name
    np.testing.assert_array_equal(np.load(key / "train.npy"), one.train)
    np.testing.assert_array_equal(np.load(key / "validation.npy"), one.validation)
