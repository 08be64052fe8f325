"""Leaf families of the RAT-SPN behind one interface (:class:`Leaves`), and the factory the circuit uses.

A leaf specification is ``"gaussian"``, ``"categorical"``, or a composite: a sequence of
``(family, variables)`` pairs over disjoint variable subsets that together cover every variable, e.g.
``[("categorical", range(64)), ("gaussian", [64, 65])]`` for 64 VQ-VAE codes plus 2 context values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spn.leaves.base import LeafLayout, Leaves
from spn.leaves.categorical import LOG_FLOOR, CategoricalLeaves
from spn.leaves.composite import CompositeLeaves
from spn.leaves.gaussian import GaussianLeaves
from spn.region_graph import RegionGraph

LeafSpec = str | Sequence[tuple[str, Sequence[int]]]
FAMILIES = ("gaussian", "categorical")


def _family(name: str, layout: LeafLayout, num_components: int, generator: torch.Generator, num_categories: int | None,
            min_var: float, max_var: float) -> Leaves:
    if name == "gaussian":
        return GaussianLeaves(layout, num_components, generator, min_var=min_var, max_var=max_var)
    if name == "categorical":
        return CategoricalLeaves(layout, num_components, generator, num_categories=num_categories)
    raise ValueError(f"leaf must be 'gaussian' or 'categorical', got {name!r}")


def family_name(spec: LeafSpec) -> str:
    """``"gaussian"``, ``"categorical"`` or ``"composite"``; raises on a malformed specification."""
    if isinstance(spec, str):
        if spec not in FAMILIES:
            raise ValueError(f"leaf must be 'gaussian' or 'categorical', got {spec!r}")
        return spec
    return "composite"


def build_leaves(spec: LeafSpec, graph: RegionGraph, num_components: int, generator: torch.Generator,
                 num_categories: int | None = None, min_var: float = 1e-3, max_var: float = 100.0) -> Leaves:
    """The leaves of ``spec`` on ``graph``, initialised from ``generator`` (family by family, in order)."""
    if family_name(spec) != "composite":
        return _family(spec, LeafLayout.of(graph), num_components, generator, num_categories, min_var, max_var)
    parts = [(name, torch.as_tensor(list(variables), dtype=torch.long)) for name, variables in spec]
    if not parts:
        raise ValueError("a composite leaf specification needs at least one (family, variables) pair")
    covered = torch.cat([v for _, v in parts]).sort().values
    if not torch.equal(covered, torch.arange(graph.num_vars)):
        raise ValueError(f"composite leaves must put every one of the {graph.num_vars} variables in exactly one family, got {covered.tolist()}")
    families, seen = {}, {}
    for name, variables in parts:
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}{seen[name]}"
        layout = LeafLayout.of(graph, variables)
        families[key] = (_family(name, layout, num_components, generator, num_categories, min_var, max_var), variables)
    return CompositeLeaves(LeafLayout.of(graph), num_components, families)


__all__ = [
    "LOG_FLOOR",
    "CategoricalLeaves",
    "CompositeLeaves",
    "GaussianLeaves",
    "LeafLayout",
    "LeafSpec",
    "Leaves",
    "build_leaves",
    "family_name",
]
