"""The leaf-family interface of the RAT-SPN and the slot layout every family reads its regions from.

The circuit (:class:`spn.RatSpn`) hands a family the observed values of its variables and gets back
log-probabilities per leaf region; from the region responsibilities it gets the family's EM
statistics; the M-step, data initialisation, modes and samples are the family's too. The circuit
never asks which family it holds (EinsumNetworks keeps its exponential-family arrays behind the same
kind of line).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spn.region_graph import RegionGraph

#: expected counts below this (plus the pseudo-count) leave a component's parameters unchanged.
MIN_COUNT = 1e-8


@dataclass(frozen=True)
class LeafLayout:
    """Where a family's variables sit in the region graph, as "slots".

    Region g of repetition r owns slots ``[g * smax, g * smax + smax)``; ``slot_var`` (R, G * smax)
    maps a slot to the family's (local) variable, ``num_vars`` marking padding; ``slot_of`` (V, R) maps
    (variable, repetition) back to its slot and ``region_of`` (V, R) to its region. Within a region the
    slots follow the region graph's position order. A family over all variables has a region's size
    of real slots in every repetition; one over a subset (composite leaves) may have fewer, even none.
    """

    num_vars: int
    num_repetitions: int
    num_regions: int
    max_region_size: int
    slot_var: Tensor
    slot_of: Tensor
    region_of: Tensor

    @classmethod
    def of(cls, graph: RegionGraph, variables: Tensor | None = None) -> LeafLayout:
        """The layout of ``variables`` (global indices, in the family's order; default: all)."""
        V, R, G = graph.num_vars, graph.num_repetitions, graph.num_leaf_regions
        variables = torch.arange(V) if variables is None else torch.as_tensor(variables, dtype=torch.long)
        local = torch.full((V,), -1, dtype=torch.long)
        local[variables] = torch.arange(len(variables))
        members = [
            [[int(v) for v in local[graph.permutation[r, a : a + z]] if v >= 0] for a, z in zip(graph.starts, graph.sizes)]
            for r in range(R)
        ]
        n = len(variables)
        # the most a region can hold, not what this graph happens to give: parameter shapes must not
        # depend on the seed (a state dict of another seed loads; for all variables: the largest region)
        smax = max(1, min(n, max(graph.sizes)))
        slot_var = torch.full((R, G * smax), n, dtype=torch.long)
        slot_of = torch.empty(n, R, dtype=torch.long)
        for r, rep in enumerate(members):
            for g, vs in enumerate(rep):
                slots = torch.arange(g * smax, g * smax + len(vs))
                slot_var[r, slots] = torch.tensor(vs, dtype=torch.long)
                slot_of[vs, r] = slots
        return cls(n, R, G, smax, slot_var, slot_of, graph.region_of[variables].clone())

    def to(self, device: torch.device) -> LeafLayout:
        """The same layout with its index tensors on ``device``."""
        return LeafLayout(self.num_vars, self.num_repetitions, self.num_regions, self.max_region_size,
                          self.slot_var.to(device), self.slot_of.to(device), self.region_of.to(device))

    @property
    def padded(self) -> bool:
        """Whether some slot holds no variable."""
        return bool((self.slot_var == self.num_vars).any())


class Leaves(nn.Module):
    """One leaf family over ``num_vars`` variables: I components per (repetition, variable).

    Subclasses implement the methods below; ``x`` and ``obs`` are the family's own columns (N x V,
    ``obs`` float 1 = observed, 0 = marginalised), ``missing`` says whether anything may be
    unobserved (else the fast fully observed paths are taken), ``resp`` (R, G, I, N) are the
    posterior responsibilities of the leaf-region components, ``rep`` (N,) the chosen repetition and
    ``comp`` (N, V) each variable's chosen component.
    """

    #: whether the family's values are category indices (long) rather than real numbers.
    discrete: bool = False
    #: rows per block of a large forward pass (None: one block).
    forward_block: int | None = None

    def __init__(self, layout: LeafLayout, num_components: int) -> None:
        super().__init__()
        self.num_vars = layout.num_vars
        self.num_repetitions = layout.num_repetitions
        self.num_regions = layout.num_regions
        self.num_components = num_components
        self.set_layout(layout)

    def set_layout(self, layout: LeafLayout) -> None:
        """(Re)builds the index buffers of ``layout`` (derived from the circuit's region graph: not
        saved, rebuilt when a state dict brings another graph)."""
        self.max_region_size = layout.max_region_size
        R, G, smax = self.num_repetitions, self.num_regions, self.max_region_size
        self.register_buffer("slot_var", layout.slot_var, persistent=False)
        self.register_buffer("slot_of", layout.slot_of, persistent=False)
        self.register_buffer("region_of", layout.region_of, persistent=False)
        self.register_buffer("slot_valid", (layout.slot_var < layout.num_vars).view(R, G, 1, smax), persistent=False)

    def relayout(self, graph: RegionGraph) -> None:
        """Rebuilds the index buffers for another region graph over the same variables."""
        self.set_layout(LeafLayout.of(graph).to(self.slot_var.device))

    @property
    def num_parameters(self) -> int:
        """Free leaf parameters, counted the EinsumNetworks way."""
        raise NotImplementedError

    def region_log_probs(self, x: Tensor, obs: Tensor, missing: bool) -> tuple[Tensor, object]:
        """Log-probability of every leaf region's component (R, G, I, N), a marginalised variable
        contributing log 1 = 0, and what :meth:`statistics` may reuse of the pass."""
        raise NotImplementedError

    def statistics(self, x: Tensor, obs: Tensor, resp: Tensor, missing: bool, reuse: object) -> dict[str, Tensor]:
        """Expected sufficient statistics (sums over the batch, so chunks and ranks add up), keys ``leaf_*``."""
        raise NotImplementedError

    def m_step(self, stats: dict[str, Tensor], step_size: float, pseudo_count: float, track_changes: bool = False) -> Tensor:
        """Online EM update in place: interpolate towards the smoothed M-step by ``step_size``; a
        component with (near) zero expected count keeps its parameters. Returns the mean change."""
        raise NotImplementedError

    def init_from_data(self, x: Tensor, obs: Tensor, picks: Tensor, sharpness: float = 0.5) -> None:
        """Places component i of repetition r on data row ``picks[r, i]`` (x, obs on the CPU); a
        discrete family puts ``sharpness`` of a component's mass on its row's category."""
        raise NotImplementedError

    def mode(self, rep: Tensor, comp: Tensor, x: Tensor, missing: Tensor) -> Tensor:
        """``x`` with every ``missing`` entry replaced by the mode of its chosen component."""
        raise NotImplementedError

    def sample(self, rep: Tensor, comp: Tensor, x: Tensor, missing: Tensor, generator: torch.Generator) -> Tensor:
        """``x`` with every ``missing`` entry drawn from its chosen component."""
        raise NotImplementedError

    def blank(self, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Placeholder values (N x V) for unconditional sampling: category 0, or 0.0 in ``dtype``."""
        return torch.zeros(n, self.num_vars, dtype=torch.long if self.discrete else dtype, device=device)

    def snapshot(self) -> dict[str, Tensor]:
        """What :meth:`distance_from` compares against (e.g. at the start of a fit)."""
        return {}

    def distance_from(self, snapshot: dict[str, Tensor]) -> dict[str, Tensor]:
        """How far EM moved the leaves since ``snapshot``: metric name -> value."""
        return {}

    def region_at_slot(self) -> Tensor:
        """(G * smax,) region of every slot."""
        return torch.arange(self.num_regions, device=self.slot_var.device).repeat_interleave(self.max_region_size)

    def slot_major(self, t: Tensor) -> Tensor:
        """(R, G, I, smax) slot-layout tensor -> (R, G * smax, I), indexable by ``slot_of``."""
        R, G, I, smax = self.num_repetitions, self.num_regions, self.num_components, self.max_region_size  # noqa: E741
        return t.transpose(2, 3).reshape(R, G * smax, I)
