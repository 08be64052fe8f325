"""Random balanced region graph of RAT-SPNs (Peharz et al., UAI 2020), tensorized.

Per repetition the variables are randomly permuted and split in halves ``depth`` times; the leaf
regions are then contiguous chunks of the permutation, ordered so that regions ``2j`` and ``2j + 1``
are siblings. Split sizes depend only on ``num_vars`` and ``depth``, so every repetition has the
same region sizes and the whole graph is a few small index tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def balanced_region_sizes(num_vars: int, depth: int) -> list[int]:
    """Sizes of the 2**depth leaf regions when ``num_vars`` are halved ``depth`` times (ceil first)."""
    if depth == 0:
        return [num_vars]
    left = (num_vars + 1) // 2
    return balanced_region_sizes(left, depth - 1) + balanced_region_sizes(num_vars - left, depth - 1)


@dataclass(frozen=True)
class RegionGraph:
    """Index tensors of one random region graph.

    ``permutation`` (R x V): variable at each position of each repetition; ``region_of`` (V x R):
    leaf region of each variable in each repetition; ``assignment`` (V x R x G) its one-hot form;
    ``sizes`` / ``starts``: size and first position of each of the G = 2**depth leaf regions.
    """

    num_vars: int
    depth: int
    num_repetitions: int
    permutation: Tensor
    region_of: Tensor
    assignment: Tensor
    sizes: tuple[int, ...]
    starts: tuple[int, ...]

    @property
    def num_leaf_regions(self) -> int:
        return 2**self.depth


def random_region_graph(num_vars: int, depth: int, num_repetitions: int, generator: torch.Generator) -> RegionGraph:
    """Draws one random balanced split per repetition from ``generator`` (seeded by the caller)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if num_vars < 2**depth:
        raise ValueError(f"num_vars={num_vars} is too small for depth={depth}: need at least {2**depth} variables")
    if num_repetitions < 1:
        raise ValueError(f"num_repetitions must be >= 1, got {num_repetitions}")
    sizes = balanced_region_sizes(num_vars, depth)
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    permutation = torch.stack([torch.randperm(num_vars, generator=generator) for _ in range(num_repetitions)])
    region_at_position = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    region_of = torch.empty(num_vars, num_repetitions, dtype=torch.long)
    for rep in range(num_repetitions):
        region_of[permutation[rep], rep] = region_at_position
    assignment = torch.nn.functional.one_hot(region_of, len(sizes)).float()
    return RegionGraph(
        num_vars=num_vars,
        depth=depth,
        num_repetitions=num_repetitions,
        permutation=permutation,
        region_of=region_of,
        assignment=assignment,
        sizes=tuple(sizes),
        starts=tuple(starts),
    )
