"""The blend index of a mixture at the chapter's scale: 5 sources totalling 5 M blocks of 2048 tokens (10 B tokens).

Each row runs in a fresh process, which reports its wall time and its peak memory above what it held after its
imports (ru_maxrss). The sources are memory-mapped int32 arrays of the full shape, written as sparse files (a 2048-
token block reads as zeros): what is measured is the index and the loader, not a disk.

    python bench/mixture_index.py [--blocks 5000000] [--resume_at 4000000]

Rows:
  blend, decimal weights     the index for weights 0.45/0.25/0.15/0.10/0.05: one period (20 positions)
  blend, 7-digit weights     weights whose common denominator (10^7) exceeds the run: the index of all 5 M positions
  every position of the run  the (source, block) of all 5 M positions, as the epochs' samplers compute them
  first batch, resume at 4 M the first micro-batch of a launch resumed at block 4 M (the DataLoader skipping 4 M blocks
                             by index, as the loop does), for the mixture, for the 7-digit one (whose index starts
                             from the counts its checkpoint holds), and for one corpus of the same 5 M blocks
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARES = [0.50, 0.25, 0.15, 0.08, 0.02]  # of the blocks, per source
DECIMAL = ["0.45", "0.25", "0.15", "0.10", "0.05"]
SEVEN_DIGITS = ["0.4512345", "0.2487651", "0.1500001", "0.1000002", "0.0500001"]
BLOCK_SIZE, MICRO_BATCH, GLOBAL_BATCH = 2048, 4, 64  # the chapter: 2 GPUs x 4 blocks x 8 accumulation steps


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def sources(folder: Path, total: int) -> list:
    """Memory-mapped (blocks, 2048) int32 arrays, sparse on disk."""
    import numpy as np

    arrays = []
    for index, share in enumerate(SHARES):
        path = folder / f"source{index}.npy"
        if not path.exists():
            np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(int(total * share), BLOCK_SIZE)).flush()
        arrays.append(np.load(path, mmap_mode="r"))
    return arrays


def mixture_of(arrays, weights):
    from pretrain.base.arguments import MixtureSource
    from pretrain.data.mixture import Mixture

    specs = [MixtureSource(f"source{i}", Fraction(w), []) for i, w in enumerate(weights)]
    return Mixture(specs, arrays, seed=42, epoch_source="source0")


def measure(row: str, folder: Path, total: int, resume_at: int, reads: dict | None) -> dict:
    import numpy as np

    arrays = sources(folder, total)
    import data_utils
    from accelerate import skip_first_batches

    from pretrain.data.mixture import resume_mixture

    baseline, start = rss_bytes(), time.perf_counter()
    if row in ("decimal", "seven_digits"):  # the index as far as the run's last position, as a resume there builds it
        mixture = mixture_of(arrays, DECIMAL if row == "decimal" else SEVEN_DIGITS)
        mixture.blend.extend(total)
        size = len(mixture.blend.picks)
    elif row == "every_position":
        mixture = mixture_of(arrays, DECIMAL)
        for chunk in range(0, total, 2**16):
            mixture.locate(np.arange(chunk, min(chunk + 2**16, total), dtype=np.int64))
        size = len(mixture.blend.picks)
    elif row == "reads_at_resume":  # what a checkpoint at the resume position holds (not timed)
        return {"reads": mixture_of(arrays, SEVEN_DIGITS).reads(resume_at)}
    else:
        if row == "resume_mixture":
            data = mixture_of(arrays, DECIMAL)
        elif row == "resume_seven_digits":
            data = mixture_of(arrays, SEVEN_DIGITS)
            resume_mixture(data, {**data.identity(), "origin": 0, "origin_reads": dict.fromkeys(data.names, 0),
                                  "position": resume_at, "reads": reads}, resume_at)
        else:  # one corpus of the same 5 M blocks
            path = folder / "one.npy"
            if not path.exists():
                np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(total, BLOCK_SIZE)).flush()
            data = np.load(path, mmap_mode="r")
        loader = data_utils.build_train_dataloader(data, MICRO_BATCH, GLOBAL_BATCH, seed=42)
        batch = next(iter(skip_first_batches(loader, resume_at // MICRO_BATCH)))
        assert tuple(batch["input_ids"].shape) == (MICRO_BATCH, BLOCK_SIZE)
        size = None
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_mb": max(0, peak - baseline) / 2**20, "index_positions": size}


ROWS = [("decimal", "blend, decimal weights (one period)"),
        ("seven_digits", "blend, 7-digit weights (every position)"),
        ("every_position", "(source, block) of every position"),
        ("resume_mixture", "first batch, resume at block 4 M: mixture"),
        ("resume_seven_digits", "first batch, resume at block 4 M: 7-digit weights"),
        ("resume_one_corpus", "first batch, resume at block 4 M: one corpus")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5_000_000)
    parser.add_argument("--resume_at", type=int, default=4_000_000)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--reads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:  # one row, in this fresh process
        reads = json.loads(args.reads) if args.reads else None
        print(json.dumps(measure(args.row, Path(args.folder), args.blocks, args.resume_at, reads)))
        return
    with tempfile.TemporaryDirectory(prefix="mixture_bench_") as folder:
        print(f"5 sources ({', '.join(f'{s:.0%}' for s in SHARES)} of {args.blocks:,} blocks of {BLOCK_SIZE} tokens), "
              f"micro-batch {MICRO_BATCH}, global batch {GLOBAL_BATCH}")
        print(f"| {'what':<50} | {'seconds':>8} | {'peak MB':>8} | {'index entries':>13} |")
        print(f"|{'-' * 52}|{'-' * 10}|{'-' * 10}|{'-' * 15}|")
        def run(row: str, *extra: str) -> dict:
            result = subprocess.run([sys.executable, __file__, "--row", row, "--folder", folder, "--blocks",
                                     str(args.blocks), "--resume_at", str(args.resume_at), *extra],
                                    capture_output=True, text=True, check=True)
            return json.loads(result.stdout.strip().splitlines()[-1])

        reads = json.dumps(run("reads_at_resume")["reads"])
        for row, title in ROWS:
            numbers = run(row, "--reads", reads)
            entries = f"{numbers['index_positions']:,}" if numbers["index_positions"] is not None else "-"
            print(f"| {title:<50} | {numbers['seconds']:>8.2f} | {numbers['peak_mb']:>8.0f} | {entries:>13} |",
                  flush=True)


if __name__ == "__main__":
    main()
