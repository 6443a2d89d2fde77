"""Data mixtures (`--train_mixture`): several cached corpora read in exact proportions, through one index.

The blend decides which source each position of the run reads, without randomness: Tijdeman's solution of the
"chairman assignment" problem, which keeps every source's count within 1 - 1/(2m-2) blocks of its weight times
the positions read, at every prefix (Megatron's greedy, which picks the largest weight x samples - count, can miss
by more than a block: weights 12345:54321:1111:9:3 reach 1.69). With the weights as exact fractions of common
denominator Q, the blend repeats every Q positions, so its index is at most one period, built as far as the run
reads. Inside a source, its blocks are read in a seeded permutation per repetition, so a source
smaller than its share is read again in a new order, and a larger one is cut short (subsampled).

A resume of the same mixture finds its place from the step alone. When the weights, the sources or their blocks
change, the blend starts again at the resume's position, each source continuing from the blocks it had read.

It owns the blend, the map from positions to blocks, and the mixture's part of the run state; it must not load
corpora (data_utils does) nor train.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator

import numpy as np
import torch

from pretrain.base.mixture_spec import MixtureSource

logger = logging.getLogger("train_loop")

MAX_REPEATS = 100  # a source read more often than this in one run is warned about: it will be memorised


class Blend:
    """The blend's index: which source each position reads, and each pick's rank among its source's picks.

    Built lazily, as far as positions are asked for, and never past one period (the weights' common denominator).
    When the period is longer than a run, a resume starts the index at its position from the sources' counts there
    (`start_at`) instead of rebuilding the positions before it."""

    GROWTH = 2**20  # positions added at most at once: about 0.7 s of picking on one core

    def __init__(self, weights: list[Fraction]):
        self.period = math.lcm(*(weight.denominator for weight in weights))
        self.shares = np.array([int(weight * self.period) for weight in weights], dtype=np.int64)  # per period
        self.start_at(0, [0] * len(weights))

    def start_at(self, position: int, counts: list[int]) -> None:
        """Begin the index at `position`, where each source has been picked `counts` times (positions before it are
        only ever skipped, never read: they stand for the first one)."""
        slack = 2 * len(counts) - 2
        self.first, self.first_counts = position, np.array(counts, dtype=np.int64)
        self.picks = np.zeros(0, dtype=np.uint8 if len(counts) <= 256 else np.int32)
        self.ranks = np.zeros(0, dtype=np.int64)  # earlier picks of the same source
        self.counts = [int(count) for count in counts]  # of each source before position first + len(picks)
        self.deadlines = [(count + 1) * slack - 1 for count in self.counts]  # see extend()

    def extend(self, length: int) -> None:
        """Pick the sources of positions up to `length` - 1 (Tijdeman's algorithm).

        At position k (from 1), a source is eligible when it is at least 1/(2m-2) of a block below its share
        (share * k / period - count); among the eligible ones, the earliest deadline goes first, the deadline being
        (count + 1 - 1/(2m-2)) / weight, when the source would fall too far behind. Integer arithmetic only, so the
        index is the same on every machine."""
        start, length = self.first + len(self.picks), min(length, self.period)
        if length <= start:
            return
        grow = min(max(len(self.picks), 2**16), self.GROWTH)  # geometrically, from 65,536 positions on
        length = min(self.period, max(length, start + grow))
        shares, total, counts, deadlines = self.shares.tolist(), self.period, self.counts, self.deadlines
        slack, sources = 2 * len(shares) - 2, range(len(shares))
        before = np.array(counts, dtype=np.int64)
        picks = np.zeros(length - start, dtype=self.picks.dtype)
        if len(shares) > 1:
            for k in range(start + 1, length + 1):
                best = -1
                for i in sources:
                    if (shares[i] * k - total * counts[i]) * slack >= total and \
                            (best < 0 or deadlines[i] * shares[best] < deadlines[best] * shares[i]):
                        best = i
                counts[best] += 1
                deadlines[best] += slack
                picks[k - 1 - start] = best
        else:
            counts[0] = length
        ranks = np.empty(len(picks), dtype=np.int64)
        for source in sources:
            where = np.flatnonzero(picks == source)
            ranks[where] = before[source] + np.arange(len(where))
        self.picks, self.ranks = np.concatenate([self.picks, picks]), np.concatenate([self.ranks, ranks])

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The source of each position (from the blend's start) and how many blocks of it were read before."""
        periods, offsets = np.divmod(positions, self.period)
        if self.first and (offsets[positions >= self.first] < self.first).any():
            self.start_at(0, [0] * len(self.shares))  # the period came round: its beginning is read again
        self.extend(max(int(offsets.max()) + 1 if len(offsets) else 0, self.first + 1))
        index = np.maximum(offsets - self.first, 0)
        sources = self.picks[index].astype(np.int64)
        return sources, periods * self.shares[sources] + self.ranks[index]

    def reads(self, position: int) -> np.ndarray:
        """Blocks of each source among the first `position` positions (from `first` on)."""
        periods, offset = divmod(position, self.period)
        if self.first and periods and offset < self.first:
            self.start_at(0, [0] * len(self.shares))
        self.extend(offset)
        picked = self.picks[:max(offset - self.first, 0)]
        return periods * self.shares + self.first_counts + np.bincount(picked, minlength=len(self.shares))


def source_seed(seed: int, name: str, repetition: int) -> list[int]:
    """The seed of a source's block order in one repetition: its name, not its place in the list, so adding a
    source leaves the others' orders alone."""
    return [seed % 2**64, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"), repetition]


class Mixture:
    """The sources' blocks and the blend over them, as one sequence of positions.

    `len()` is the positions of one epoch: until the epoch source has been read once in full. Position p reads
    blend position p - origin, and a source's blocks are counted from `origin_reads` (non-zero after a resume that
    changed the mixture).
    """

    def __init__(self, sources: list[MixtureSource], blocks: list[np.ndarray], seed: int, epoch_source: str | None):
        total = sum(source.weight for source in sources)
        self.names = [source.name for source in sources]
        self.weights = [source.weight / total for source in sources]
        self.blocks = blocks
        self.seed = seed
        self.epoch_source = epoch_source or self.names[0]
        epoch_index = self.names.index(self.epoch_source)
        self.epoch_positions = int(len(blocks[epoch_index]) / self.weights[epoch_index])
        self.blend = Blend(self.weights)
        self.origin = 0
        self.origin_reads = np.zeros(len(sources), dtype=np.int64)
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.epoch_positions

    def weight_of(self) -> dict[str, float]:
        """Each source's normalised weight, by name."""
        return dict(zip(self.names, map(float, self.weights)))

    def identity(self) -> dict[str, Any]:
        """What the blend and the blocks depend on: a resume compares it to the checkpoint's."""
        return {"sources": {name: {"weight": str(weight), "blocks": len(blocks)}
                            for name, weight, blocks in zip(self.names, self.weights, self.blocks)},
                "seed": self.seed}

    def state(self, position: int) -> dict[str, Any]:
        """The mixture's part of the run state at `position`: its identity, where its blend started, and the blocks
        read of each source."""
        return {**self.identity(), "origin": self.origin,
                "origin_reads": dict(zip(self.names, map(int, self.origin_reads))),
                "position": position, "reads": self.reads(position)}

    def source_losses(self, totals: torch.Tensor, position: int, block_size: int) -> tuple[float, dict[str, Any]]:
        """From a log window's (loss sum, targets, blocks) per source, summed over processes: the token-weighted
        loss, and each source's loss (None when the window read none of it), blocks read and tokens seen in the run."""
        totals = totals.double().cpu()
        record = {}
        for (name, read), (loss_sum, targets, blocks) in zip(self.reads(position).items(), totals.tolist()):
            record[f"loss/{name}"] = loss_sum / targets if targets else None
            record[f"blocks/{name}"] = int(blocks)
            record[f"tokens_seen/{name}"] = read * block_size
        return (totals[:, 0].sum() / totals[:, 1].sum()).item(), record

    def reads(self, position: int) -> dict[str, int]:
        """Blocks read of each source after `position` positions of the run."""
        counts = self.origin_reads + self.blend.reads(position - self.origin)
        return dict(zip(self.names, map(int, counts)))

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each position's source and block index in that source. Positions before the origin were read by the
        checkpoint's mixture and are skipped by the resume without being loaded: they stand for the origin's."""
        sources, ranks = self.blend.locate(np.maximum(positions - self.origin, 0))
        ranks = ranks + self.origin_reads[sources]
        blocks = np.empty_like(ranks)
        for source in np.unique(sources).tolist():
            here = np.flatnonzero(sources == source)
            repetitions, offsets = np.divmod(ranks[here], len(self.blocks[source]))
            for repetition in np.unique(repetitions).tolist():
                same = repetitions == repetition
                blocks[here[same]] = self.order(source, repetition)[offsets[same]]
        return sources, blocks

    def order(self, source: int, repetition: int) -> np.ndarray:
        """The permutation of a source's blocks in one repetition (the last two of each source are kept)."""
        key = (source, repetition)
        if key not in self._orders:
            generator = np.random.default_rng(source_seed(self.seed, self.names[source], repetition))
            size = len(self.blocks[source])
            self._orders[key] = generator.permutation(size).astype(np.int32 if size < 2**31 else np.int64)
            for old in [k for k in self._orders if k[0] == source and k[1] < repetition - 1]:
                del self._orders[old]
        return self._orders[key]

    def describe(self, end: int) -> str:
        """One line: each source's share, blocks, and how many times a run that ends at position `end` reads it; a
        warning per source that is read more than MAX_REPEATS times."""
        parts = []
        for (name, read), weight, blocks in zip(self.reads(end).items(), self.weights, self.blocks):
            times = read / len(blocks)
            kind = "repeated" if read > len(blocks) else "once" if read == len(blocks) else \
                f"subsampled: {len(blocks) - read} blocks never read"
            parts.append(f"{name} {float(weight):.1%} of {len(blocks)} blocks, read {times:.2f}x ({kind})")
            if times > MAX_REPEATS and len(self.names) > 1:
                logger.warning(f"--train_mixture source {name}: read {times:.2f} times in this run ({len(blocks)} "
                               f"blocks at {float(weight):.1%}); a source repeated over {MAX_REPEATS} times is "
                               f"memorised rather than learned: lower its weight or add data to it")
        return "; ".join(parts)


class MixtureBlocks(torch.utils.data.Dataset):
    """The sources' blocks addressed as (source << 40 | block): a batch is read with one fancy index per source,
    and carries each block's source."""

    SHIFT = 40

    def __init__(self, blocks: list[np.ndarray]):
        self.blocks = blocks

    def __len__(self) -> int:
        return sum(map(len, self.blocks))

    def __getitem__(self, key: int):
        return self.__getitems__([key])

    def __getitems__(self, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keys = np.asarray(keys, dtype=np.int64)
        sources, rows = keys >> self.SHIFT, keys & ((1 << self.SHIFT) - 1)
        batch = np.empty((len(keys), self.blocks[0].shape[1]), dtype=np.int64)
        for source in np.unique(sources):
            here = sources == source
            batch[here] = self.blocks[source][rows[here]]
        return torch.from_numpy(batch), torch.from_numpy(sources)


class MixtureSampler(torch.utils.data.Sampler[int]):
    """The keys of the positions of one epoch (`set_epoch`): len(mixture) positions cut to whole global batches.

    Accelerate deals consecutive micro-batches of it to processes round-robin, so each rank reads disjoint blocks
    and every global batch holds the same positions whatever the world size and accumulation."""

    def __init__(self, mixture: Mixture, global_batch_blocks: int):
        self.mixture = mixture
        self.global_batch_blocks = global_batch_blocks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.mixture) // self.global_batch_blocks * self.global_batch_blocks

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * len(self)
        for chunk in range(start, start + len(self), 2**16):
            positions = np.arange(chunk, min(chunk + 2**16, start + len(self)), dtype=np.int64)
            sources, blocks = self.mixture.locate(positions)
            yield from ((sources << MixtureBlocks.SHIFT) | blocks).tolist()


@dataclass
class MixtureData:
    """A mixture's training blocks (the blend over its sources), each source's held-out blocks, and each source's
    data stats."""
    train: Mixture
    validation: dict[str, np.ndarray]
    stats: dict[str, dict[str, Any]]


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two mixtures' identities, in words."""
    found = []
    old, new = saved["sources"], current["sources"]
    for name in new:
        if name not in old:
            found.append(f"source {name} added")
        elif old[name]["weight"] != new[name]["weight"]:
            found.append(f"source {name} weight {float(Fraction(old[name]['weight'])):.4g} -> "
                         f"{float(Fraction(new[name]['weight'])):.4g}")
        elif old[name]["blocks"] != new[name]["blocks"]:
            found.append(f"source {name} has {new[name]['blocks']} blocks, had {old[name]['blocks']}")
    found += [f"source {name} removed" for name in old if name not in new]
    if saved.get("seed") != current.get("seed"):
        found.append(f"seed {saved.get('seed')} -> {current.get('seed')}")
    return found


def resume_mixture(mixture: Mixture, saved: dict[str, Any] | None, position: int) -> str | None:
    """Continue a checkpoint's mixture in this launch, which resumes at `position` (the checkpoint's position, or
    fewer than one global batch before it when the batch changed). The same mixture keeps its blend; a changed one
    starts a new blend at `position`, each source continuing from the blocks it had read (by name; a new source from
    its start). Returns what changed, in one line to warn about, or None."""
    if saved is not None and not changes(saved, mixture.identity()):
        mixture.origin = saved["origin"]
        mixture.origin_reads = np.array([saved["origin_reads"][name] for name in mixture.names], dtype=np.int64)
        in_first_period = position - mixture.origin < mixture.blend.period
        if saved["position"] == position and in_first_period:  # the index starts here, not from the blend's start
            mixture.blend.start_at(position - mixture.origin, [saved["reads"][name] - saved["origin_reads"][name]
                                                               for name in mixture.names])
        return None
    read = saved["reads"] if saved is not None else {}
    mixture.origin = position
    mixture.origin_reads = np.array([read.get(name, 0) for name in mixture.names], dtype=np.int64)
    if saved is None:
        return f"the checkpoint was trained without --train_mixture: the mixture starts at block {position}"
    return (f"the mixture changed since the checkpoint ({'; '.join(changes(saved, mixture.identity()))}): the blend "
            f"starts again at block {position}, each source continuing after the blocks it had read "
            f"({', '.join(f'{name} {count}' for name, count in read.items())})")
