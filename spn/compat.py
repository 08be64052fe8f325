"""Names of the RAT-SPN's leaves from before :mod:`spn.leaves` existed, kept for callers and checkpoints.

``RatSpn.leaf_mean`` and friends read through to ``RatSpn.leaves``; a state dict saved with the old
keys (``leaf_mean``, ``leaf_table``, ...) loads into the new layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spn.leaves import CategoricalLeaves, GaussianLeaves, Leaves
from spn.region_graph import RegionGraph

#: attribute and state-dict names of the leaves from before spn.leaves existed -> their name in ``leaves``.
_LEGACY_LEAF_NAMES = {
    "leaf_mean": "mean",
    "leaf_log_var": "log_var",
    "leaf_table": "table",
    "leaf_log_table": "log_table",
    "leaf_log_scale": "log_scale",
    "slot_valid": "slot_valid",
    "slot_var": "slot_var",
    "slot_of": "slot_of",
}
#: index buffers old checkpoints saved that are now derived from the region graph.
_LEGACY_DERIVED = ("slot_var", "slot_of", "slot_valid", "feature_rows", "table_base")


class LegacyLeafNames:
    """Mixin of :class:`spn.RatSpn` (before ``nn.Module`` in its bases): the old leaf attribute names, the
    old state-dict keys, and leaves that follow the region graph a state dict brings."""

    def __getattr__(self, name: str):  # noqa: ANN204 (nn.Module's own __getattr__ is untyped too)
        if name in _LEGACY_LEAF_NAMES:
            return getattr(self.leaves, _LEGACY_LEAF_NAMES[name])
        return super().__getattr__(name)  # type: ignore[misc]

    @staticmethod
    def _rename_legacy_keys(module: Any, state_dict: dict, prefix: str, *args: object) -> None:
        """Checkpoints from before :mod:`spn.leaves`: ``leaf_mean`` -> ``leaves.mean`` etc.; the index
        buffers they saved are derived from the region graph now and are dropped."""
        if not any(f"{prefix}{old}" in state_dict for old in ("leaf_mean", "leaf_table")):
            return
        for old in _LEGACY_DERIVED:
            state_dict.pop(f"{prefix}{old}", None)
        for old, new in _LEGACY_LEAF_NAMES.items():
            if f"{prefix}{old}" in state_dict:
                state_dict[f"{prefix}leaves.{new}"] = state_dict.pop(f"{prefix}{old}")

    @staticmethod
    def _follow_loaded_graph(module: Any, incompatible_keys: object) -> None:
        """A state dict of another seed brings another region graph: the leaves' index buffers follow it."""
        graph = RegionGraph(
            module.num_vars, module.depth, module.num_repetitions, module.permutation.cpu(), module.region_of.cpu(),
            module.assignment.cpu(), module.region_sizes, module.region_starts,
        )
        built_from = module.__dict__.get("_layout_permutation")
        if built_from is None or not torch.equal(built_from, graph.permutation):
            module.leaves.relayout(graph)
            module.__dict__["_layout_permutation"] = graph.permutation.clone()

    def leaf_variance(self) -> Tensor:
        """Gaussian leaf variances in slot layout (R, G, I, smax), clamped to [min_var, max_var]."""
        return self._family(GaussianLeaves).variance()

    def gaussian_leaves(self) -> tuple[Tensor, Tensor]:
        """Gaussian leaf (mean, variance), each V x R x I: variable v's component i in repetition r."""
        return self._family(GaussianLeaves).per_variable()

    def categorical_log_probs(self, rep: int, var: int) -> Tensor:
        """Leaf log-probabilities (K x I) of variable ``var`` in repetition ``rep`` (categorical)."""
        return self._family(CategoricalLeaves).log_probs(rep, var)

    def _family(self, cls: type) -> Leaves:
        if not isinstance(self.leaves, cls):
            raise TypeError(f"this RatSpn has {type(self.leaves).__name__}, not {cls.__name__}")
        return self.leaves
