"""--dataset_name: a local dataset folder whose README names Parquet and JSON Lines shards per config, save_to_disk
folders, and a Hub id that cannot be reached, all through the same build as --train_files."""

import json
import time

import numpy as np
import pytest
from conftest import data_stats, run_in_process, tiny_flags
from transformers import AutoTokenizer

import data_utils
from pretrain.base.arguments import DataArguments
from pretrain.base.errors import DataError

CARD = """---
configs:
- config_name: zh
  data_files:
  - split: train
    path: data/zh-*.jsonl
- config_name: code
  data_files:
  - split: train
    path: data/code-*.parquet
---
# A corpus in two configurations
"""


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets["tokenizer"])


@pytest.fixture(scope="module")
def dataset_folder(assets, tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("dataset")
    (folder / "data").mkdir()
    lines = assets["small"].read_text().splitlines()
    (folder / "data" / "zh-0.jsonl").write_text("\n".join(lines[:400]) + "\n")
    (folder / "data" / "zh-1.jsonl").write_text("\n".join(lines[400:]) + "\n")
    texts = [json.loads(line)["text"] for line in lines[:300]]
    pq.write_table(pa.table({"text": texts}), folder / "data" / "code-0.parquet", row_group_size=100)
    (folder / "README.md").write_text(CARD)
    return folder


def blocks(tokenizer, cache, **data):
    return np.asarray(data_utils.prepare_data(DataArguments(data_cache_dir=str(cache), block_size=32,
                                                            validation_split_percentage=0, **data), tokenizer).train)


def test_a_config_of_a_local_dataset_folder_gives_the_blocks_of_its_files(dataset_folder, tokenizer, tmp_path):
    by_name = blocks(tokenizer, tmp_path / "a", dataset_name=str(dataset_folder), dataset_config_name="zh")
    by_files = blocks(tokenizer, tmp_path / "b", train_files=[str(dataset_folder / "data" / "zh-*.jsonl")])
    assert by_name.shape[0] > 100 and np.array_equal(by_name, by_files)
    parquet = blocks(tokenizer, tmp_path / "c", dataset_name=str(dataset_folder), dataset_config_name="code")
    assert np.array_equal(parquet, blocks(tokenizer, tmp_path / "d",
                                          train_files=[str(dataset_folder / "data" / "code-0.parquet")]))
    with pytest.raises(DataError, match=f"--dataset_name {dataset_folder}: no data files for split 'test'"):
        blocks(tokenizer, tmp_path / "e", dataset_name=str(dataset_folder), dataset_config_name="zh",
               dataset_split="test")


def test_save_to_disk_folders_give_the_blocks_of_the_same_texts(assets, tokenizer, tmp_path):
    import datasets

    lines = assets["small"].read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:50]}),
                          "validation": datasets.Dataset.from_dict({"text": texts[50:]})}).save_to_disk(
        tmp_path / "saved_dict")
    expected = blocks(tokenizer, tmp_path / "a", train_files=[str(assets["small"])])
    assert np.array_equal(blocks(tokenizer, tmp_path / "b", dataset_name=str(tmp_path / "saved")), expected)
    split = blocks(tokenizer, tmp_path / "c", dataset_name=str(tmp_path / "saved_dict"), dataset_split="validation")
    assert 0 < split.shape[0] < expected.shape[0]
    with pytest.raises(DataError, match="no split 'test' \\(it has train, validation\\); pass --dataset_split"):
        blocks(tokenizer, tmp_path / "d", dataset_name=str(tmp_path / "saved_dict"), dataset_split="test")


@pytest.mark.parametrize("offline", ["1", "0"])
def test_a_hub_id_that_cannot_be_reached_is_one_line_within_seconds(tokenizer, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # unreachable whatever the machine's network
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"^--dataset_name someorg/somecorpus: cannot reach the Hub .* and there is "
                                        r"no such folder here; pass a local folder or --train_files$"):
        blocks(tokenizer, tmp_path, dataset_name="someorg/somecorpus")
    assert time.perf_counter() - start < 10


def test_a_run_trains_on_a_dataset_by_name_with_train_files_beside_it(assets, dataset_folder, tmp_path, capfd):
    argv = tiny_flags(assets, tmp_path / "run", tmp_path / "cache", "--dataset_name", dataset_folder,
                      "--dataset_config_name", "code", "--max_steps", 2)
    capfd.readouterr()
    run_in_process(argv)
    both = data_stats(capfd.readouterr().err)
    assert both["documents"] == 800 + 300  # --train_files (the small corpus) and the dataset's config
