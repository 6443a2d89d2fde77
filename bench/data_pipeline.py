"""data_utils.prepare_data against the reference chapter's preprocessing, datatrove and the tokenizer alone; the
build's memory at 1x and 8x of a corpus, its scaling with worker processes, a large-vocabulary CJK case, and the
start-up of training on a (sparse, faked) 10-billion-token cache. One run prints every table.

The chapter's pipeline, re-implemented here from its description (section 6.1.3): `datasets` JSON loading,
`tokenizer(...)` in a batched `datasets.map` with `num_proc` (keeping attention_mask), packing by chaining
Python lists in 40,000-document batches, and `labels` stored as a copy of `input_ids`; no EOS between
documents. Every measurement runs in a fresh process (cold: empty cache; warm: cache present).

    pip install -r bench/requirements.txt     # datatrove, for its row (skipped, with a line, without it)
    python bench/data_pipeline.py [--documents 75000] [--workers 2] [--block_size 2048] [--cjk_documents 150000] \
        [--cjk_vocab_size 151936] [--repeats 3] [--sections cjk] [--counts 2] [--no-baselines]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

# DATA_BENCH_ROOT: measure another checkout's data_utils with this script (set by --compare_with, never by hand)
ROOT = Path(os.environ.get("DATA_BENCH_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

import data_utils  # noqa: E402
from pretrain.data import demo_corpus  # noqa: E402
from pretrain.data.corpus_cache import load_cache  # noqa: E402


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
    documents = raw.map(lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
                        batched=True, num_proc=workers, remove_columns=raw.column_names)["ids"]
    dtype = data_utils.token_dtype(len(tokenizer))
    pieces = [np.asarray(ids + [tokenizer.eos_token_id], dtype=dtype) for ids in documents]
    stream = np.concatenate(pieces)
    blocks = len(stream) // block_size
    np.save(Path(cache) / "blocks.npy", stream[: blocks * block_size].reshape(blocks, block_size))
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


def ours_before(corpus: str, tokenizer, cache: str, workers: int, block_size: int) -> int:
    """data_utils.py as it was before the streamed build (commit EARLIER_BUILD): the Rust encoder's threads, in
    memory."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_utils_before", Path(cache).parent / "data_utils_before.py")
    before = sys.modules["data_utils_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)  # the copy main() wrote from git

    args = before.DataArguments(train_files=[corpus], block_size=block_size, data_cache_dir=cache,
                                preprocessing_num_workers=workers, validation_split_percentage=0)
    return int(before.prepare_data(args, tokenizer).stats["tokens"])


def encoder_alone(corpus: str, tokenizer, cache: str, workers: int, block_size: int) -> int:
    """The Rust batch encoder over texts already in memory, with `workers` threads: the floor for any build."""
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    for offset in range(0, len(texts), 10_000):
        encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts[offset: offset + 10_000],
                                                                  add_special_tokens=False)
        tokens += sum(len(encoding.ids) for encoding in encodings) + len(encodings)
    globals()["_seconds_override"] = time.perf_counter() - start  # reading the texts is not the encoder's time
    globals()["_cpu_override"] = cpu_seconds() - cpu
    return tokens


def datatrove_tokenizer(corpus: str, tokenizer, cache: str, workers: int, block_size: int) -> int:
    """datatrove's JsonlReader + DocumentTokenizer (EOS appended, no shuffling) in `workers` local tasks; it
    splits work by file, so the corpus is given as `workers` files (written before the timing starts)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    inputs = Path(cache) / "inputs"
    inputs.mkdir(parents=True)
    lines = Path(corpus).read_text(encoding="utf-8").splitlines(keepends=True)
    for part in range(workers):
        (inputs / f"part{part}.jsonl").write_text("".join(lines[part::workers]), encoding="utf-8")
    tokenizer_file = Path(cache) / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(tokenizer_file))
    start, cpu = time.perf_counter(), cpu_seconds()
    LocalPipelineExecutor(
        [JsonlReader(str(inputs)), DocumentTokenizer(str(Path(cache) / "out"), str(tokenizer_file),
                                                     eos_token=tokenizer.eos_token, shuffle_documents=False)],
        tasks=workers, workers=workers, logging_dir=str(Path(cache) / "logs")).run()
    globals()["_seconds_override"] = time.perf_counter() - start
    globals()["_cpu_override"] = cpu_seconds() - cpu
    token_bytes = 4 if len(tokenizer) > 2**16 else 2
    return sum(p.stat().st_size for p in (Path(cache) / "out").rglob("*.ds")) // token_bytes


EARLIER_BUILD = "87a61fb"  # data_utils.py before the streamed build, where the history has it

SECTIONS = ("chapter", "memory", "scaling", "cjk", "startup")
PIPELINES = {"data_utils (ours)": ours, "ours, tokenized by datasets.map": ours_with_datasets_map,
             "chapter (datasets.map + chain)": chapter, "datatrove DocumentTokenizer": datatrove_tokenizer,
             "tokenizer batch encoder alone": encoder_alone, "data_utils, earlier build": ours_before}


def cpu_seconds() -> float:
    """User and system time of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def one_run(name: str, corpus: str, tokenizer_name: str, cache: str, workers: int, block_size: int) -> dict:
    """Times the pipeline from raw files to packed blocks (or from its cache); imports and tokenizer loading
    are outside the timing for every side. CPU seconds: this process's and its children's over the same span (less
    sensitive than wall time to another load on the machine). Peak RSS: this process, and the largest of its child
    processes."""
    importlib.import_module("datasets")  # imported before the timing, as transformers is
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = PIPELINES[name](corpus, tokenizer, cache, workers, block_size)
    seconds = globals().get("_seconds_override") or time.perf_counter() - start
    cpu = globals().get("_cpu_override") or cpu_seconds() - cpu
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"seconds": seconds, "cpu_s": cpu, "tokens": tokens, "peak_rss_gb": own + child, "own_rss_gb": own,
            "child_rss_gb": child}


def startup(cache_dir: str) -> dict:
    """From a built cache to the first batch of a resume half-way through the epoch, as train_loop does it."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    start = time.perf_counter()
    packed = load_cache(Path(cache_dir))
    loader = data_utils.build_train_dataloader(packed.train, 8, 8, seed=1)
    loader = prepare_data_loader(loader, num_processes=1, process_index=0, put_on_device=False)
    batch = next(iter(skip_first_batches(loader, len(loader) // 2)))
    return {"seconds": time.perf_counter() - start, "blocks": len(packed.train),
            "shape": list(batch["input_ids"].shape),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def fake_cache(folder: Path, tokens: float, block_size: int = 2048) -> Path:
    """A cache of `tokens` int32 tokens whose train.npy is a sparse file: nothing is written but the header."""
    import numpy as np

    folder.mkdir(parents=True)
    blocks = int(tokens) // block_size
    array = np.lib.format.open_memmap(folder / "train.npy", mode="w+", dtype=np.int32, shape=(blocks, block_size))
    del array
    (folder / "meta.json").write_text(json.dumps({"blocks": blocks, "block_size": block_size, "dtype": "int32"}))
    return folder


def cjk_corpus(path: Path, documents: int, seed: int = 0) -> Path:
    """Chinese-like text: Zipf-distributed 'words' of 1-4 characters from 3,500 CJK ideographs, in sentences."""
    import random

    rng = random.Random(seed)
    characters = [chr(code) for code in range(0x4E00, 0x4E00 + 3500)]
    words = ["".join(rng.choice(characters) for _ in range(rng.choice((1, 2, 2, 2, 3, 4)))) for _ in range(30000)]
    cumulative = list(__import__("itertools").accumulate(1 / (rank + 10) for rank in range(len(words))))
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(documents):
            text = "".join("".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(4, 14)))
                           + rng.choice("，。。！？") for _ in range(rng.randint(4, 12)))
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


# Qwen2.5's added tokens after its BPE, in its order; the last eight are not special (matched in text as they are).
QWEN_ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                     "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                     "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                     "<|file_sep|>"]
QWEN_SPECIAL = 14


def cjk_tokenizer(corpus: Path, output_dir: Path, vocab_size: int = 70_000, qwen_added_tokens: bool = False) -> Path:
    """A Qwen2-style byte-level BPE with more than 65,536 entries (so int32 ids), trained on the CJK corpus: Qwen2's
    split pattern, NFC, byte-level. `qwen_added_tokens`: shaped like Qwen's own, its 22 added tokens too (special
    and not, as Qwen2.5 has them) within `vocab_size` entries."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    with open(corpus, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for _, line in zip(range(8000), handle)]
    added = QWEN_ADDED_TOKENS[1:] if qwen_added_tokens else []  # <|endoftext|> is Qwen2Tokenizer's own
    tokenizer = Qwen2Tokenizer().train_new_from_iterator(
        texts, vocab_size=vocab_size - len(added), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": QWEN_ADDED_TOKENS[1:QWEN_SPECIAL]})
        tokenizer.add_tokens([AddedToken(text, special=False, normalized=False)
                              for text in QWEN_ADDED_TOKENS[QWEN_SPECIAL:]])
    tokenizer.save_pretrained(output_dir)
    return output_dir


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


COMPARED = "data_utils at "  # a side "data_utils at PATH": our build as another checkout (--compare_with) has it


def measure(name: str, corpus: Path, tokenizer_name: str, cache: Path, workers: int, block_size: int) -> dict:
    """One fresh process, with `workers` processes or threads of the Rust encoder's pool (for the sides that use it)."""
    job = json.dumps({"corpus": str(corpus), "tokenizer_name": tokenizer_name, "cache": str(cache),
                      "workers": workers, "block_size": block_size})
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true", RAYON_NUM_THREADS=str(workers),
               RAYON_RS_NUM_CPUS=str(workers))
    if name.startswith(COMPARED):
        name, env["DATA_BENCH_ROOT"] = "data_utils (ours)", name.removeprefix(COMPARED)
    output = subprocess.run([sys.executable, __file__, "--one", name, "--job", job], env=env, check=True,
                            capture_output=True, text=True, cwd=env.get("DATA_BENCH_ROOT", ROOT)).stdout
    return json.loads(output.strip().splitlines()[-1])


def machine_idle(limit_s: float, share: float = 0.9) -> bool:
    """Wait, up to `limit_s`, for a second in which the machine's CPUs were at least `share` idle (/proc/stat: a
    load from outside this process tree, which `ps` may not show); whether one came."""
    def idle_and_total() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])

    deadline = time.monotonic() + limit_s
    while True:
        idle, total = idle_and_total()
        time.sleep(1.0)
        idle_after, total_after = idle_and_total()
        if (idle_after - idle) >= share * max(1, total_after - total):
            return True
        if time.monotonic() >= deadline:
            return False


def best_of(repeats: int, sides: list[tuple[str, int]], corpus: Path, tokenizer_name: str, caches, block_size: int,
            wait_idle: float = 0.0) -> dict[tuple[str, int], dict]:
    """Each (pipeline, workers) side measured `repeats` times in rounds, the sides interleaved and their order
    rotated from one round to the next so that a burst of load from elsewhere hits them alike; the fastest run of
    each, with the slowest run's seconds as `slowest_s` and every run's seconds, in round order, as `rounds_s`.
    `wait_idle`: each run first waits up to that long for an idle machine (`busy_starts` counts the runs that did not
    get one)."""
    tries: dict[tuple[str, int], list[dict]] = {side: [] for side in sides}
    for round_index in range(repeats):
        shift = round_index % len(sides)
        for name, workers in sides[shift:] + sides[:shift]:
            quiet = machine_idle(wait_idle) if wait_idle and os.path.exists("/proc/stat") else True
            run = measure(name, corpus, tokenizer_name, next(caches), workers, block_size)
            tries[(name, workers)].append({**run, "busy_start": not quiet})
    return {side: {**min(runs, key=lambda run: run["seconds"]), "slowest_s": max(run["seconds"] for run in runs),
                   "rounds_s": [run["seconds"] for run in runs], "rounds_cpu_s": [run["cpu_s"] for run in runs],
                   "busy_starts": sum(run["busy_start"] for run in runs)} for side, runs in tries.items()}


def rate(run: dict) -> str:
    return f"{run['tokens'] / run['seconds']:,.0f}"


def can_import(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=75000, help="generated documents (about 140 bytes each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--cjk_documents", type=int, default=150000, help="CJK documents (about 540 bytes each; "
                        "150,000 make about 11 M tokens with the default vocabulary)")
    parser.add_argument("--cjk_vocab_size", type=int, default=151936, help="entries of the CJK byte-level BPE "
                        "(default: Qwen's 151,936)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each scaling and CJK side, the sides "
                        "rotated in each; the fastest is shown (this machine's load comes in bursts)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="which tables to print (default: all)")
    parser.add_argument("--counts", type=int, nargs="+", default=None, help="worker counts of the scaling and CJK "
                        "tables (default: 1, 2, --workers, and 4, 8, ... up to the cores)")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="the CJK table's earlier build, chapter and datatrove rows")
    parser.add_argument("--wait_idle", type=float, default=0.0, metavar="SECONDS", help="before each run of the "
                        "scaling and CJK tables, wait up to this long for a second of idle CPUs (a shared machine)")
    parser.add_argument("--compare_with", nargs="+", default=[], metavar="PATH", help="other checkouts of this "
                        "project (git worktree add PATH COMMIT): the build of each is a side of the CJK table, in the "
                        "same rounds")
    parser.add_argument("--tokenizer_name", default=None, help="default: the demo tokenizer trained on the corpus")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--startup", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        print(json.dumps(one_run(options.one, **json.loads(options.job))))
        return
    if options.startup:
        print(json.dumps(startup(options.startup)))
        return
    workers, sections = options.workers, set(options.sections)
    counts = sorted(set(options.counts or [1, 2, workers] + [n for n in (4, 8, 16, 32) if n <= (os.cpu_count() or 1)]))
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as work_dir:
        work = Path(work_dir)
        before = subprocess.run(["git", "show", f"{EARLIER_BUILD}:data_utils.py"], cwd=ROOT, capture_output=True,
                                text=True)
        (work / "data_utils_before.py").write_text(before.stdout)
        if before.returncode and "cjk" in sections and options.baselines:  # a clone whose history lacks that commit
            print(f"the earlier build (commit {EARLIER_BUILD}) is not in this clone's history: its row is skipped")
        caches = iter(work / f"cache_{n}" for n in range(1000))
        if sections - {"cjk"}:
            small_cache = demo_tables(options, sections, work, caches, counts)

        # 5. Large vocabulary, CJK: the tokenizer dominates
        if "cjk" in sections:
            cjk_table(options, work, caches, counts, with_earlier=not before.returncode)

        # 6. Start-up on a 10 B-token cache (sparse) against the small one
        if "startup" in sections:
            fake = fake_cache(work / "fake_10b", 10e9)
            print("\n| start-up: load the cache, build the loader, skip half an epoch, first batch | blocks | "
                  "seconds | peak RSS GB |")
            print("|---|---:|---:|---:|")
            for label, folder in (("small cache (1x corpus)", small_cache), ("10 B tokens (sparse int32 file)", fake)):
                output = subprocess.run([sys.executable, __file__, "--startup", str(folder)], check=True,
                                        capture_output=True, text=True, cwd=ROOT).stdout
                run = json.loads(output.strip().splitlines()[-1])
                print(f"| {label} | {run['blocks']:,} | {run['seconds']:.2f} | {run['peak_rss_gb']:.2f} |")


def demo_tables(options, sections: set[str], work: Path, caches, counts: list[int]) -> Path:
    """Tables 1-4 on the demo corpus; returns the folder of its cache (for the start-up table)."""
    workers, block = options.workers, options.block_size
    corpus = demo_corpus.write_demo_corpus(work / "corpus.jsonl", documents=options.documents, seed=11)
    tokenizer_name = options.tokenizer_name or str(demo_corpus.ensure_demo_assets(work / "demo")[1])
    print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB, {options.documents} documents; tokenizer "
          f"{Path(tokenizer_name).name}; {workers} workers; block {block}; os.cpu_count() = {os.cpu_count()}")

    # 1. Against the chapter (cold and warm)
    rows = {}
    names = ("data_utils (ours)", "ours, tokenized by datasets.map", "chapter (datasets.map + chain)")
    for name in names if "chapter" in sections else names[:1]:
        cache = next(caches)
        cold, warm = (measure(name, corpus, tokenizer_name, cache, workers, block) for _ in ("cold", "warm"))
        rows[name] = {"tokens_per_s": cold["tokens"] / cold["seconds"], "cold_s": cold["seconds"],
                      "warm_s": warm["seconds"], "rss": cold["peak_rss_gb"],
                      "bytes_per_token": folder_bytes(cache) / cold["tokens"], "tokens": cold["tokens"]}
        if name == "data_utils (ours)":
            small_cache = next(p for p in cache.iterdir() if (p / "meta.json").exists())
    if "chapter" in sections:
        print("\n| pipeline | tokens | tokens/s (cold) | cold s | warm load s | warm/cold | peak RSS GB | "
              "cache B/token |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            print(f"| {name} | {row['tokens']:,} | {row['tokens_per_s']:,.0f} | {row['cold_s']:.2f} | "
                  f"{row['warm_s']:.3f} | {row['warm_s'] / row['cold_s']:.1%} | {row['rss']:.2f} | "
                  f"{row['bytes_per_token']:.2f} |")
        ours_row, chapter_row = rows["data_utils (ours)"], rows["chapter (datasets.map + chain)"]
        print(f"ours / chapter: {ours_row['tokens_per_s'] / chapter_row['tokens_per_s']:.2f}x tokens/s, "
              f"{ours_row['bytes_per_token'] / chapter_row['bytes_per_token']:.3f}x cache bytes per token")

    # 2. Memory at 1x and 8x
    if "memory" in sections:
        big = work / "corpus_8x.jsonl"
        big.write_bytes(corpus.read_bytes() * 8)
        runs = {"1x": measure("data_utils (ours)", corpus, tokenizer_name, next(caches), workers, block),
                "8x": measure("data_utils (ours)", big, tokenizer_name, next(caches), workers, block)}
        print(f"\n| build (ours, {workers} workers) | tokens | tokens/s | coordinator peak RSS GB | largest worker "
              f"peak RSS GB |")
        print("|---|---:|---:|---:|---:|")
        for size, run in runs.items():
            print(f"| {size} corpus | {run['tokens']:,} | {rate(run)} | {run['own_rss_gb']:.3f} | "
                  f"{run['child_rss_gb']:.3f} |")
        one, eight = runs["1x"], runs["8x"]
        print(f"8x / 1x peak RSS: coordinator {eight['own_rss_gb'] / one['own_rss_gb']:.3f}, worker "
              f"{eight['child_rss_gb'] / one['child_rss_gb']:.3f} (goal: within 1.10)")

    # 3. Scaling with workers; 4. datatrove
    if "scaling" in sections:
        scaling = best_of(options.repeats, [(name, n) for n in counts for name in (
            "tokenizer batch encoder alone", "data_utils (ours)")], corpus, tokenizer_name, caches, block,
            options.wait_idle)
        print(f"\n| the 1x corpus | N | tokens | seconds (best of {options.repeats}; slowest) | tokens/s | vs N = "
              f"{counts[0]} | peak RSS GB (process + largest child) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for (name, n), run in scaling.items():
            single = scaling[(name, counts[0])]
            print(f"| {name} | {n} | {run['tokens']:,} | {run['seconds']:.2f}; {run['slowest_s']:.2f} | {rate(run)} | "
                  f"{single['seconds'] / run['seconds']:.2f}x | {run['peak_rss_gb']:.2f} |")
        if can_import("datatrove"):
            datatrove = measure("datatrove DocumentTokenizer", corpus, tokenizer_name, next(caches), workers, block)
            print(f"| datatrove | {workers} | {datatrove['tokens']:,} | {datatrove['seconds']:.2f} (one run) | "
                  f"{rate(datatrove)} | - | {datatrove['peak_rss_gb']:.2f} |")
        else:
            print("datatrove is not installed (pip install -r bench/requirements.txt): its row is skipped")
    return small_cache


def cjk_table(options, work: Path, caches, counts: list[int], with_earlier: bool) -> None:
    """Our build against the Rust batch encoder alone (N processes against N threads) on a generated Chinese
    corpus with a large byte-level BPE, in rotated rounds; the ratio of every round's pair beside the best."""
    workers, block = options.workers, options.block_size
    cjk = cjk_corpus(work / "cjk.jsonl", options.cjk_documents)
    cjk_tok = str(cjk_tokenizer(cjk, work / "cjk_tokenizer", options.cjk_vocab_size, qwen_added_tokens=True))
    print(f"\nCJK corpus: {cjk.stat().st_size / 1e6:.1f} MB, {options.cjk_documents} documents; byte-level BPE "
          f"of {options.cjk_vocab_size:,} entries (int32 ids); N worker processes against the encoder's N threads")
    names = ["tokenizer batch encoder alone", "data_utils (ours)"]
    names += [COMPARED + str(Path(path).resolve()) for path in options.compare_with]
    repeated = [(name, n) for n in counts for name in names]
    if with_earlier and options.baselines:
        repeated.append(("data_utils, earlier build", workers))
    cjk_runs = best_of(options.repeats, repeated, cjk, cjk_tok, caches, block, options.wait_idle)
    once = [("chapter (datasets.map + chain)", workers)]
    if can_import("datatrove"):
        once.append(("datatrove DocumentTokenizer", workers))
    elif options.baselines:
        print("datatrove is not installed (pip install -r bench/requirements.txt): its row is skipped")
    if options.baselines:
        cjk_runs.update(best_of(1, once, cjk, cjk_tok, caches, block))
    print(f"| CJK build | N | tokens | seconds (best of {options.repeats}; slowest) | tokens/s | / encoder alone "
          f"(best; slowest) | vs N = {counts[0]} | CPU s (least) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, n), run in cjk_runs.items():
        floor = cjk_runs[("tokenizer batch encoder alone", n)]
        spread = f"; {run['slowest_s']:.2f}" if (name, n) in repeated else " (one run)"
        ratio = f"{run['seconds'] / floor['seconds']:.2f}x" + (
            f"; {run['slowest_s'] / floor['slowest_s']:.2f}x" if (name, n) in repeated else "")
        single = cjk_runs.get((name, counts[0]))
        speedup = f"{single['seconds'] / run['seconds']:.2f}x" if single else "-"
        cpu = min(run.get("rounds_cpu_s") or [run["cpu_s"]])
        print(f"| {name} | {n} | {run['tokens']:,} | {run['seconds']:.2f}{spread} | {rate(run)} | {ratio} | "
              f"{speedup} | {cpu:.1f} |")
    for name, n in repeated:
        if name == "tokenizer batch encoder alone":
            continue
        alone = cjk_runs[("tokenizer batch encoder alone", n)]
        for what, key in (("wall", "rounds_s"), ("CPU", "rounds_cpu_s")):
            ratios = [a / b for a, b in zip(cjk_runs[(name, n)][key], alone[key])]
            print(f"{name}, N = {n}, / encoder alone in each round, {what} time: "
                  + ", ".join(f"{r:.3f}" for r in ratios) + f"; median {statistics.median(ratios):.3f}")
    if options.wait_idle:
        busy = sum(run.get("busy_starts", 0) for run in cjk_runs.values())
        print(f"runs that started without {options.wait_idle:.0f} s of waiting giving an idle second: {busy} of "
              f"{sum(len(run.get('rounds_s', [1])) for run in cjk_runs.values())}")

if __name__ == "__main__":
    main()
