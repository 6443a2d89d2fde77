"""The cache folder of a packed corpus: its key, and reading it back.

It owns the folder's name (a hash of everything that changes the blocks: the files' sizes and times, the tokenizer,
the split, the block size, the format version) and loading train.npy / validation.npy memory-mapped, with a damaged
folder removed to be rebuilt. It must not tokenize or build (pretrain/data/corpus_build.py writes the folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.base.arguments import DEFAULT_CACHE_ROOT, DataArguments
from pretrain.base.errors import DataError
from pretrain.data.corpus_files import resolve_files
from pretrain.data.hub_datasets import dataset_files

CACHE_FORMAT_VERSION = 2  # 2: streamed build, validation documents chosen by a seeded hash of their position

logger = logging.getLogger("data_utils")


def file_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def tokenizer_fingerprint(tokenizer: Any, serialized: str | None = None) -> str:
    """A hash of the tokenizer. `serialized`: its backend's to_str(), where the caller has it already (it takes
    0.2 s at Qwen's 151,936 entries)."""
    serialized = tokenizer.backend_tokenizer.to_str() if serialized is None else serialized
    content = serialized + json.dumps([len(tokenizer), tokenizer.eos_token_id])
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def cache_description(train: list[Path], validation: list[Path] | None, split_percentage: float, block_size: int,
                      text_column: str, tokenizer: Any, seed: int, parse_special_tokens: bool,
                      serialized_tokenizer: str | None = None) -> dict[str, Any]:
    """Everything that changes the packed result (and nothing else: not the number of workers)."""
    return {
        "version": CACHE_FORMAT_VERSION,
        "train": [file_fingerprint(p) for p in train],
        "validation": [file_fingerprint(p) for p in validation] if validation else None,
        "split": None if validation else {"percentage": split_percentage, "seed": seed},
        "tokenizer": tokenizer_fingerprint(tokenizer, serialized_tokenizer),
        "block_size": block_size,
        "text_column": text_column,
        "eos_policy": "append-eos-after-every-document",
        "special_tokens_in_text": "parsed" if parse_special_tokens else "ordinary-text",
    }


def cache_key(description: dict[str, Any]) -> str:
    """The cache folder's name: a hash of its description (which the build saves beside it as key.json)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class CacheSite:
    """Where the packed blocks of some data flags live, and what their key is made of."""
    train_files: list[Path]
    validation_files: list[Path] | None
    root: Path  # --data_cache_dir
    tokenizer_json: str  # the backend's to_str(), for the build's workers too
    description: dict[str, Any]
    directory: Path  # root / the key


def cache_site(args: DataArguments, tokenizer: Any, seed: int, flag: str) -> CacheSite:
    """The cache folder of these data flags and tokenizer (`flag`: what the errors name as the training files),
    built or not; the training files and the --validation_files resolved."""
    train_files = resolve_files(args.train_files or [], flag)
    if args.dataset_name:  # after --train_files: for now one stream of both
        train_files += dataset_files(args.dataset_name, args.dataset_config_name, args.dataset_split,
                                     args.dataset_revision)
    if not train_files:
        raise DataError(f"{flag}: no training files given")
    validation_files = resolve_files(args.validation_files, "--validation_files") if args.validation_files else None
    root = Path(args.data_cache_dir or DEFAULT_CACHE_ROOT / "data").expanduser().absolute()  # workers: cwd ROOT
    tokenizer_json = tokenizer.backend_tokenizer.to_str()  # once: for the cache's key and the workers' copy
    description = cache_description(train_files, validation_files, args.validation_split_percentage,
                                    args.block_size, args.text_column, tokenizer, seed, args.parse_special_tokens,
                                    tokenizer_json)
    return CacheSite(train_files, validation_files, root, tokenizer_json, description, root / cache_key(description))


KEY_FIELD_MEANING = {"split": "the validation split (--validation_split_percentage, --data_seed)",
                     "tokenizer": "the tokenizer (its vocabulary, normalizer or special tokens)",
                     "block_size": "--block_size", "text_column": "--text_column",
                     "special_tokens_in_text": "--parse_special_tokens",
                     "validation": "--validation_files", "version": "the cache format (a newer version of this code)"}


def near_miss(cache_root: Path, description: dict[str, Any]) -> str | None:
    """When no cache matches, but one for the same training files differs in a single field: which, in words."""
    for key_file in sorted(cache_root.glob("*/key.json")):
        try:
            other = json.loads(key_file.read_text())
        except (OSError, ValueError):
            continue
        if other.get("train") != description["train"]:
            continue
        differ = [name for name in description if other.get(name) != description[name]]
        if len(differ) == 1:
            name = differ[0]
            change = "" if name == "tokenizer" else f": {other.get(name)} -> {description[name]}"
            return f"{KEY_FIELD_MEANING.get(name, name)}{change} (the existing cache is {key_file.parent})"
    return None


@dataclass
class PackedData:
    train: np.ndarray  # [n_blocks, block_size], memory-mapped when loaded from the cache
    validation: np.ndarray | None
    stats: dict[str, Any]


def load_cache(directory: Path) -> PackedData | None:
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
