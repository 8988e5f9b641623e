"""The sparsity grid: its points (norm, block shape, level), how users spell them, and which
points share their pruned weights."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from dlrm_sparsity.errors import UserInputError

SEED_LEVELS = tuple([i / 10 for i in range(10)] + [round(0.9 + i / 100, 2) for i in range(1, 10)]
                    + [1.0])
SEED_BLOCK_SHAPES = ((1, 1), (1, 4))
SEED_NORMS = ("L1", "L2")
NORMS = ("L1", "L2")


@dataclass(frozen=True)
class GridPoint:
    norm: str
    block_shape: tuple[int, int]
    level: float

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.norm, block_label(self.block_shape), self.level)

    @property
    def config(self) -> str:
        return f"{self.norm} {block_label(self.block_shape)}"

    def zip_relpath(self) -> Path:
        r, c = self.block_shape
        return (Path(self.norm) / f"config_{r}x{c}"
                / f"criteo_model_norm={self.norm}_sl={self.level:g}.zip")


def block_label(shape: Sequence[int]) -> str:
    """The seed's spelling in CSVs: "(1, 4)"."""
    return f"({shape[0]}, {shape[1]})"


def parse_block_shape(text: str) -> tuple[int, int]:
    """'1x4', '1,4' or '(1, 4)' -> (1, 4); both sides positive integers."""
    match = re.fullmatch(r"\(?\s*(\d+)\s*[x,X ]\s*(\d+)\s*\)?", text.strip())
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise UserInputError(f"block shape {text!r}: expected RxC with positive R and C, "
                             "for example 1x4")
    return int(match.group(1)), int(match.group(2))


def parse_level(text: str | float) -> float:
    try:
        level = float(text)
    except ValueError:
        raise UserInputError(f"sparsity level {text!r} is not a number") from None
    if not 0.0 <= level <= 1.0:
        raise UserInputError(f"sparsity level {text} is outside [0, 1]")
    return level


def parse_norm(text: str) -> str:
    norm = text.upper()
    if norm not in NORMS:
        raise UserInputError(f"unknown norm {text!r}: expected one of {', '.join(NORMS)}")
    return norm


def build_grid(levels: Iterable[float], norms: Iterable[str],
               block_shapes: Iterable[tuple[int, int]], keep_l2_1x1: bool = False
               ) -> tuple[list[GridPoint], list[str]]:
    """The grid in the seed's order (norm, block shape, level) and the configs left out.

    L2 with 1x1 blocks ranks single weights by x*x, which orders them as |x| does, so its masks
    are exactly L1 1x1's; like the seed, it is left out unless asked for.
    """
    points, skipped = [], []
    for norm in dict.fromkeys(norms):
        for shape in dict.fromkeys(block_shapes):
            if norm == "L2" and shape == (1, 1) and not keep_l2_1x1:
                skipped.append(f"L2 {block_label(shape)}")
                continue
            points += [GridPoint(norm, shape, level) for level in dict.fromkeys(levels)]
    return points, skipped


def shared_weights(points: list[GridPoint]) -> dict[GridPoint, GridPoint]:
    """Points whose pruned weights equal an earlier point's, mapped to that point.

    Level 0 prunes nothing and level 1 prunes everything, whatever the norm and block shape.
    """
    first: dict[float, GridPoint] = {}
    copies = {}
    for point in points:
        if point.level in (0.0, 1.0):
            copies.update({point: first[point.level]} if point.level in first else {})
            first.setdefault(point.level, point)
    return copies
