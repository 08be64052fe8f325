"""Different leaf families on disjoint variable subsets of one RAT-SPN (e.g. categorical codes plus
Gaussian context variables), so that p(codes, context) and its marginal p(context) come from one circuit."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spn.leaves.base import LeafLayout, Leaves
from spn.region_graph import RegionGraph


class CompositeLeaves(Leaves):
    """Families ``families[name]`` over the variables ``variables_<name>`` (global indices, disjoint,
    together every variable). A region's log-probability is the sum of its families' (a family with no
    variable in a region adds log 1 = 0); statistics, M-step, initialisation, modes and samples are
    each family's on its own columns. Statistics keys are ``<name>.<key>``."""

    def __init__(self, layout: LeafLayout, num_components: int, families: dict[str, tuple[Leaves, Tensor]]) -> None:
        super().__init__(layout, num_components)
        self.families = nn.ModuleDict({name: family for name, (family, _) in families.items()})
        for name, (_, variables) in families.items():
            self.register_buffer(f"variables_{name}", torch.as_tensor(variables, dtype=torch.long), persistent=False)
        blocks = [f.forward_block for f in self.families.values() if f.forward_block is not None]
        self.forward_block = min(blocks) if blocks else None

    def _parts(self) -> list[tuple[str, Leaves, Tensor]]:
        return [(name, family, getattr(self, f"variables_{name}")) for name, family in self.families.items()]

    def relayout(self, graph: RegionGraph) -> None:
        super().relayout(graph)
        for _, family, var in self._parts():
            family.set_layout(LeafLayout.of(graph, var.cpu()).to(var.device))

    @property
    def num_parameters(self) -> int:
        return sum(f.num_parameters for f in self.families.values())

    def region_log_probs(self, x: Tensor, obs: Tensor, missing: bool) -> tuple[Tensor, list[object]]:
        total, reuse = None, []
        for _, family, var in self._parts():
            regions, kept = family.region_log_probs(x[:, var], obs[:, var], missing)
            total = regions if total is None else total.add_(regions)  # both fresh tensors: add in place
            reuse.append(kept)
        return total, reuse

    def statistics(self, x: Tensor, obs: Tensor, resp: Tensor, missing: bool, reuse: list[object] | None) -> dict[str, Tensor]:
        stats = {}
        for j, (name, family, var) in enumerate(self._parts()):
            part = family.statistics(x[:, var], obs[:, var], resp, missing, None if reuse is None else reuse[j])
            stats.update({f"{name}.{key}": value for key, value in part.items()})
        return stats

    def m_step(self, stats: dict[str, Tensor], step_size: float, pseudo_count: float, track_changes: bool = False) -> Tensor:
        moved = []
        for name, family, _ in self._parts():
            own = {key[len(name) + 1 :]: value for key, value in stats.items() if key.startswith(f"{name}.")}
            moved.append(torch.as_tensor(family.m_step(own, step_size, pseudo_count, track_changes), dtype=torch.float64))
        return torch.stack(moved).mean()

    def init_from_data(self, x: Tensor, obs: Tensor, picks: Tensor, sharpness: float = 0.5) -> None:
        for _, family, var in self._parts():
            family.init_from_data(x[:, var.cpu()], obs[:, var.cpu()], picks, sharpness)

    def _assemble(self, x: Tensor, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
        out = x.to(x.dtype if x.is_floating_point() else torch.get_default_dtype()).clone()
        for var, values in parts:
            out[:, var] = values.to(out.dtype)
        return out

    def mode(self, rep: Tensor, comp: Tensor, x: Tensor, missing: Tensor) -> Tensor:
        """``x`` (as floats) with the missing entries replaced by the modes (categories as floats)."""
        return self._assemble(x, [(v, f.mode(rep, comp[:, v], x[:, v], missing[:, v])) for _, f, v in self._parts()])

    def sample(self, rep: Tensor, comp: Tensor, x: Tensor, missing: Tensor, generator: torch.Generator) -> Tensor:
        """``x`` (as floats) with the missing entries drawn (categories as floats), family by family."""
        parts = [(v, f.sample(rep, comp[:, v], x[:, v], missing[:, v], generator)) for _, f, v in self._parts()]
        return self._assemble(x, parts)

    def snapshot(self) -> dict[str, Tensor]:
        return {f"{name}.{k}": v for name, family, _ in self._parts() for k, v in family.snapshot().items()}

    def distance_from(self, snapshot: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, family, _ in self._parts():
            own = {k[len(name) + 1 :]: v for k, v in snapshot.items() if k.startswith(f"{name}.")}
            out.update({f"{name}.{k}": v for k, v in family.distance_from(own).items()})
        return out
