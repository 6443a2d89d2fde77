"""The streaming build of a packed-token cache: pieces of the input tokenized by worker processes into shard files,
then the shards copied, in corpus order, into one memory-mapped array of blocks.

It owns the build folder `<key>.build/` next to the cache folder `<key>/`:

    plan.json, tokenizer.json     what to build (identical whoever writes them)
    NNNNNN.train / .validation    the piece's tokens (EOS after each document), raw, in the cache's dtype
    NNNNNN.json                   written last, by rename: the piece is done (its counts)
    NNNNNN.claim, assemble.claim  who works on it now (see pretrain/data/cache_claims.py)
    NNNNNN.error                  a one-line DataError, for every process that watches the folder

Every process that calls `build` (each rank of a launch, a second job on the same folder) starts its own workers
(`python -m pretrain.data.corpus_build <folder>`, fresh interpreters: no fork after the tokenizer's thread pool started,
no torch import) that claim pieces not done yet; it then waits by watching the folder, never in a collective. A
rerun after a crash redoes only pieces without a `.json`. Whether a document is held out for validation depends on
the seed, its file and its position in the file only, so the bytes do not depend on workers, ranks or piece size.

It must not know about flags beyond what the plan holds, DataLoaders or torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.cache_claims import HOST, Heartbeat, atomic_write, clear_errors, first_error, is_claimed, release, \
    try_claim, write_error
from pretrain.data.corpus_files import DataError, Piece, iter_piece

logger = logging.getLogger("data_utils")
ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS_PER_BATCH = 2048
CHARACTERS_PER_BATCH = 4_000_000
COPY_BYTES = 2**26  # the assembly copies this much at a time
EXIT_DATA_ERROR = 3
POLL_S = 0.2
FAILED_BUILD_KEPT_S = 30.0  # how long a failed build's error file stays for every rank of its launch to read


# ----------------------------------------------------------------------------------------------------------------------
# Validation split without a global view
# ----------------------------------------------------------------------------------------------------------------------

def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each value."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def held_out(seed: int, file_index: int, positions: np.ndarray, percentage: float) -> np.ndarray:
    """Which documents go to validation: a seeded hash of (file, position in the file) below percentage/100."""
    key = _mix(np.array([_mix(np.array([seed % 2**64], dtype=np.uint64))[0] ^ np.uint64(file_index)],
                        dtype=np.uint64))[0]
    threshold = np.uint64(min(2**64 - 1, int(percentage / 100 * 2**64)))
    return _mix(np.asarray(positions, dtype=np.uint64) ^ key) < threshold


# ----------------------------------------------------------------------------------------------------------------------
# The worker: pieces -> shard files
# ----------------------------------------------------------------------------------------------------------------------

def shard_path(folder: Path, index: int, suffix: str) -> Path:
    return folder / f"{index:06d}.{suffix}"


def tokenize_piece(folder: Path, index: int, piece: Piece, plan: dict[str, Any], tokenizer) -> None:
    """Tokenize one piece into NNNNNN.train/.validation, streamed to disk a batch at a time; NNNNNN.json last."""
    dtype, eos = np.dtype(plan["dtype"]), plan["eos"]
    split = piece.part == "train" and plan["validation_percentage"] > 0
    suffix = f"tmp-{HOST}-{os.getpid()}"
    paths = {name: shard_path(folder, index, f"{name}.{suffix}") for name in ("train", "validation")}
    counts = {"documents": 0, "skipped": 0, "tokens": 0, "train_tokens": 0, "validation_tokens": 0,
              "with_special_text": 0}
    special = re.compile("|".join(map(re.escape, plan["special_strings"]))) if plan["special_strings"] else None
    texts: list[str] = []
    positions: list[int] = []
    characters = 0

    with open(paths["train"], "wb") as train_out, open(paths["validation"], "wb") as validation_out:
        def flush() -> None:
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            id_lists = [encoding.ids for encoding in encodings]
            lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
            ids = np.fromiter(chain.from_iterable(id_lists), dtype=dtype, count=int(lengths.sum()))
            ids = np.insert(ids, np.cumsum(lengths), eos)  # EOS after each document
            counts["documents"] += len(texts)
            counts["tokens"] += len(ids)
            if piece.part == "validation":
                validation_out.write(ids.tobytes())
                counts["validation_tokens"] += len(ids)
            elif split:
                to_validation = np.repeat(held_out(plan["seed"], piece.file_index, np.asarray(positions),
                                                   plan["validation_percentage"]), lengths + 1)
                train_out.write(ids[~to_validation].tobytes())
                validation_out.write(ids[to_validation].tobytes())
                counts["validation_tokens"] += int(to_validation.sum())
                counts["train_tokens"] += len(ids) - int(to_validation.sum())
            else:
                train_out.write(ids.tobytes())
                counts["train_tokens"] += len(ids)
            texts.clear()
            positions.clear()

        for position, text in iter_piece(piece, plan["text_column"]):
            if not isinstance(text, str) or not text:
                counts["skipped"] += 1
                continue
            if special is not None and special.search(text):
                counts["with_special_text"] += 1
            texts.append(text)
            positions.append(position)
            characters += len(text)
            if len(texts) == DOCUMENTS_PER_BATCH or characters >= CHARACTERS_PER_BATCH:
                flush()
                characters = 0
        if texts:
            flush()
    # Test-only: PRETRAIN_LOOP_TEST_BUILD_DELAY=SECONDS makes every piece that slow, to test long builds and crashes
    # without a large corpus. Never set it otherwise.
    delay = float(os.environ.get("PRETRAIN_LOOP_TEST_BUILD_DELAY", "0"))
    if delay:  # not time.sleep(0), which gives the CPU away once per piece on a busy machine
        time.sleep(delay)
    for name, path in paths.items():
        os.replace(path, shard_path(folder, index, name))
    atomic_write(shard_path(folder, index, "json"), json.dumps({**counts, "input_bytes": piece.input_bytes}))


def load_plan(folder: Path) -> tuple[dict[str, Any], list[Piece]]:
    plan = json.loads((folder / "plan.json").read_text())
    return plan, [Piece(**piece) for piece in plan["pieces"]]


def worker_main(folder: Path, parent: int) -> int:
    """Claim and tokenize pieces until none is left to claim; 3 after a DataError (left in NNNNNN.error)."""
    from tokenizers import Tokenizer

    try:
        plan, pieces = load_plan(folder)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except FileNotFoundError:
        return 0  # the build finished and its folder was removed
    # A literal "<|endoftext|>" in a web page is text: encoded as such, every control token comes from the pipeline.
    tokenizer.encode_special_tokens = not plan["parse_special_tokens"]
    final_meta = Path(plan["final_dir"]) / "meta.json"
    heartbeat = Heartbeat()
    try:
        for index, piece in enumerate(pieces):
            if os.getppid() != parent or final_meta.exists() or first_error(folder) is not None:
                return 0
            claim = shard_path(folder, index, "claim")
            if shard_path(folder, index, "json").exists() or not try_claim(claim):
                continue
            heartbeat.current = claim
            try:
                if not shard_path(folder, index, "json").exists():  # done between the check and the claim
                    tokenize_piece(folder, index, piece, plan, tokenizer)
            except DataError as error:
                write_error(folder, f"{index:06d}", str(error))
                return EXIT_DATA_ERROR
            finally:
                heartbeat.current = None
                release(claim)
    except FileNotFoundError:
        if final_meta.exists():
            return 0
        raise
    finally:
        heartbeat.stop()
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# The coordinator: one per process that needs the cache
# ----------------------------------------------------------------------------------------------------------------------

def peak_rss_gb(workers: int) -> float:
    """This process's peak RSS plus the largest worker's times the number of workers: a bound on the build's."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + workers * child) / 2**20, 3)


def machine_workers(workers: int) -> str:
    """The tokenizing processes on this machine: each rank of a launch starts `workers` of its own."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    total = workers * ranks
    return f"{total} worker process{'es' if total > 1 else ''}" + (f" from {ranks} ranks" if ranks > 1 else "")


class _Progress:
    """A bar over the input's bytes with ETA and tokens/s: tqdm on a terminal, else a log line every 30 s."""

    def __init__(self, total_bytes: int, done_bytes: int, enabled: bool, workers: int):
        from tqdm.auto import tqdm

        self.enabled, self.start, self.tokens, self.last_log = enabled, time.perf_counter(), 0, time.perf_counter()
        self.total, self.done, self.initial = total_bytes, done_bytes, done_bytes
        terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=f"tokenizing ({machine_workers(workers)})", disable=not terminal,
                        mininterval=1.0, smoothing=0.1)
        if enabled and not terminal:
            logger.info(f"tokenizing {total_bytes / 1e9:.2f} GB with {machine_workers(workers)}"
                        + (f" ({done_bytes / 1e9:.2f} GB done before)" if done_bytes else ""))

    def update(self, input_bytes: int, tokens: int) -> None:
        self.done += input_bytes
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(input_bytes)
        self.bar.set_postfix_str(f"{self.tokens / elapsed / 1e6:.2f}M tokens/s", refresh=False)
        if self.enabled and self.bar.disable and time.perf_counter() - self.last_log > 30:
            self.last_log = time.perf_counter()
            bytes_per_s = max(self.done - self.initial, 1) / elapsed
            left = (self.total - self.done) / bytes_per_s
            logger.info(f"tokenizing: {self.done / max(self.total, 1):.1%} of {self.total / 1e9:.2f} GB, "
                        f"{self.tokens / elapsed / 1e6:.2f}M tokens/s, about "
                        + (f"{left / 60:.0f} min left" if left >= 90 else f"{left:.0f} s left"))

    def close(self) -> None:
        self.bar.close()


def _start_workers(folder: Path, count: int) -> list[subprocess.Popen]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1", RAYON_RS_NUM_CPUS="1",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pretrain.data.corpus_build", str(folder), str(os.getpid())]
    return [subprocess.Popen(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL) for _ in range(count)]


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        worker.wait()


def _wait_for_a_worker(workers: list[subprocess.Popen], seconds: float) -> None:
    """Sleep up to `seconds`, but wake within 50 ms when a running worker exits, as they do after the last piece."""
    running = next((worker for worker in workers if worker.poll() is None), None)
    if running is None:
        time.sleep(seconds)
        return
    try:
        running.wait(seconds)
    except subprocess.TimeoutExpired:
        pass


def _done_counts(folder: Path, seen: dict[int, dict[str, Any]]) -> None:
    """Read the .json of every piece done since the last call into `seen`."""
    for name in os.listdir(folder):
        if name.endswith(".json") and name[:6].isdigit() and int(name[:6]) not in seen:
            try:
                seen[int(name[:6])] = json.loads((folder / name).read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                pass


def remove_failed_builds(cache_root: Path, keep: Path) -> None:
    """Remove the build folders that stopped at a bad-input error (their input has been fixed since, which changed
    their key; a rerun of unchanged input keeps its own folder), once every rank of that launch has read the error.
    They hold up to the corpus's tokens."""
    for folder in cache_root.glob("*.build"):
        try:
            errors = [path.stat().st_mtime for path in folder.glob("*.error")]
            if folder == keep or not errors or time.time() - max(errors) < FAILED_BUILD_KEPT_S \
                    or any(is_claimed(claim) for claim in folder.glob("*.claim")):
                continue
        except FileNotFoundError:
            continue  # removed by another process meanwhile
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning(f"removed {folder}: the pieces of a build that stopped at a bad-input error")


def build(folder: Path, final_dir: Path, plan: dict[str, Any], tokenizer_json: str, workers: int,
          show_progress: bool) -> dict[str, Any]:
    """Take part in building `final_dir` (done by this process, its workers and any other process on the same
    folder); once every piece is done, returns the pieces' counts in piece order, how many were done before this
    call, and the tokens of those done during it."""
    remove_failed_builds(folder.parent, keep=folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "plan.json").exists():
        atomic_write(folder / "tokenizer.json", tokenizer_json)
        atomic_write(folder / "plan.json", json.dumps(plan))
    clear_errors(folder)
    pieces = plan["pieces"]
    seen: dict[int, dict[str, Any]] = {}
    _done_counts(folder, seen)
    reused = len(seen)
    workers = max(1, min(workers, len(pieces) - reused))
    restarts_without_progress = 0
    progress = _Progress(sum(p["input_bytes"] for p in pieces), sum(m["input_bytes"] for m in seen.values()),
                         show_progress, workers)
    running = _start_workers(folder, workers) if reused < len(pieces) else []
    try:
        while True:
            if (final_dir / "meta.json").exists():
                break
            message = first_error(folder)
            if message is not None:
                raise DataError(message)
            before = set(seen)
            try:
                _done_counts(folder, seen)
            except FileNotFoundError:
                if (final_dir / "meta.json").exists():
                    continue  # finished elsewhere
                raise RuntimeError(f"the build folder {folder} was removed while this process built it; rerun")
            for index in set(seen) - before:
                progress.update(seen[index]["input_bytes"], seen[index]["tokens"])
                restarts_without_progress = 0
            if len(seen) == len(pieces):
                break
            for worker in running:
                status = worker.poll()
                if status not in (None, 0, EXIT_DATA_ERROR) and not (final_dir / "meta.json").exists():
                    raise RuntimeError(f"a tokenizing worker (pid {worker.pid}) exited with status {status}; rerun "
                                       f"the same command: finished pieces in {folder} are kept")
            if all(worker.poll() is not None for worker in running):
                claimable = [i for i in range(len(pieces)) if i not in seen
                             and not is_claimed(shard_path(folder, i, "claim"))]
                if claimable:  # an owner died, or a piece was left while others held it
                    restarts_without_progress += 1
                    if restarts_without_progress > 5:
                        raise RuntimeError(f"tokenizing workers for {folder} keep stopping without finishing a "
                                           f"piece; see their output above")
                    running = _start_workers(folder, min(workers, len(claimable)))
            _wait_for_a_worker(running, POLL_S)
    finally:
        _stop(running)
        progress.close()
    return {"pieces": [seen.get(i) for i in range(len(pieces))], "reused": reused, "tokens_built": progress.tokens}


# ----------------------------------------------------------------------------------------------------------------------
# Assembly: shards -> one array of blocks per split
# ----------------------------------------------------------------------------------------------------------------------

def _write_npy(path: Path, folder: Path, counts: list[dict[str, Any]], suffix: str, dtype: np.dtype,
               shape: tuple[int, int]) -> None:
    """Write a .npy of `shape` from the shards' tokens in piece order, with plain reads and writes of bounded
    chunks: no memory map, so the pages copied never count in this process's memory (they would, all of them)."""
    remaining = shape[0] * shape[1] * dtype.itemsize
    with open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                   "fortran_order": False, "shape": shape})
        for index, count in enumerate(counts):
            if remaining == 0:
                break
            if count[f"{suffix}_tokens"] == 0:
                continue
            with open(shard_path(folder, index, suffix), "rb") as source:
                while remaining and (chunk := source.read(min(COPY_BYTES, remaining))):
                    out.write(chunk)
                    remaining -= len(chunk)


def assemble(folder: Path, final_dir: Path, counts: list[dict[str, Any]], plan: dict[str, Any],
             shapes: dict[str, int], stats: dict[str, Any]) -> None:
    """Write train.npy (and validation.npy) of `shapes[name]` blocks, then meta.json, into a temporary folder that
    is renamed to `final_dir`; the build folder is then removed."""
    dtype, block_size = np.dtype(plan["dtype"]), plan["block_size"]
    temporary = final_dir.with_name(f"{final_dir.name}.tmp-{HOST}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for name, blocks in shapes.items():
        _write_npy(temporary / f"{name}.npy", folder, counts, name, dtype, (blocks, block_size))
    (temporary / "key.json").write_text(json.dumps(plan["key"], indent=1))  # what a near miss is compared with
    (temporary / "meta.json").write_text(json.dumps(stats, indent=1))
    try:
        os.rename(temporary, final_dir)
    except OSError:  # another process finished first: its cache is identical
        shutil.rmtree(temporary, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


def assemble_or_wait(folder: Path, final_dir: Path, counts: list[dict[str, Any]], plan: dict[str, Any],
                     shapes: dict[str, int], stats: dict[str, Any]) -> None:
    """One process assembles (it holds assemble.claim); the others watch for final_dir/meta.json, and take over
    if the assembler dies."""
    claim = folder / "assemble.claim"
    while not (final_dir / "meta.json").exists():
        try:
            claimed = try_claim(claim)
        except FileNotFoundError:  # the folder was removed: the final folder is (about to be) there
            claimed = False
        if claimed:
            heartbeat = Heartbeat()
            heartbeat.current = claim
            try:
                assemble(folder, final_dir, counts, plan, shapes, stats)
            finally:
                heartbeat.stop()
                release(claim)
            return
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[1]), int(sys.argv[2])))
