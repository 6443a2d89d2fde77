"""data_utils: exact packing, dtype, cache hits and invalidation, global order, skipping, bad input."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import data_utils
from pretrain.data import demo_corpus
from data_utils import DataArguments, DataError
from conftest import ROOT


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets["tokenizer"])


def args_for(files, cache_dir, **overrides):
    values = dict(train_files=[str(f) for f in files], data_cache_dir=str(cache_dir), block_size=32,
                  validation_split_percentage=0)
    values.update(overrides)
    return DataArguments(**values)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_packing_is_exact(assets, tokenizer, tmp_path):
    texts = [json.loads(line)["text"] for line in assets["small"].read_text().splitlines()]
    packed = data_utils.prepare_data(args_for([assets["small"]], tmp_path, block_size=50), tokenizer)
    expected = np.concatenate([tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                               for t in texts])
    stats = packed.stats
    assert stats["documents"] == len(texts) and stats["tokens"] == len(expected)
    assert stats["blocks"] == len(expected) // 50 and stats["dropped_tokens"] == len(expected) % 50
    kept = np.asarray(packed.train).reshape(-1)
    np.testing.assert_array_equal(np.concatenate([kept, expected[len(kept):]]), expected)
    assert (kept == tokenizer.eos_token_id).sum() >= stats["blocks"] * 50 // 60  # EOS separates the documents


def test_validation_split_holds_out_whole_documents(assets, tokenizer, tmp_path):
    args = args_for([assets["small"]], tmp_path, block_size=16, validation_split_percentage=10)
    packed = data_utils.prepare_data(args, tokenizer, seed=3)
    train_tokens, validation_tokens = np.asarray(packed.train).size, np.asarray(packed.validation).size
    assert validation_tokens > 0 and train_tokens > 5 * validation_tokens
    again = data_utils.prepare_data(args_for([assets["small"]], tmp_path / "other", block_size=16,
                                             validation_split_percentage=10), tokenizer, seed=3)
    np.testing.assert_array_equal(packed.validation, again.validation)  # deterministic given the seed
    other_seed = data_utils.prepare_data(args, tokenizer, seed=4)
    assert not np.array_equal(np.asarray(other_seed.validation)[:1], np.asarray(packed.validation)[:1])


def test_dtype_is_the_narrowest_that_fits(assets, tokenizer, tmp_path):
    assert data_utils.token_dtype(387) == np.uint16
    assert data_utils.token_dtype(65_536) == np.uint16
    assert data_utils.token_dtype(65_537) == np.int32
    assert data_utils.token_dtype(151_936) == np.int32
    packed = data_utils.prepare_data(args_for([assets["small"]], tmp_path), tokenizer)
    assert packed.train.dtype == np.uint16 and packed.stats["dtype"] == "uint16"
    # No mask, no labels: the blocks, their stats, and the key they were built for.
    assert sorted(os.listdir(packed.stats["cache_dir"])) == ["key.json", "meta.json", "train.npy"]


def test_cache_hit_and_invalidation(assets, tokenizer, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(assets["small"].read_text())
    cache = tmp_path / "cache"
    first = data_utils.prepare_data(args_for([corpus], cache), tokenizer)
    second = data_utils.prepare_data(args_for([corpus], cache), tokenizer)
    assert not first.stats["cache_hit"] and second.stats["cache_hit"]
    assert second.stats["cache_dir"] == first.stats["cache_dir"]
    np.testing.assert_array_equal(first.train, second.train)

    changed_block = data_utils.prepare_data(args_for([corpus], cache, block_size=48), tokenizer)
    assert not changed_block.stats["cache_hit"]

    other_dir = tmp_path / "tok2"
    demo_corpus.train_demo_tokenizer(assets["small"], other_dir, vocab_size=300)
    changed_tokenizer = data_utils.prepare_data(args_for([corpus], cache), AutoTokenizer.from_pretrained(other_dir))
    assert not changed_tokenizer.stats["cache_hit"]

    with open(corpus, "a") as handle:
        handle.write(json.dumps({"text": "one more document about alice and 3 maps."}) + "\n")
    changed_file = data_utils.prepare_data(args_for([corpus], cache), tokenizer)
    assert not changed_file.stats["cache_hit"]
    assert changed_file.stats["documents"] == first.stats["documents"] + 1
    assert len({first.stats["cache_dir"], changed_block.stats["cache_dir"], changed_tokenizer.stats["cache_dir"],
                changed_file.stats["cache_dir"]}) == 4


@pytest.mark.parametrize("damage", ["truncated train.npy", "meta.json disagrees", "unreadable meta.json"])
def test_damaged_cache_is_rebuilt_with_a_warning(assets, tokenizer, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    built = data_utils.prepare_data(args_for([assets["small"]], cache), tokenizer)
    folder = Path(built.stats["cache_dir"])
    reference = np.array(built.train)  # a fresh build is memory-mapped too: read it before damaging the file
    if damage == "truncated train.npy":
        os.truncate(folder / "train.npy", (folder / "train.npy").stat().st_size // 2)
    elif damage == "meta.json disagrees":
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "blocks": meta["blocks"] + 1}))
    else:
        (folder / "meta.json").write_text('{"blocks": ')
    rebuilt = data_utils.prepare_data(args_for([assets["small"]], cache), tokenizer)
    assert not rebuilt.stats["cache_hit"] and f"data cache {folder} is damaged" in caplog.text
    np.testing.assert_array_equal(rebuilt.train, reference)
    assert data_utils.prepare_data(args_for([assets["small"]], cache), tokenizer).stats["cache_hit"]


def test_unwritable_cache_dir_is_refused_before_tokenizing(assets, tokenizer, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(DataError, match=f"--data_cache_dir {a_file / 'cache'}: cannot write there"):
        data_utils.prepare_data(args_for([assets["small"]], a_file / "cache"), tokenizer)


def test_formats_give_the_same_blocks(assets, tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in assets["small"].read_text().splitlines()][:200]
    files = {
        "a.jsonl": None, "a.jsonl.gz": None, "a.json": None, "a.json.gz": None, "a.txt": None, "a.txt.gz": None,
        "a.parquet": None,
    }
    jsonl = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    array = json.dumps([{"text": t} for t in texts])
    txt = "\n".join(texts) + "\n"
    for name in files:
        path = tmp_path / name
        content = jsonl if ".jsonl" in name else array if ".json" in name else txt
        if name.endswith(".parquet"):
            pq.write_table(pa.table({"text": texts}), path)
        elif name.endswith(".gz"):
            path.write_bytes(gzip.compress(content.encode()))
        else:
            path.write_text(content)
        files[name] = np.asarray(data_utils.prepare_data(args_for([path], tmp_path / "c"), tokenizer).train)
    reference = files["a.jsonl"]
    for name, blocks in files.items():
        np.testing.assert_array_equal(blocks, reference, err_msg=name)
    both = data_utils.prepare_data(args_for([tmp_path / "a.*l"], tmp_path / "c"), tokenizer)  # glob: .jsonl only
    assert both.stats["documents"] == 200


def test_same_global_order_on_one_and_two_processes(assets, tokenizer, tmp_path):
    from accelerate.data_loader import prepare_data_loader

    blocks = np.asarray(data_utils.prepare_data(args_for([assets["small"]], tmp_path), tokenizer).train)
    global_batch = 8

    def optimizer_steps(num_processes, micro_batch, accumulation, epoch):
        shards = []
        for rank in range(num_processes):
            loader = data_utils.build_train_dataloader(blocks, micro_batch, global_batch, seed=7)
            prepared = prepare_data_loader(loader, num_processes=num_processes, process_index=rank,
                                           put_on_device=False)
            prepared.set_epoch(epoch)
            shards.append([batch["input_ids"] for batch in prepared])
        steps = []
        for step in range(len(shards[0]) // accumulation):
            micro = [shards[r][step * accumulation + a] for a in range(accumulation) for r in range(num_processes)]
            steps.append(sorted(map(tuple, torch.cat(micro).tolist())))
        return steps

    one = optimizer_steps(1, 2, 4, epoch=0)
    two = optimizer_steps(2, 2, 2, epoch=0)
    assert len(one) == len(blocks) // global_batch and one == two
    assert optimizer_steps(1, 8, 1, epoch=0) == one
    assert optimizer_steps(1, 2, 4, epoch=1) != one  # a new shuffle each epoch


def test_skipping_batches_reads_nothing_skipped(assets, tokenizer, tmp_path):
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    blocks = np.asarray(data_utils.prepare_data(args_for([assets["small"]], tmp_path), tokenizer).train)
    reads = []

    class CountingBlocks(data_utils.PackedBlockDataset):
        def __getitems__(self, indices):
            reads.extend(indices)
            return super().__getitems__(indices)

    def loader():
        plain = data_utils.build_train_dataloader(blocks, 2, 4, seed=1)
        plain = torch.utils.data.DataLoader(CountingBlocks(blocks), batch_size=2, sampler=plain.sampler,
                                            drop_last=True, collate_fn=data_utils.collate_blocks)
        return prepare_data_loader(plain, num_processes=1, process_index=0, put_on_device=False)

    full = [batch["input_ids"] for batch in loader()]
    reads.clear()
    skipped = skip_first_batches(loader(), 5)
    first = next(iter(skipped))["input_ids"]
    assert torch.equal(first, full[5])
    assert len(reads) <= 4  # the first kept batch and one look-ahead: none of the 10 skipped blocks


def test_cli_prints_stats_as_last_line(assets, tmp_path, capsys):
    data_utils.cli(["--train_files", str(assets["small"]), "--tokenizer_name", str(assets["tokenizer"]),
                    "--block_size", "64", "--preprocessing_num_workers", "2", "--data_cache_dir", str(tmp_path)])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("documents", "tokens", "blocks", "dropped_tokens", "skipped_documents", "seconds", "cache_dir"):
        assert key in stats
    assert stats["documents"] == 800 and stats["cache_dir"].startswith(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line that names the file or flag and says what to do
# ---------------------------------------------------------------------------------------------------------------------

def error_of(tokenizer, files, tmp_path, **overrides):
    with pytest.raises(DataError) as raised:
        data_utils.prepare_data(args_for(files, tmp_path / "cache", **overrides), tokenizer)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_glob_matching_nothing(tokenizer, tmp_path):
    message = error_of(tokenizer, [tmp_path / "missing/*.jsonl"], tmp_path)
    assert "--train_files" in message and "matches no file" in message
    (tmp_path / "shards").mkdir()
    assert f"pass a glob such as '{tmp_path}/shards/*.jsonl'" in error_of(tokenizer, [tmp_path / "shards"], tmp_path)


def test_unknown_format(tokenizer, tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n")
    message = error_of(tokenizer, [path], tmp_path)
    assert str(path) in message and "unknown format" in message and ".jsonl" in message


def test_unreadable_file(tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"this is not gzip")
    message = error_of(tokenizer, [path], tmp_path)
    assert str(path) in message and "cannot be read" in message
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"PAR1 nonsense")
    assert str(parquet) in error_of(tokenizer, [parquet], tmp_path)


def test_malformed_json_line(tokenizer, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n')
    message = error_of(tokenizer, [path], tmp_path)
    assert f"{path}:3" in message and "malformed JSON" in message


def test_missing_text_column_lists_columns(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [])
    path.write_text('{"content": "a", "id": 1}\n')
    message = error_of(tokenizer, [path], tmp_path)
    assert "'text'" in message and "content, id" in message and "--text_column" in message


def test_null_and_non_string_text_are_skipped_and_counted(assets, tokenizer, tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = assets["small"].read_text().splitlines()[:100]
    path.write_text("\n".join(lines + ['{"text": null}', '{"text": 17}', '{"text": ""}']) + "\n")
    packed = data_utils.prepare_data(args_for([path], tmp_path), tokenizer)
    assert packed.stats["skipped_documents"] == 3 and packed.stats["documents"] == 100
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text('{"text": null}\n{"text": 5}\n')
    message = error_of(tokenizer, [only_bad], tmp_path)
    assert "2 empty, null or non-string" in message and str(only_bad) in message


def test_empty_corpus(tokenizer, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    message = error_of(tokenizer, [path], tmp_path)
    assert str(path) in message and "no usable text" in message


def test_corpus_shorter_than_a_block(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", ["alice has 3 maps."])
    message = error_of(tokenizer, [path], tmp_path, block_size=512)
    assert "fewer than one block of --block_size 512" in message
    n_tokens = len(tokenizer("alice has 3 maps.", add_special_tokens=False)["input_ids"]) + 1
    assert f"has {n_tokens} tokens" in message


def test_a_held_out_share_shorter_than_a_block_names_the_split(assets, tokenizer, tmp_path):
    message = error_of(tokenizer, [assets["tiny"]], tmp_path, block_size=64, validation_split_percentage=0.5)
    assert message.startswith("--validation_split_percentage: the held-out validation documents have ")
    assert message.endswith("fewer than one block of --block_size 64; raise --validation_split_percentage, pass "
                            "--validation_files, or lower --block_size")


def test_tokenizer_without_eos(assets, tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    message = error_of(no_eos, [assets["small"]], tmp_path)
    assert "no EOS token" in message


def test_cli_error_is_one_line(tmp_path):
    """What `python data_utils.py` runs (cli()): the one line is what the process exits with, nothing else raised."""
    with pytest.raises(SystemExit) as exited:
        data_utils.cli(["--train_files", str(tmp_path / "x.jsonl"), "--tokenizer_name", "unused", "--block_size", "8",
                        "--bogus", "1"])
    assert exited.value.code == "error: unrecognized arguments: --bogus 1"


def test_cli_tokenizer_that_cannot_load_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exited:
        data_utils.cli(["--train_files", str(tmp_path / "x.jsonl"), "--tokenizer_name", str(tmp_path / "no_tokenizer"),
                        "--block_size", "8"])
    assert exited.value.code.startswith(f"error: --tokenizer_name {tmp_path / 'no_tokenizer'}: cannot be loaded (")


def test_a_cache_built_beforehand_is_reused_whatever_the_training_seed(assets, tmp_path, capfd):
    """`python data_utils.py` without a seed, then the chapter's --seed 12: one build. --data_seed is what moves the
    split, and a cache that differs from an existing one in that alone says so before building."""
    from conftest import data_stats, run_in_process, tiny_flags

    cache = tmp_path / "cache"
    built = subprocess.run([sys.executable, str(ROOT / "data_utils.py"), "--train_files", str(assets["small"]),
                            "--tokenizer_name", str(assets["tokenizer"]), "--block_size", "64",
                            "--data_cache_dir", str(cache)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-2000:]
    capfd.readouterr()
    run_in_process(tiny_flags(assets, tmp_path / "run", cache, "--seed", 12, "--max_steps", 1))
    assert data_stats(capfd.readouterr().err)["cache_hit"] is True
    run_in_process(tiny_flags(assets, tmp_path / "other_split", cache, "--data_seed", 7, "--max_steps", 1))
    err = capfd.readouterr().err
    assert data_stats(err)["cache_hit"] is False
    assert ("building a new data cache: the cache of these files differs only in the validation split "
            "(--validation_split_percentage, --data_seed): {'percentage': 5.0, 'seed': 42} -> {'percentage': 5.0, "
            "'seed': 7} (the existing cache is ") in err


def test_document_text_cannot_forge_control_tokens(assets, tmp_path):
    """Web text that quotes <|endoftext|>, <|im_start|> or <|im_end|> is encoded as text: the blocks hold one EOS per
    document (the pipeline's) and no other special id; --parse_special_tokens restores parsing, in another cache."""
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    texts = []
    for index in range(90):
        text = f"document {index} says hello to the reader and counts to {index % 7}."
        if index % 3 == 1:
            text += " A page about models: <|endoftext|> ends a text, <|im_start|>user hi<|im_end|> is chat."
        texts.append(text)
    corpus = write_jsonl(tmp_path / "quoting.jsonl", texts)
    packed = data_utils.prepare_data(args_for([corpus], tmp_path / "cache", block_size=32), tokenizer)
    ids = np.asarray(packed.train).ravel()
    eos = tokenizer.eos_token_id
    assert packed.stats["documents_with_special_text"] == 30
    assert packed.stats["dropped_tokens"] > 0  # the corpus's last EOS lies in the dropped remainder
    assert int((ids == eos).sum()) == len(texts) - 1
    others = set(tokenizer.all_special_ids) - {eos}
    assert len(others) == 2 and not np.isin(ids, list(others)).any()
    parsed = data_utils.prepare_data(args_for([corpus], tmp_path / "cache", block_size=32, parse_special_tokens=True),
                                     tokenizer)
    assert parsed.stats["cache_dir"] != packed.stats["cache_dir"]
    parsed_ids = np.asarray(parsed.train).ravel()
    assert int((parsed_ids == eos).sum()) > len(texts) and np.isin(parsed_ids, list(others)).any()
