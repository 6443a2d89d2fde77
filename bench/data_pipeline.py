"""data_utils.prepare_data against the reference chapter's preprocessing, on the same generated corpus.

The chapter's pipeline, re-implemented here from its description (section 6.1.3): `datasets` JSON loading,
`tokenizer(...)` in a batched `datasets.map` with `num_proc` (keeping attention_mask), packing by chaining
Python lists in 40,000-document batches, and `labels` stored as a copy of `input_ids`; no EOS between
documents. Each side runs in a fresh process twice: cold (empty cache) and warm (cache present).

    python bench/data_pipeline.py [--documents 70000] [--workers 2] [--block_size 2048] [--tokenizer_name NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_utils  # noqa: E402


def ours(corpus: str, tokenizer, cache: str, workers: int, block_size: int) -> int:
    args = data_utils.DataArguments(train_files=[corpus], block_size=block_size, data_cache_dir=cache,
                                    preprocessing_num_workers=workers, validation_split_percentage=0)
    packed = data_utils.prepare_data(args, tokenizer)
    return int(packed.stats["tokens"])


def ours_with_datasets_map(corpus: str, tokenizer, cache: str, workers: int, block_size: int) -> int:
    """Our EOS + numpy packing and .npy cache, but tokenized by a batched datasets.map with num_proc."""
    import datasets
    import numpy as np

    datasets.disable_progress_bars()
    raw = datasets.load_dataset("json", data_files=corpus, cache_dir=cache)["train"]
    ids = raw.map(lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
                  batched=True, num_proc=workers, remove_columns=raw.column_names)["ids"]
    stream, _ = data_utils.join_with_eos(ids, tokenizer.eos_token_id, data_utils.token_dtype(len(tokenizer)))
    blocks, _ = data_utils.pack_blocks(stream, block_size)
    np.save(Path(cache) / "blocks.npy", blocks)
    return len(stream)


def chapter(corpus: str, tokenizer, cache: str, workers: int, block_size: int) -> int:
    import datasets

    datasets.disable_progress_bars()
    raw = datasets.load_dataset("json", data_files=corpus, cache_dir=cache)
    columns = list(raw["train"].features)

    def tokenize(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = len(concatenated["input_ids"]) // block_size * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = raw.map(tokenize, batched=True, num_proc=workers, remove_columns=columns, load_from_cache_file=True)
    packed = tokenized.map(group_texts, batched=True, num_proc=workers, batch_size=40000, load_from_cache_file=True)
    return sum(len(ids) for ids in tokenized["train"]["input_ids"]) if len(packed["train"]) else 0


PIPELINES = {"data_utils (ours)": ours, "ours, tokenized by datasets.map": ours_with_datasets_map,
             "chapter (datasets.map + chain)": chapter}


def one_run(name: str, corpus: str, tokenizer_name: str, cache: str, workers: int, block_size: int) -> dict:
    """Times the pipeline from raw files to packed blocks (or from its cache); imports and tokenizer loading
    are outside the timing for both sides."""
    import datasets  # noqa: F401
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    start = time.perf_counter()
    tokens = PIPELINES[name](corpus, tokenizer, cache, workers, block_size)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + \
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "tokens": tokens, "peak_rss_gb": peak_kib / 2**20}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=75000, help="generated documents (about 160 bytes each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--tokenizer_name", default=None, help="default: the demo tokenizer trained on the corpus")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        print(json.dumps(one_run(options.one, **json.loads(options.job))))
        return
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        corpus = data_utils.write_demo_corpus(work / "corpus.jsonl", documents=options.documents, seed=11)
        tokenizer_name = options.tokenizer_name or str(data_utils.ensure_demo_assets(work / "demo")[1])
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB, {options.documents} documents; tokenizer "
              f"{Path(tokenizer_name).name}; {options.workers} workers; block {options.block_size}")
        rows = {}
        for name in PIPELINES:
            cache = work / f"cache_{len(rows)}"
            job = json.dumps({"corpus": str(corpus), "tokenizer_name": tokenizer_name, "cache": str(cache),
                              "workers": options.workers, "block_size": options.block_size})
            runs = []
            for _ in ("cold", "warm"):
                env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
                output = subprocess.run([sys.executable, __file__, "--one", name, "--job", job], env=env,
                                        check=True, capture_output=True, text=True, cwd=ROOT).stdout
                runs.append(json.loads(output.strip().splitlines()[-1]))
            cold, warm = runs
            rows[name] = {"tokens_per_s": cold["tokens"] / cold["seconds"], "cold_s": cold["seconds"],
                          "warm_s": warm["seconds"], "rss": cold["peak_rss_gb"],
                          "bytes_per_token": folder_bytes(cache) / cold["tokens"], "tokens": cold["tokens"]}
    ours_row, chapter_row = rows["data_utils (ours)"], rows["chapter (datasets.map + chain)"]
    print("| pipeline | tokens | tokens/s (cold) | cold s | warm load s | warm/cold | peak RSS GB | cache B/token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['tokens']:,} | {row['tokens_per_s']:,.0f} | {row['cold_s']:.2f} | "
              f"{row['warm_s']:.3f} | {row['warm_s'] / row['cold_s']:.1%} | {row['rss']:.2f} | "
              f"{row['bytes_per_token']:.2f} |")
    print(f"ours / chapter: {ours_row['tokens_per_s'] / chapter_row['tokens_per_s']:.2f}x tokens/s, "
          f"{ours_row['bytes_per_token'] / chapter_row['bytes_per_token']:.3f}x cache bytes per token "
          f"(ours counts one EOS per document, which the chapter does not add)")


if __name__ == "__main__":
    main()
