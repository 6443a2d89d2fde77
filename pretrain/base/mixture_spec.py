"""--train_mixture's items, NAME=WEIGHT:FILES[,FILES...], parsed into sources (each bad item refused in one line)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from pretrain.base.errors import UsageError


@dataclass
class MixtureSource:
    """One source of --train_mixture, as written: its name, its weight (exact, as the decimal the user wrote) and
    its files or globs."""
    name: str
    weight: Fraction
    files: list[str]


SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a name that is also a chart name and a metrics.jsonl key


def parse_mixture(specs: list[str]) -> list[MixtureSource]:
    """NAME=WEIGHT:FILES[,FILES...] items into sources, refusing each bad item in one line that names it."""
    sources: list[MixtureSource] = []
    for spec in specs:
        name, equals, rest = spec.partition("=")
        weight_text, colon, files = rest.partition(":")
        if not equals or not colon or not files.strip(","):
            raise UsageError(f"--train_mixture '{spec}': write NAME=WEIGHT:FILES, e.g. code=0.2:'data/code/*.jsonl'")
        if not SOURCE_NAME.match(name):
            raise UsageError(f"--train_mixture '{spec}': the source name '{name}' may hold only letters, digits, "
                             f"'_', '-' and '.'")
        try:
            weight = Fraction(weight_text.strip())
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"--train_mixture source {name}: weight '{weight_text}' is not a number") from None
        if weight <= 0:
            raise UsageError(f"--train_mixture source {name}: weight {weight_text} must be positive (leave the "
                             f"source out to drop it)")
        if name in [source.name for source in sources]:
            raise UsageError(f"--train_mixture source {name}: named twice; give each source one name")
        sources.append(MixtureSource(name, weight, [f for f in files.split(",") if f]))
    if not sources:
        raise UsageError("--train_mixture: no sources given")
    return sources
