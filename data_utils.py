"""Text corpora into packed, cached token blocks for causal-LM pretraining.

    resolve_files -> pieces (byte ranges, row groups) -> worker processes tokenize each piece into a shard file
    (EOS after each document; validation documents held out by a seeded hash) -> shards copied into one
    memory-mapped array of blocks -> cache -> DataLoaders

Only token ids are stored (uint16 when the vocabulary allows it): no attention mask, no labels. Memory stays
bounded whatever the corpus size; a build killed half-way resumes from its finished pieces; every rank of a launch
helps build and waits by watching the cache folder. The reading lives in pretrain/data/corpus_files.py, the build in
pretrain/data/corpus_build.py, the folder sharing in pretrain/data/cache_claims.py, the cache's key and loading in
pretrain/data/corpus_cache.py and the demo corpus in pretrain/data/demo_corpus.py; this module is the entry point.

Run on its own to build the cache before a GPU job (or each source's, with --train_mixture):

    python data_utils.py --train_files "data/*.jsonl.gz" --tokenizer_name Qwen/Qwen2.5-1.5B --block_size 2048
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pretrain.base.arguments import DEFAULT_SPLIT_SEED, DataArguments, ModelArguments, \
    argument_parser, check_mixture_flags
from pretrain.base.errors import DataError, UsageError, unwritable
from pretrain.base.mixture_spec import parse_mixture
from pretrain.data import corpus_build
from pretrain.data.cache_claims import main_reports_first
from pretrain.data.corpus_cache import PackedData, cache_site, load_cache, near_miss
from pretrain.data.corpus_files import iter_documents, plan_pieces
from pretrain.data.document_mask import BlockCollator
from pretrain.data.mixture import Mixture, MixtureBlocks, MixtureData, MixtureSampler
from pretrain.model.loading import load_config, load_tokenizer

logger = logging.getLogger("data_utils")


class StderrHandler(logging.StreamHandler):
    """Writes each line to sys.stderr as it is then, not as it was when the handler was made: after a caller (a test
    that captures the output, a redirect) has put it back, the lines still go somewhere open."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _ignored) -> None:
        pass


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


def special_strings(tokenizer: Any) -> list[str]:
    """The text of the tokenizer's special tokens (EOS, <|im_start|>, ...): the strings a document may contain."""
    return sorted({token.content for token in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()
                   if token.special})


def default_workers() -> int:
    """The cores this process may use, divided among the processes that a launch started on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _no_usable_text(flag: str, files: list[Path], documents: int, skipped: int) -> None:
    if documents == 0:
        found = f"{skipped} empty, null or non-string" if skipped else "no"
        raise DataError(f"{flag}: {', '.join(map(str, files))} hold{'s' if len(files) == 1 else ''} {found} "
                        f"documents and no usable text; "
                        f"check the files and --text_column")


def _at_least_one_block(tokens: int, block_size: int, flag: str) -> None:
    if tokens >= block_size:
        return
    if flag == "--validation_split_percentage":
        raise DataError(f"{flag}: the held-out validation documents have {tokens} tokens, fewer than one block of "
                        f"--block_size {block_size}; raise {flag}, pass --validation_files, or lower --block_size")
    raise DataError(f"{flag}: the corpus has {tokens} tokens, fewer than one block of --block_size {block_size}; "
                    f"add text or lower --block_size")


def _stats_of(parts: dict[str, list[Path]], plan: dict[str, Any], counts: list[dict[str, Any]],
              args: DataArguments, directory: Path, flag: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The cache's stats and its arrays' block counts, from the pieces' counts; a DataError for what cannot be
    packed. Every process computes the same from the same files, so every rank raises the same line."""
    def total(part: str, field_name: str) -> int:
        return sum(count[field_name] for piece, count in zip(plan["pieces"], counts) if piece["part"] == part)

    block_size = args.block_size
    _no_usable_text(flag, parts["train"], total("train", "documents"), total("train", "skipped"))
    if "validation" in parts:
        _no_usable_text("--validation_files", parts["validation"], total("validation", "documents"),
                        total("validation", "skipped"))
    train_tokens = total("train", "train_tokens")
    validation_tokens = total("train", "validation_tokens") + total("validation", "validation_tokens")
    _at_least_one_block(train_tokens, block_size, flag)
    shapes = {"train": train_tokens // block_size}
    if "validation" in parts or plan["validation_percentage"] > 0:
        held_out_flag = "--validation_files" if "validation" in parts else "--validation_split_percentage"
        if flag != "--train_files" and validation_tokens < block_size:  # a mixture's source
            raise DataError(f"{flag}: its held-out validation documents have {validation_tokens} tokens, fewer than "
                            f"one block of --block_size {block_size}; add text to it, raise {held_out_flag} or "
                            f"lower --block_size")
        _at_least_one_block(validation_tokens, block_size, held_out_flag)
        shapes["validation"] = validation_tokens // block_size
    stats = {
        "documents": total("train", "documents"),
        "tokens": total("train", "tokens"),
        "blocks": shapes["train"],
        "validation_blocks": shapes.get("validation", 0),
        "dropped_tokens": train_tokens % block_size + (validation_tokens % block_size if len(shapes) > 1 else 0),
        "skipped_documents": total("train", "skipped"),
        "documents_with_special_text": total("train", "with_special_text"),
        "dtype": plan["dtype"],
        "block_size": block_size,
        "cache_dir": str(directory),
        "shards": len(counts),
    }
    return stats, shapes


def prepare_data(args: DataArguments, tokenizer: Any, seed: int = 42, show_progress: bool = True,
                 flag: str = "--train_files") -> PackedData:
    """Load the packed blocks from the cache, or build them (with any other process building the same cache) and
    cache them. `show_progress`: the bar over the input's bytes (the main process of a launch); `flag`: what the
    errors name as the training files. A DataError is raised by every rank of a launch, the machine's first rank no
    later than the others."""
    try:
        return _prepare_data(args, tokenizer, seed, show_progress, flag)
    except DataError as error:
        main_reports_first(str(error))
        raise


def prepare_mixture(args: DataArguments, tokenizer: Any, seed: int, order_seed: int,
                    show_progress: bool = True) -> MixtureData:
    """Each --train_mixture source packed and cached on its own (adding a source or changing a weight reuses the
    others' caches), then blended by weight."""
    sources = parse_mixture(args.train_mixture)
    packed = {}
    for source in sources:
        source_args = dataclasses.replace(args, train_files=source.files, train_mixture=None, validation_files=None,
                                          dataset_name=None)
        packed[source.name] = prepare_data(source_args, tokenizer, seed, show_progress,
                                           flag=f"--train_mixture source {source.name}")
    mixture = Mixture(sources, [data.train for data in packed.values()], order_seed, args.epoch_source)
    validation = {name: data.validation for name, data in packed.items() if data.validation is not None}
    return MixtureData(mixture, validation, {name: data.stats for name, data in packed.items()})


def _prepare_data(args: DataArguments, tokenizer: Any, seed: int, show_progress: bool, flag: str) -> PackedData:
    start = time.perf_counter()
    if args.block_size is None or args.block_size < 2:
        raise DataError(f"--block_size {args.block_size}: must be at least 2")
    if not 0 <= args.validation_split_percentage < 100:
        raise DataError(f"--validation_split_percentage {args.validation_split_percentage}: must be in [0, 100)")
    eos = eos_token_id(tokenizer)
    site = cache_site(args, tokenizer, seed, flag)
    train_files, validation_files, cache_root, directory = site.train_files, site.validation_files, site.root, \
        site.directory
    cached = load_cache(directory)
    if cached is not None:
        cached.stats.update(cache_hit=True, seconds=round(time.perf_counter() - start, 3), shards_reused=None,
                            tokens_per_s=None, peak_rss_gb=corpus_build.peak_rss_gb(0))
        return cached
    problem = unwritable(cache_root)  # checked before hours of tokenizing, not after
    if problem:
        raise DataError(f"--data_cache_dir {cache_root}: cannot write there ({problem}); pass a writable "
                        f"--data_cache_dir")

    check_tokenizer_encodes(tokenizer, train_files, args.text_column)
    changed = near_miss(cache_root, site.description) if show_progress else None  # said by the main process only
    if changed:
        logger.warning(f"building a new data cache: the cache of these files differs only in {changed}")
    parts = {"train": train_files, **({"validation": validation_files} if validation_files else {})}
    plan = {"pieces": [piece.to_dict() for piece in plan_pieces(parts)], "dtype": str(token_dtype(len(tokenizer))),
            "eos": eos, "seed": seed, "text_column": args.text_column, "block_size": args.block_size,
            "validation_percentage": 0.0 if validation_files else args.validation_split_percentage,
            "final_dir": str(directory), "key": site.description, "parse_special_tokens": args.parse_special_tokens,
            "special_strings": special_strings(tokenizer)}
    folder = directory.with_name(directory.name + ".build")
    workers = args.preprocessing_num_workers or default_workers()
    built = corpus_build.build(folder, directory, plan, site.tokenizer_json, workers, show_progress)
    if not (directory / "meta.json").exists():  # else finished by another process while this one waited
        stats, shapes = _stats_of(parts, plan, built["pieces"], args, directory, flag)
        corpus_build.assemble_or_wait(folder, directory, built["pieces"], plan, shapes, stats)
    packed = load_cache(directory)
    if packed is None:
        raise RuntimeError(f"the data cache {directory} was removed while this process built it; rerun")
    seconds = time.perf_counter() - start
    packed.stats.update(cache_hit=False, seconds=round(seconds, 3), shards_reused=built["reused"],
                        tokens_per_s=round(built["tokens_built"] / seconds),  # not the reused pieces' tokens
                        peak_rss_gb=corpus_build.peak_rss_gb(workers))
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


collate_blocks = BlockCollator()  # plain causal blocks: labels are the input ids (the model shifts them)


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
        order = torch.randperm(self.num_blocks, generator=generator)[: len(self)]  # 8 bytes per block
        for chunk in order.split(2**16):  # never a Python list of every block: 5 M of them would take ~200 MB
            yield from chunk.tolist()


def build_train_dataloader(blocks: np.ndarray | Mixture, micro_batch_size: int, global_batch_blocks: int, seed: int,
                           num_workers: int = 0, pin_memory: bool = False,
                           collate: BlockCollator = collate_blocks) -> torch.utils.data.DataLoader:
    """Global batches of whole blocks in a seeded order per epoch: of one corpus's blocks, or of a mixture's
    positions (whose order its blend and seed set)."""
    if global_batch_blocks > len(blocks):
        what = f"an epoch of the mixture ({blocks.epoch_source}'s blocks over its weight)" \
            if isinstance(blocks, Mixture) else "--train_files"
        raise DataError(f"{what}: {len(blocks)} blocks are fewer than one global batch of {global_batch_blocks}"
                        f" (per-device batch x processes x accumulation); add data or lower the batch size")
    if isinstance(blocks, Mixture):
        dataset, sampler = MixtureBlocks(blocks.blocks), MixtureSampler(blocks, global_batch_blocks)
    else:
        dataset, sampler = PackedBlockDataset(blocks), EpochShuffledSampler(len(blocks), global_batch_blocks, seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=micro_batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def build_eval_dataloader(blocks: np.ndarray, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                          collate: BlockCollator = collate_blocks) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(PackedBlockDataset(blocks), batch_size=batch_size, shuffle=False,
                                       collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory)


# ----------------------------------------------------------------------------------------------------------------------
# Command line: preprocess on its own
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class PreprocessArguments:
    tokenizer_name: str = field(metadata={"help": "Tokenizer name on the Hub or local path."})
    config_name: str | None = field(default=None, metadata={
        "help": "The model's config (Hub name, folder or config.json), when the tokenizer's folder has none: the "
                "tokenizer then loads as the class the model uses, as in training (same cache)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom tokenizer code from the Hub."})
    data_seed: int = field(default=DEFAULT_SPLIT_SEED, metadata={
        "help": "Seed of the validation split: the training run's --data_seed if it passes one (its --seed does not "
                "matter).", "aliases": ["--seed"]})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def error(message: str) -> None:
        sys.exit(f"error: {message}")

    parser = argument_parser((DataArguments, PreprocessArguments), error)
    data_args, preprocess_args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        error(f"unrecognized arguments: {' '.join(unknown)}")
    if not logger.handlers:  # the build's progress lines when stderr is not a terminal
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    check_mixture_flags(data_args)
    if data_args.block_size is None:
        error("--block_size is required: the tokens per training block; pass the training run's value, e.g. "
              "--block_size 2048")
    model_args = ModelArguments(tokenizer_name=preprocess_args.tokenizer_name, config_name=preprocess_args.config_name,
                                trust_remote_code=preprocess_args.trust_remote_code)
    tokenizer = load_tokenizer(model_args, data_args, load_config(model_args))
    if data_args.train_mixture:  # every source's cache, as a training run with the same mixture would use them
        packed = prepare_mixture(data_args, tokenizer, preprocess_args.data_seed, preprocess_args.data_seed)
    else:
        packed = prepare_data(data_args, tokenizer, seed=preprocess_args.data_seed)
    print(json.dumps(packed.stats))
    return packed.stats


def cli(argv: list[str] | None = None) -> None:
    """main() with the errors a user can fix as one line (and exit status 1) instead of a traceback."""
    try:
        main(argv)
    except (DataError, UsageError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli()
