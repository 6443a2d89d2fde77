"""Text corpora into packed, cached token blocks for causal-LM pretraining.

The pipeline is a chain of small functions, each testable on its own:

    resolve_files -> iter_documents -> tokenize_documents -> split_documents -> pack_blocks -> cache

Only token ids are stored (uint16 when the vocabulary allows it): no attention mask, no labels.
Every document is followed by the tokenizer's EOS id so that documents never run into each other.

Run on its own to build the cache before a GPU job:

    python data_utils.py --train_files "data/*.jsonl.gz" --tokenizer_name Qwen/Qwen2.5-1.5B --block_size 2048
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import itertools
import io
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

SUPPORTED_FORMATS = ".jsonl, .json, .txt (each optionally .gz) and .parquet"
CACHE_FORMAT_VERSION = 1
DOCUMENTS_PER_TOKENIZER_BATCH = 2048
DEFAULT_CACHE_ROOT = Path(os.environ.get("PRETRAIN_LOOP_CACHE", Path.home() / ".cache" / "pretrain_loop"))

logger = logging.getLogger("data_utils")


class DataError(ValueError):
    """Bad input data: the message is one line that names the file or flag and says what to do."""


@dataclass
class DataArguments:
    train_files: list[str] | None = field(
        default=None,
        metadata={"help": "Training corpus: paths or glob patterns (.jsonl/.json/.txt, optionally .gz, or .parquet). "
                          "Empty: the built-in demo corpus.", "nargs": "+"},
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Validation corpus, same formats. Default: held out from the training files.",
                                "nargs": "+"},
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of training documents held out for validation when "
                                       "--validation_files is not given (0 disables evaluation)."},
    )
    text_column: str = field(default="text", metadata={"help": "Field holding the document text in JSON and Parquet."})
    block_size: int | None = field(default=None, metadata={
        "help": "Tokens per training block (sequence length). Training default: min(2048, the model's "
                "max_position_embeddings); required by `python data_utils.py`."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Threads for tokenization (default: all cores)."},
    )
    data_cache_dir: str | None = field(
        default=None, metadata={"help": f"Where packed datasets are cached (default: {DEFAULT_CACHE_ROOT}/data)."},
    )


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------

def resolve_files(patterns: Iterable[str], flag: str = "--train_files") -> list[Path]:
    """Expand paths and glob patterns, in the given order; each pattern must match at least one file."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            hint = f"pass a glob such as '{pattern.rstrip('/')}/*.jsonl'" if os.path.isdir(pattern) else \
                "check the path or quote the glob pattern"
            raise DataError(f"{flag}: '{pattern}' matches no file; {hint}")
        for match in matches:
            _file_format(Path(match))  # fail early on an unknown extension
            files.append(Path(match).resolve())
    return files


def _file_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for fmt in ("jsonl", "json", "txt", "parquet"):
        if name.endswith("." + fmt):
            return fmt
    raise DataError(f"{path}: unknown format; supported formats are {SUPPORTED_FORMATS}")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _text_of(record: Any, text_column: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a '{text_column}' field, found {type(record).__name__}")
    if text_column not in record:
        raise DataError(f"{where}: no '{text_column}' field (found: {', '.join(map(str, record)) or 'none'}); "
                        f"pass --text_column with one of them")
    return record[text_column]


def _iter_jsonl(path: Path, text_column: str) -> Iterator[Any]:
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: malformed JSON ({error.msg}); fix or remove that line") from None
            yield _text_of(record, text_column, f"{path}:{line_number}")


def _iter_json(path: Path, text_column: str) -> Iterator[Any]:
    with _open_text(path) as handle:
        content = handle.read()
    try:
        data = json.loads(content)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several JSON values: JSON Lines stored under a .json name
            yield from _iter_jsonl(path, text_column)
            return
        raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg}); fix the file") from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if text_column in data or len(lists) != 1:
            data = [data]
        else:
            data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects or JSON Lines; convert the file")
    for index, record in enumerate(data):
        yield _text_of(record, text_column, f"{path}: record {index}")


def _iter_txt(path: Path, text_column: str) -> Iterator[Any]:
    with _open_text(path) as handle:
        for line in handle:
            yield line.rstrip("\r\n")


def _iter_parquet(path: Path, text_column: str) -> Iterator[Any]:
    import pyarrow.parquet as pq

    parquet_file = pq.ParquetFile(path)
    columns = parquet_file.schema_arrow.names
    if text_column not in columns:
        raise DataError(f"{path}: no '{text_column}' column (found: {', '.join(columns)}); "
                        f"pass --text_column with one of them")
    for batch in parquet_file.iter_batches(columns=[text_column], batch_size=DOCUMENTS_PER_TOKENIZER_BATCH):
        yield from batch.column(0).to_pylist()


_READERS = {"jsonl": _iter_jsonl, "json": _iter_json, "txt": _iter_txt, "parquet": _iter_parquet}


def iter_documents(path: Path, text_column: str = "text") -> Iterator[Any]:
    """Yield the raw text value of every record of one file, in file order (None or non-strings included)."""
    try:
        yield from _READERS[_file_format(path)](path, text_column)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: cannot be read ({type(error).__name__}: {error}); check the file") from None
    except Exception as error:  # pyarrow raises its own types for corrupt files
        if type(error).__module__.startswith("pyarrow"):
            raise DataError(f"{path}: cannot be read as Parquet ({error}); check the file") from None
        raise


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizing and packing
# ----------------------------------------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest integer type that holds every token id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def eos_token_id(tokenizer: Any, where: str = "--tokenizer_name") -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"{where}: the tokenizer has no EOS token, which separates packed documents; "
                        f"use a tokenizer that defines eos_token")
    return int(tokenizer.eos_token_id)


def check_tokenizer_encodes(tokenizer: Any, files: list[Path], text_column: str, sample: int = 32) -> None:
    """Refuse, before any work, a tokenizer that cannot encode the corpus: transformers 5 builds an empty one (one
    entry, every text encodes to []) from a folder that holds only config.json, and the run would then train on
    nothing but EOS tokens."""
    where = f"the tokenizer loaded from {getattr(tokenizer, 'name_or_path', '') or 'its folder'}"
    if len(tokenizer) < 16:
        raise DataError(f"--tokenizer_name: {where} has a vocabulary of {len(tokenizer)}, so it cannot encode text; "
                        f"pass --tokenizer_name with the model's tokenizer (a folder with tokenizer.json, or a Hub "
                        f"name)")
    texts = []
    for path in files:
        texts += [text for text in itertools.islice(iter_documents(path, text_column), sample)
                  if isinstance(text, str) and text][: sample - len(texts)]
        if len(texts) == sample:
            break
    if not texts:
        return  # no usable text at all: reported with the file's name by the full pass
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    if tokens <= len(texts):
        raise DataError(f"--tokenizer_name: {where} encodes the first {len(texts)} documents of {files[0]} to "
                        f"{tokens} tokens (at most one per document); pass --tokenizer_name with the model's "
                        f"tokenizer")


@dataclass
class TokenizedCorpus:
    """All documents' ids, each followed by EOS, concatenated; plus each document's length (EOS included)."""
    ids: np.ndarray
    document_lengths: np.ndarray
    skipped_documents: int


def join_with_eos(documents: list[list[int]], eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token-id lists with one EOS after each; returns (ids, each document's length with its EOS)."""
    pieces = [np.asarray(document, dtype=dtype) for document in documents]
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    # inserted before the first token of the next document, and after the last one
    ids = np.insert(np.concatenate(pieces), np.cumsum(lengths), eos).astype(dtype, copy=False)
    return ids, lengths + 1


def tokenize_documents(texts: Iterable[Any], tokenizer: Any, *, description: str = "tokenizing") -> TokenizedCorpus:
    """Tokenize with the fast tokenizer's parallel batch encoder and append EOS after each document.

    Empty, null and non-string documents are skipped and counted.
    """
    from tqdm.auto import tqdm

    eos = eos_token_id(tokenizer)
    dtype = token_dtype(len(tokenizer))
    backend = tokenizer.backend_tokenizer
    id_chunks: list[np.ndarray] = []
    length_chunks: list[np.ndarray] = []
    skipped = 0
    batch: list[str] = []

    def flush() -> None:
        encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
        ids, lengths = join_with_eos([encoding.ids for encoding in encodings], eos, dtype)
        id_chunks.append(ids)
        length_chunks.append(lengths)
        batch.clear()

    progress = tqdm(desc=description, unit=" docs", disable=None, mininterval=1.0)
    for text in texts:
        if not isinstance(text, str) or not text:
            skipped += 1
            continue
        batch.append(text)
        if len(batch) == DOCUMENTS_PER_TOKENIZER_BATCH:
            progress.update(len(batch))
            flush()
    if batch:
        progress.update(len(batch))
        flush()
    progress.close()
    ids = np.concatenate(id_chunks) if id_chunks else np.empty(0, dtype=dtype)
    lengths = np.concatenate(length_chunks) if length_chunks else np.empty(0, dtype=np.int64)
    return TokenizedCorpus(ids, lengths, skipped)


def split_documents(corpus: TokenizedCorpus, validation_percentage: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole documents for validation, chosen by the seed; both parts keep corpus order."""
    n_docs = len(corpus.document_lengths)
    n_validation = max(1, round(n_docs * validation_percentage / 100))
    if n_validation >= n_docs:
        raise DataError(f"--validation_split_percentage {validation_percentage}: would hold out all {n_docs} documents;"
                        f" lower it or pass --validation_files")
    chosen = np.random.default_rng(seed).permutation(n_docs)[:n_validation]
    is_validation_doc = np.zeros(n_docs, dtype=bool)
    is_validation_doc[chosen] = True
    is_validation_token = np.repeat(is_validation_doc, corpus.document_lengths)
    return corpus.ids[~is_validation_token], corpus.ids[is_validation_token]


def pack_blocks(ids: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """Cut the token stream into consecutive blocks; returns (blocks[n, block_size], dropped remainder length)."""
    n_blocks = len(ids) // block_size
    return ids[: n_blocks * block_size].reshape(n_blocks, block_size), len(ids) - n_blocks * block_size


# ----------------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------------

def _file_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    content = tokenizer.backend_tokenizer.to_str() + json.dumps([len(tokenizer), tokenizer.eos_token_id])
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def cache_key(train: list[Path], validation: list[Path] | None, args: DataArguments, tokenizer: Any,
              seed: int) -> str:
    """A hash of everything that changes the packed result."""
    description = {
        "version": CACHE_FORMAT_VERSION,
        "train": [_file_fingerprint(p) for p in train],
        "validation": [_file_fingerprint(p) for p in validation] if validation else None,
        "split": None if validation else {"percentage": args.validation_split_percentage, "seed": seed},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "block_size": args.block_size,
        "text_column": args.text_column,
        "eos_policy": "append-eos-after-every-document",
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class PackedData:
    train: np.ndarray  # [n_blocks, block_size], memory-mapped when loaded from the cache
    validation: np.ndarray | None
    stats: dict[str, Any]


def _load_cache(directory: Path) -> PackedData | None:
    """The cached blocks, or None when there are none; a damaged cache is removed, to be rebuilt."""
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return None
    try:
        stats = json.loads(meta_path.read_text())
        validation_path = directory / "validation.npy"
        data = PackedData(
            train=np.load(directory / "train.npy", mmap_mode="r"),
            validation=np.load(validation_path, mmap_mode="r") if validation_path.exists() else None,
            stats=stats,
        )
        if data.train.shape != (stats["blocks"], stats["block_size"]):
            raise ValueError(f"train.npy has shape {data.train.shape}, meta.json says "
                             f"{(stats['blocks'], stats['block_size'])}")
    except (OSError, ValueError, KeyError) as error:
        logger.warning(f"data cache {directory} is damaged ({error}); rebuilding it")
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return data


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".:") if text else type(error).__name__


def cannot_load(flag: str, name: str, error: BaseException) -> str:
    """The one-line message for a tokenizer, config or model that a Hub name or path did not give."""
    return f"{flag} {name}: cannot be loaded ({first_line(error)}); check the name, the path or the network"


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (created if missing), or None when they can."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        return error.strerror or str(error)
    return None


def _write_cache(directory: Path, data: PackedData) -> None:
    """Write into a temporary folder and rename it, so a reader never sees a half-written cache."""
    temporary = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    np.save(temporary / "train.npy", np.ascontiguousarray(data.train))
    if data.validation is not None:
        np.save(temporary / "validation.npy", np.ascontiguousarray(data.validation))
    (temporary / "meta.json").write_text(json.dumps(data.stats, indent=1))
    try:
        os.rename(temporary, directory)
    except OSError:  # another process finished first: its cache is identical
        shutil.rmtree(temporary, ignore_errors=True)


def _tokenize_files(files: list[Path], tokenizer: Any, text_column: str, flag: str) -> TokenizedCorpus:
    texts = (text for path in files for text in iter_documents(path, text_column))
    corpus = tokenize_documents(texts, tokenizer, description=f"tokenizing {flag.lstrip('-')}")
    if len(corpus.document_lengths) == 0:
        found = f"{corpus.skipped_documents} empty, null or non-string" if corpus.skipped_documents else "no"
        raise DataError(f"{flag}: {', '.join(map(str, files))} hold {found} documents and no usable text; "
                        f"check the files and --text_column")
    return corpus


def _packed_or_error(ids: np.ndarray, block_size: int, flag: str) -> tuple[np.ndarray, int]:
    blocks, dropped = pack_blocks(ids, block_size)
    if len(blocks) == 0:
        raise DataError(f"{flag}: the corpus has {len(ids)} tokens, fewer than one block of --block_size {block_size};"
                        f" add text or lower --block_size")
    return blocks, dropped


def set_tokenizer_threads(num_workers: int | None) -> None:
    """Size the Rust tokenizer's thread pool (it is read once, at the first parallel encode)."""
    if num_workers:
        os.environ["RAYON_RS_NUM_CPUS"] = str(num_workers)
        os.environ["RAYON_NUM_THREADS"] = str(num_workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def prepare_data(args: DataArguments, tokenizer: Any, seed: int = 42) -> PackedData:
    """Load the packed blocks from the cache, or build and cache them."""
    start = time.perf_counter()
    if args.block_size is None or args.block_size < 2:
        raise DataError(f"--block_size {args.block_size}: must be at least 2")
    if not 0 <= args.validation_split_percentage < 100:
        raise DataError(f"--validation_split_percentage {args.validation_split_percentage}: must be in [0, 100)")
    eos_token_id(tokenizer)
    train_files = resolve_files(args.train_files or [], "--train_files")
    if not train_files:
        raise DataError("--train_files: no training files given")
    validation_files = resolve_files(args.validation_files, "--validation_files") if args.validation_files else None

    cache_root = Path(args.data_cache_dir or DEFAULT_CACHE_ROOT / "data").expanduser()
    directory = cache_root / cache_key(train_files, validation_files, args, tokenizer, seed)
    cached = _load_cache(directory)
    if cached is not None:
        cached.stats.update(cache_hit=True, seconds=round(time.perf_counter() - start, 3))
        return cached
    problem = unwritable(cache_root)  # checked before hours of tokenizing, not after
    if problem:
        raise DataError(f"--data_cache_dir {cache_root}: cannot write there ({problem}); pass a writable "
                        f"--data_cache_dir")

    set_tokenizer_threads(args.preprocessing_num_workers)  # before the first encode, which starts the thread pool
    check_tokenizer_encodes(tokenizer, train_files, args.text_column)
    corpus = _tokenize_files(train_files, tokenizer, args.text_column, "--train_files")
    skipped = corpus.skipped_documents
    documents = len(corpus.document_lengths)
    total_tokens = len(corpus.ids)
    validation_ids = None
    train_ids = corpus.ids
    if validation_files:
        validation_corpus = _tokenize_files(validation_files, tokenizer, args.text_column, "--validation_files")
        validation_ids = validation_corpus.ids
    elif args.validation_split_percentage > 0:
        train_ids, validation_ids = split_documents(corpus, args.validation_split_percentage, seed)
    del corpus

    train_blocks, dropped = _packed_or_error(train_ids, args.block_size, "--train_files")
    validation_blocks, validation_dropped = None, 0
    if validation_ids is not None:
        flag = "--validation_files" if validation_files else "--validation_split_percentage"
        validation_blocks, validation_dropped = _packed_or_error(validation_ids, args.block_size, flag)
    stats = {
        "documents": documents,
        "tokens": total_tokens,
        "blocks": len(train_blocks),
        "validation_blocks": 0 if validation_blocks is None else len(validation_blocks),
        "dropped_tokens": dropped + validation_dropped,
        "skipped_documents": skipped,
        "dtype": str(train_blocks.dtype),
        "block_size": args.block_size,
        "cache_dir": str(directory),
    }
    packed = PackedData(train_blocks, validation_blocks, stats)
    _write_cache(directory, packed)
    stats.update(cache_hit=False, seconds=round(time.perf_counter() - start, 3))
    return packed


# ----------------------------------------------------------------------------------------------------------------------
# DataLoaders
# ----------------------------------------------------------------------------------------------------------------------

class PackedBlockDataset(torch.utils.data.Dataset):
    """Map-style view over packed blocks; a whole batch is fetched with one fancy-index read."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.blocks[index].astype(np.int64))

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.blocks[np.asarray(indices)].astype(np.int64))


def collate_blocks(batch: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model shifts labels itself, so labels are the input ids (the same tensor, no copy)."""
    input_ids = batch if isinstance(batch, torch.Tensor) else torch.stack(batch)
    return {"input_ids": input_ids, "labels": input_ids}


class EpochShuffledSampler(torch.utils.data.Sampler[int]):
    """A permutation of the blocks seeded by (seed, epoch), cut to a whole number of global batches.

    Accelerate hands consecutive micro-batches of this order to processes round-robin, so every optimizer step
    sees the same `global_batch_blocks` blocks whatever the number of processes and accumulation steps.
    """

    def __init__(self, num_blocks: int, global_batch_blocks: int, seed: int):
        self.num_blocks = num_blocks
        self.global_batch_blocks = global_batch_blocks
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_blocks // self.global_batch_blocks * self.global_batch_blocks

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_blocks, generator=generator)[: len(self)].tolist())


def build_train_dataloader(blocks: np.ndarray, micro_batch_size: int, global_batch_blocks: int, seed: int,
                           num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    if global_batch_blocks > len(blocks):
        raise DataError(f"--train_files: {len(blocks)} blocks are fewer than one global batch of {global_batch_blocks}"
                        f" (per-device batch x processes x accumulation); add data or lower the batch size")
    return torch.utils.data.DataLoader(
        PackedBlockDataset(blocks),
        batch_size=micro_batch_size,
        sampler=EpochShuffledSampler(len(blocks), global_batch_blocks, seed),
        drop_last=True,
        collate_fn=collate_blocks,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def build_eval_dataloader(blocks: np.ndarray, batch_size: int, num_workers: int = 0,
                          pin_memory: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(PackedBlockDataset(blocks), batch_size=batch_size, shuffle=False,
                                       collate_fn=collate_blocks, num_workers=num_workers, pin_memory=pin_memory)


# ----------------------------------------------------------------------------------------------------------------------
# Built-in demo: a generated corpus with learnable structure and a byte-level BPE tokenizer trained on it
# ----------------------------------------------------------------------------------------------------------------------

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
_THINGS = ["apples", "books", "coins", "lamps", "maps", "pens", "rocks", "shells", "stamps", "tickets"]
_PLACES = ["the park", "the market", "the library", "the harbor", "the garden", "the station"]


def _demo_document(rng: random.Random) -> str:
    """A short story whose numbers and names follow rules a small model can learn."""
    name, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    have, more = rng.randint(1, 9), rng.randint(1, 9)
    start = rng.randint(1, 20)
    counting = " ".join(str(n) for n in range(start, start + rng.randint(4, 8)))
    return (f"{name} went to {rng.choice(_PLACES)} with {have} {thing}. "
            f"{other} gave {name} {more} more {thing}. "
            f"now {name} has {have + more} {thing}. "
            f"{name} counted: {counting}.")


def write_demo_corpus(path: Path, documents: int = 6000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        for _ in range(documents):
            handle.write(json.dumps({"text": _demo_document(rng)}) + "\n")
    os.replace(temporary, path)
    return path


def train_demo_tokenizer(corpus: Path, output_dir: Path, vocab_size: int = 512) -> Path:
    """Train a Qwen2-style byte-level BPE tokenizer (EOS <|endoftext|>) on the corpus and save it.

    It is a Qwen2Tokenizer, so that AutoTokenizer rebuilds the very same pipeline from a saved Qwen2 model folder.
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    texts = (json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines())
    tokenizer = Qwen2Tokenizer().train_new_from_iterator(
        texts, vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    temporary = output_dir.with_name(output_dir.name + f".tmp-{os.getpid()}")
    tokenizer.save_pretrained(temporary)
    try:
        os.rename(temporary, output_dir)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
    return output_dir


def ensure_demo_assets(root: Path | None = None) -> tuple[Path, Path]:
    """The demo corpus and tokenizer, generated once and cached: returns (corpus path, tokenizer dir)."""
    root = (root or DEFAULT_CACHE_ROOT / "demo").expanduser()
    corpus = root / "demo_corpus.jsonl"
    tokenizer_dir = root / "tokenizer"
    if not corpus.exists():
        write_demo_corpus(corpus)
    if not (tokenizer_dir / "tokenizer.json").exists():
        train_demo_tokenizer(corpus, tokenizer_dir)
    return corpus, tokenizer_dir


# ----------------------------------------------------------------------------------------------------------------------
# Command line: preprocess on its own
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class PreprocessArguments:
    tokenizer_name: str = field(metadata={"help": "Tokenizer name on the Hub or local path."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom tokenizer code from the Hub."})
    seed: int = field(default=42, metadata={"help": "Seed of the validation split (use the training run's seed)."})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default shown once: not where the help text already says it, nor when it is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default" in (action.help or "") or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def argument_parser(dataclass_types: tuple, error: Callable[[str], Any]):
    """HfArgumentParser without prefix matching (--max_step would silently set --max_steps) and with one-line
    errors: `error(message)` must raise or exit."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, allow_abbrev=False, formatter_class=HelpFormatter)
    parser.error = error  # one line, no usage dump
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    def error(message: str) -> None:
        sys.exit(f"error: {message}")

    parser = argument_parser((DataArguments, PreprocessArguments), error)
    data_args, preprocess_args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        error(f"unrecognized arguments: {' '.join(unknown)}")
    if data_args.block_size is None:
        error("--block_size is required: the tokens per training block; pass the training run's value, e.g. "
              "--block_size 2048")
    try:
        tokenizer = AutoTokenizer.from_pretrained(preprocess_args.tokenizer_name,
                                                  trust_remote_code=preprocess_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise DataError(cannot_load("--tokenizer_name", preprocess_args.tokenizer_name, error)) from None
    packed = prepare_data(data_args, tokenizer, seed=preprocess_args.seed)
    print(json.dumps(packed.stats))
    return packed.stats


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        sys.exit(f"error: {error}")
