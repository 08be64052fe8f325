"""RAT-SPN: random tensorized sum-product network with exact inference and stochastic EM.

Peharz et al., "Random Sum-Product Networks: A Simple and Effective Approach to Probabilistic Deep
Learning" (UAI 2020), evaluated the Einsum-Network way (Peharz et al., ICML 2020): every sum layer is
one log-einsum-exp, and the EM statistics come from the posterior responsibilities of the leaf
regions (closed form at depth 1, autograd of the log-likelihood with respect to the region
log-probabilities otherwise), handed to the leaf family (:mod:`spn.leaves`) for its statistics.

Layout (R repetitions, G = 2**depth leaf regions per repetition, I leaf components per region,
S internal sums, C roots): leaf regions ``(R, G, I, N)`` (batch last) -> ``depth`` product+sum layers that pair the
sibling regions ``2j, 2j+1`` and take weighted sums over all I x I (or S x S) products -> one root
value per repetition and root ``(R, N, C)`` -> a mixing layer over the repetitions ``(N, C)``.
This module holds the structure and the sums; it never asks which leaf family it holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spn.cache import derived
from spn.compat import LegacyLeafNames
from spn.distributed import default_stats_reducer
from spn.leaves import CategoricalLeaves, LeafSpec, Leaves, build_leaves, family_name
from spn.leaves.base import MIN_COUNT
from spn.region_graph import random_region_graph

StatsReducer = Callable[[dict[str, Tensor]], dict[str, Tensor]]


class RatSpn(LegacyLeafNames, nn.Module):
    """RAT-SPN density p(x) over ``num_vars`` variables with the leaves of ``leaf`` (:mod:`spn.leaves`).

    ``leaf``: ``"gaussian"``, ``"categorical"`` (with ``num_categories``), or a composite specification
    ``[("categorical", code_vars), ("gaussian", context_vars)]`` putting families on disjoint subsets.

    Parameters (paper setting ``RatSpn(64, depth=1, num_repetitions=50, num_input_distributions=45)``,
    Gaussian leaves): leaves 64 x 50 x 45 x (mean, variance) = 288,000; product-sum weights
    50 x 45 x 45 = 101,250; a separate mixing layer over the repetitions, 50. Total **389,300**
    (counted the EinsumNetworks way; without the mixing layer it would be 389,250).

    Sum weights are ``nn.Parameter`` (so DDP can wrap the module and gradient training is possible);
    EM (:meth:`em_update`) writes them and the leaves in place. The leaves are ``self.leaves``; the
    pre-refactoring names (``leaf_mean``, ``leaf_table``, ...) still read through to them, and old
    state dicts load.
    """

    def __init__(
        self,
        num_vars: int,
        depth: int = 1,
        num_repetitions: int = 50,
        num_input_distributions: int = 45,
        num_sums: int = 10,
        num_roots: int = 1,
        leaf: LeafSpec = "gaussian",
        num_categories: int | None = None,
        seed: int = 0,
        min_var: float = 1e-3,
        max_var: float = 100.0,
        pseudo_count: float = 0.1,
    ) -> None:
        super().__init__()
        family_name(leaf)  # a malformed specification fails before any work
        for name, value in (("num_input_distributions", num_input_distributions), ("num_sums", num_sums), ("num_roots", num_roots)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_vars = num_vars
        self.depth = depth
        self.num_repetitions = num_repetitions
        self.num_input_distributions = num_input_distributions
        self.num_sums = num_sums
        self.num_roots = num_roots
        self.leaf = family_name(leaf)
        self.seed = seed
        self.min_var = min_var
        self.max_var = max_var
        self.pseudo_count = pseudo_count

        gen = torch.Generator().manual_seed(seed)
        graph = random_region_graph(num_vars, depth, num_repetitions, gen)
        self.region_sizes = graph.sizes
        self.region_starts = graph.starts
        self.register_buffer("permutation", graph.permutation)
        self.register_buffer("region_of", graph.region_of)
        self.register_buffer("assignment", graph.assignment)

        R, I = num_repetitions, num_input_distributions  # noqa: E741 (I = input distributions, as in the paper)
        # sum layers, top (level 0: one region per repetition, C roots) to bottom (inputs: I leaves)
        weights = []
        for level in range(depth):
            regions = 2**level
            s_out = num_roots if level == 0 else num_sums
            s_in = I if level == depth - 1 else num_sums
            w = 0.01 + 0.98 * torch.rand(R, regions, s_out, s_in, s_in, generator=gen)
            weights.append(nn.Parameter(torch.log(w / w.sum((-2, -1), keepdim=True))))
        self.log_weights = nn.ParameterList(weights)
        mix = 0.01 + 0.98 * torch.rand(num_roots, R, generator=gen)
        self.log_mix = nn.Parameter(torch.log(mix / mix.sum(-1, keepdim=True)))
        self.leaves: Leaves = build_leaves(leaf, graph, I, gen, num_categories, min_var, max_var)
        self.__dict__["_layout_permutation"] = graph.permutation.clone()  # the graph the leaves index
        categorical = any(isinstance(m, CategoricalLeaves) for m in self.leaves.modules())
        self.num_categories = num_categories if categorical else None
        self.register_load_state_dict_pre_hook(LegacyLeafNames._rename_legacy_keys)
        self.register_load_state_dict_post_hook(LegacyLeafNames._follow_loaded_graph)

    @property
    def num_parameters(self) -> int:
        """Free-parameter count the EinsumNetworks way (leaf parameters + every sum weight)."""
        weights = sum(w.numel() for w in self.log_weights) + self.log_mix.numel()
        return weights + self.leaves.num_parameters

    def _observed(self, x: Tensor, missing: Tensor | None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_vars:
            raise ValueError(f"expected x of shape (N, {self.num_vars}), got {tuple(x.shape)}")
        if missing is None:
            return torch.ones(x.shape, dtype=self._float_dtype(), device=x.device)
        if missing.shape != x.shape:
            raise ValueError(f"missing must have the shape of x {tuple(x.shape)}, got {tuple(missing.shape)}")
        return (~missing.bool()).to(self._float_dtype())

    def _float_dtype(self) -> torch.dtype:
        return self.log_mix.dtype

    def _normalised_weights(self) -> list[Tensor]:
        """Sum weights as probabilities (R, regions, S_out, S_in, S_in) per level (cached while unchanged)."""
        return [derived(self, f"weights.{level}", (w,), lambda w=w: self._softmax_children(w)) for level, w in enumerate(self.log_weights)]

    @staticmethod
    def _softmax_children(log_w: Tensor) -> Tensor:
        shape = log_w.shape
        return torch.softmax(log_w.reshape(*shape[:3], -1), -1).view(shape)

    # ------------------------------------------------------------------ sum layers
    @staticmethod
    def _log_einsum_exp(left: Tensor, right: Tensor, weight: Tensor) -> Tensor:
        """log sum_{a,b} W[s,a,b] exp(left[a] + right[b]) per (r, j, n): one batched matmul.

        left/right: (R, J, A, N) log-values; weight: (R, J, S, A, A) probabilities -> (R, J, S, N).
        """
        R, J, A, N = left.shape
        S = weight.shape[2]
        ml = left.detach().amax(2, keepdim=True)
        mr = right.detach().amax(2, keepdim=True)
        ml.nan_to_num_(0.0, 0.0, 0.0)  # an all -inf (or NaN) column shifts by 0
        mr.nan_to_num_(0.0, 0.0, 0.0)
        el = torch.exp(left - ml)
        er = torch.exp(right - mr)
        # T[r, j, s, a, n] = sum_b W[r, j, s, a, b] er[r, j, b, n]
        t = torch.bmm(weight.reshape(R * J, S * A, A), er.reshape(R * J, A, N)).view(R, J, S, A, N)
        out = (t * el.unsqueeze(2)).sum(3)
        return torch.log(out) + ml + mr

    def _upward(
        self, regions: Tensor, weights: list[Tensor], mix: Tensor, keep: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """From leaf regions (R, G, I, N) to root log-values (N, C); optionally keeps each layer's input."""
        inputs = []
        values = regions
        for level in reversed(range(self.depth)):
            if keep:
                inputs.append(values)
            values = self._log_einsum_exp(values[:, 0::2], values[:, 1::2], weights[level])
        inputs.reverse()  # inputs[level] = the values feeding sum layer `level`
        top = values[:, 0]  # R x C x N
        m = top.detach().amax(0)
        m.nan_to_num_(0.0, 0.0, 0.0)  # an all -inf (or NaN) column shifts by 0
        root = (torch.log(torch.einsum("rcn,cr->cn", torch.exp(top - m), mix)) + m).T
        if keep:
            inputs.append(top)
        return root, inputs

    def _regions(self, x: Tensor, obs: Tensor, missing: Tensor | None) -> tuple[Tensor, object]:
        return self.leaves.region_log_probs(x, obs, missing is not None)

    # ------------------------------------------------------------------ inference
    def log_likelihood(self, x: Tensor, missing: Tensor | None = None) -> Tensor:
        """Exact log p(x) per root, (N, C); variables flagged in ``missing`` (bool N x V) are integrated out."""
        n = x.shape[0]
        block = self.leaves.forward_block
        if block is not None and n > block:  # blocks of rows keep the (R, G, I, N) layers in cache
            return torch.cat(
                [
                    self.log_likelihood(x[s : s + block], None if missing is None else missing[s : s + block])
                    for s in range(0, n, block)
                ]
            )
        obs = self._observed(x, missing)
        root, _ = self._upward(self._regions(x, obs, missing)[0], self._normalised_weights(), torch.softmax(self.log_mix, -1))
        return root

    forward = log_likelihood

    def _descend(self, inputs: list[Tensor], root: int, choose: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Top-down selection through the circuit: returns repetition (N,) and leaf component per region (N, G).

        ``inputs`` are the layer inputs kept by :meth:`_upward`; ``choose`` maps scores (B, K) to indices (B,):
        argmax for MPE, a seeded categorical draw for sampling. Scores are log-weight + child log-values,
        i.e. the posterior over the children given the evidence.
        """
        top = inputs[-1]  # R x C x N
        n = top.shape[2]
        rows = torch.arange(n, device=top.device)
        rep = choose((torch.log_softmax(self.log_mix, -1)[root][:, None] + top[:, root]).T)
        chosen = torch.full((n, 1), root, dtype=torch.long, device=top.device)
        for level, log_w in enumerate(self.log_weights):
            values = inputs[level]  # R x 2J x A x N
            J, A = log_w.shape[1], log_w.shape[-1]
            log_w = torch.log_softmax(log_w.reshape(*log_w.shape[:3], -1), -1)
            w = log_w[rep[:, None], torch.arange(J, device=top.device)[None], chosen]  # n x J x A*A
            v = values[rep, :, :, rows]  # n x 2J x A: (rep[n], :, :, n)
            scores = w.view(n, J, A, A) + v[:, 0::2, :, None] + v[:, 1::2, None, :]
            flat = choose(scores.reshape(n * J, A * A)).view(n, J)
            nxt = torch.empty(n, 2 * J, dtype=torch.long, device=top.device)
            nxt[:, 0::2] = flat // A
            nxt[:, 1::2] = flat % A
            chosen = nxt
        return rep, chosen

    def _leaf_components(self, rep: Tensor, chosen: Tensor) -> Tensor:
        """Leaf component index (N, V) of every variable under the selected sub-circuit."""
        region = self.region_of.T[rep]  # N x V
        return chosen.gather(1, region)

    @torch.no_grad()
    def mpe(self, x: Tensor, missing: Tensor, root: int = 0) -> Tensor:
        """Most probable explanation of the ``missing`` variables given the observed ones (per sample).

        The usual max-product approximation for SPNs: exact bottom-up marginals, then top-down the
        child with the largest posterior weight at every sum node; missing variables take the mode of
        their selected leaf, observed variables are returned unchanged.
        """
        rep, comp = self._select(x, missing, root, lambda s: s.argmax(-1))
        return self.leaves.mode(rep, comp, x, missing)

    def _select(self, x: Tensor, missing: Tensor, root: int, choose: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Bottom-up evidence, then the top-down choice: repetition (N,) and component (N, V) per variable."""
        obs = self._observed(x, missing)
        regions, _ = self._regions(x, obs, missing)
        _, inputs = self._upward(regions, self._normalised_weights(), torch.softmax(self.log_mix, -1), keep=True)
        rep, chosen = self._descend(inputs, root, choose)
        return rep, self._leaf_components(rep, chosen)

    @torch.no_grad()
    def sample(
        self, n: int, seed: int | None = None, x: Tensor | None = None, missing: Tensor | None = None, root: int = 0
    ) -> Tensor:
        """``n`` exact ancestral samples (N x V); with ``x``/``missing``, samples p(missing | observed)."""
        gen = torch.Generator(device=self.log_mix.device)
        gen.manual_seed(self.seed + 1 if seed is None else seed)
        dev = self.log_mix.device
        if x is None:
            x = self.leaves.blank(n, dev, self._float_dtype())
            missing = torch.ones(n, self.num_vars, dtype=torch.bool, device=dev)
        elif missing is None:
            raise ValueError("conditional sampling needs the missing mask")

        def draw(scores: Tensor) -> Tensor:
            probs = torch.softmax(scores.float(), -1)
            return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

        rep, comp = self._select(x, missing, root, draw)
        return self.leaves.sample(rep, comp, x, missing, gen)

    # ------------------------------------------------------------------ initialisation from data
    @torch.no_grad()
    def init_from_data(self, x: Tensor, missing: Tensor | None = None, seed: int | None = None, sharpness: float = 0.5) -> None:
        """Places the leaves on the data, because a step of 1e-4 barely moves a random initialisation.

        Every (repetition, component) is given one random data row: Gaussian leaves take their means
        from it and the per-variable data variance; categorical ones put ``sharpness`` of their mass on
        its code and the rest on the variable's smoothed data histogram.
        """
        gen = torch.Generator().manual_seed(self.seed + 2 if seed is None else seed)
        obs = self._observed(x, missing).cpu()
        x = x.detach().cpu()
        picks = torch.randint(0, x.shape[0], (self.num_repetitions, self.num_input_distributions), generator=gen)
        self.leaves.init_from_data(x, obs, picks, sharpness)

    # ------------------------------------------------------------------ EM
    def em_statistics(
        self, x: Tensor, missing: Tensor | None = None, root: Tensor | int = 0, chunk_size: int = 1024
    ) -> dict[str, Tensor]:
        """Expected sufficient statistics of one batch (the gradients of sum_n log p(x_n), EinsumNetworks-style).

        Keys: ``weights.<level>`` and ``mix`` (expected counts of every sum edge), the leaf family's
        (:meth:`spn.leaves.Leaves.statistics`; a sparse one becomes a dense table when the batch was
        chunked), plus ``log_likelihood`` (sum) and ``count``. Batches above ``chunk_size`` rows are
        processed in chunks (the statistics are sums), so memory stays bounded for any batch size.
        """
        n = x.shape[0]
        if n <= chunk_size:
            return self._em_statistics(x, missing, root)
        total: dict[str, Tensor] = {}
        for start in range(0, n, chunk_size):
            part = slice(start, start + chunk_size)
            stats = self._em_statistics(
                x[part], None if missing is None else missing[part], root if isinstance(root, int) else root[part]
            )
            for key, value in stats.items():
                if value.is_sparse:  # large batch: a dense accumulator is smaller than all chunks' rows
                    if key not in total:
                        total[key] = torch.zeros(value.shape, dtype=value.dtype, device=value.device)
                    total[key].index_add_(0, value._indices()[0], value._values())
                elif key not in total:
                    total[key] = value
                else:
                    total[key] = total[key] + value
        return total

    def _em_statistics(self, x: Tensor, missing: Tensor | None, root: Tensor | int) -> dict[str, Tensor]:
        if self.depth == 1:
            return self._em_statistics_depth1(x, missing, root)
        return self._em_statistics_autograd(x, missing, root)

    @torch.no_grad()
    def _em_statistics_depth1(self, x: Tensor, missing: Tensor | None, root: Tensor | int) -> dict[str, Tensor]:
        """The statistics of :meth:`_em_statistics_autograd` in closed form, for depth 1 (no autograd).

        Per repetition r and root c the circuit is a bilinear form p_rc = a_r^T W_rc b_r of the two leaf
        regions' (max-normalised) likelihoods a, b. With g = d log p(x) / d p_rc (the posterior of
        repetition r divided by p_rc), the edge counts are W ⊙ (a g b^T), the left leaf responsibilities
        g a ⊙ (W b) and the right ones g b ⊙ (W^T a): three batched matmuls instead of a backward pass.
        """
        R, I, C, N = self.num_repetitions, self.num_input_distributions, self.num_roots, x.shape[0]  # noqa: E741 (I = input distributions, as in the paper)
        obs = self._observed(x, missing)
        regions, reuse = self._regions(x, obs, missing)
        w = self._normalised_weights()[0].view(R, C * I, I)
        mix = torch.softmax(self.log_mix, -1)  # C x R
        shift = regions.amax(2, keepdim=True)  # R x 2 x 1 x N
        shift.nan_to_num_(0.0, 0.0, 0.0)  # an all -inf (or NaN) column shifts by 0
        e = regions.sub_(shift).exp_()  # in place: the regions are not needed again
        a, b = e[:, 0], e[:, 1]  # R x I x N
        at = torch.bmm(w, b).view(R, C, I, N).mul_(a[:, None])  # a ⊙ (W b)
        p = at.sum(2)  # R x C x N
        top = torch.log(p) + shift.sum(1)  # R x C x N
        m = top.amax(0)
        m.nan_to_num_(0.0, 0.0, 0.0)  # an all -inf (or NaN) column shifts by 0
        joint = torch.exp(top - m) * mix.T[:, :, None]  # R x C x N
        evidence = joint.sum(0)  # C x N
        root_ll = torch.log(evidence) + m  # C x N
        if isinstance(root, int):
            selected = torch.zeros(C, N, dtype=joint.dtype, device=x.device)
            selected[root] = 1.0
            ll = root_ll[root]
        else:
            root = root.view(-1)
            selected = F.one_hot(root, C).T.to(joint.dtype)
            ll = root_ll.gather(0, root[None]).squeeze(0)
        posterior = joint / evidence * selected  # R x C x N: responsibility of repetition r for the chosen root
        q = (posterior / p)[:, :, None]  # R x C x 1 x N: d log p(x) / d p_rc
        g = q * a[:, None]  # R x C x I x N
        stats: dict[str, Tensor] = {}
        stats["weights.0"] = torch.bmm(g.reshape(R, C * I, N), b.transpose(1, 2)).mul_(w).view(self.log_weights[0].shape)
        stats["mix"] = posterior.sum(2).T.contiguous()
        resp = torch.empty(R, 2, I, N, dtype=g.dtype, device=g.device)  # responsibilities of the two leaf regions
        if C == 1:
            torch.mul(at[:, 0], q[:, 0], out=resp[:, 0])
        else:
            torch.sum(at.mul_(q), 1, out=resp[:, 0])
        torch.bmm(w.transpose(1, 2), g.reshape(R, C * I, N), out=resp[:, 1]).mul_(b)
        stats.update(self.leaves.statistics(x, obs, resp, missing is not None, reuse))
        stats["log_likelihood"] = ll.sum().reshape(1)
        stats["count"] = torch.tensor([float(N)], device=x.device, dtype=ll.dtype)
        return stats

    def _em_statistics_autograd(self, x: Tensor, missing: Tensor | None, root: Tensor | int) -> dict[str, Tensor]:
        """The statistics by autograd: edge counts w * d log p / d w, and the leaf responsibilities as
        d log p / d (leaf-region log-probabilities), handed to the leaf family."""
        obs = self._observed(x, missing)
        weights = [w.detach().requires_grad_() for w in self._normalised_weights()]
        mix = torch.softmax(self.log_mix.detach(), -1).requires_grad_()
        with torch.no_grad():
            regions, reuse = self._regions(x, obs, missing)
        regions = regions.detach().requires_grad_()
        with torch.enable_grad():
            root_ll, _ = self._upward(regions, weights, mix)
            if isinstance(root, int):
                ll = root_ll[:, root]
            else:
                ll = root_ll.gather(1, root.view(-1, 1)).squeeze(1)
            total = ll.sum()
            grads = torch.autograd.grad(total, [*weights, regions, mix])
        stats: dict[str, Tensor] = {}
        for level, (w, g) in enumerate(zip(weights, grads[: self.depth])):
            stats[f"weights.{level}"] = (w * g).detach()
        stats["mix"] = (mix * grads[-1]).detach()
        stats.update(self.leaves.statistics(x, obs, grads[self.depth], missing is not None, reuse))
        stats = {k: (v if v.is_sparse else v.contiguous()) for k, v in stats.items()}
        stats["log_likelihood"] = total.detach().reshape(1)
        stats["count"] = torch.tensor([float(x.shape[0])], device=x.device, dtype=total.dtype)
        return stats

    @torch.no_grad()
    def em_update(
        self,
        x: Tensor,
        step_size: float,
        missing: Tensor | None = None,
        root: Tensor | int = 0,
        reduce: StatsReducer | None = None,
        track_changes: bool = False,
    ) -> dict[str, float]:
        """One stochastic (online) EM step on a batch; ``step_size`` 1.0 on the full data is classic EM.

        New parameters = (1 - step) * old + step * M-step(batch statistics), the M-step smoothed
        towards the current parameters with ``pseudo_count`` (so a component with (near) zero expected
        count keeps its parameters instead of collapsing). ``reduce`` sums the statistics over
        processes before the update (default: all-reduce when torch.distributed is initialised), so
        data-parallel replicas stay identical. Returns the batch mean log-likelihood before the
        step and, with ``track_changes``, how far the step moved the weights and the leaves (mean
        absolute change; off by default because it costs a few extra passes over the parameters).
        """
        if not 0 < step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1], got {step_size}")
        stats = self.em_statistics(x, missing, root)
        reducer = reduce if reduce is not None else default_stats_reducer()
        if reducer is not None:
            stats = reducer(stats)
        return self.apply_statistics(stats, step_size, track_changes)

    @torch.no_grad()
    def apply_statistics(self, stats: dict[str, Tensor], step_size: float, track_changes: bool = False) -> dict[str, float]:
        """The M-step of :meth:`em_update` from (possibly all-reduced) statistics."""
        eta, kappa = float(step_size), float(self.pseudo_count)
        moved_w = []
        tiny = torch.finfo(self.log_mix.dtype).tiny
        levels = [(w, stats[f"weights.{level}"], old) for level, (w, old) in enumerate(zip(self.log_weights, self._normalised_weights()))]
        for log_w, counts, old in [*levels, (self.log_mix, stats["mix"], torch.softmax(self.log_mix, -1))]:
            shape = log_w.shape
            flat_shape = (*shape[:-2], -1) if log_w is not self.log_mix else shape
            old = old.reshape(flat_shape)
            new = self._interpolate_weights(old, counts.reshape(flat_shape), eta, kappa)
            if track_changes:
                moved_w.append((new - old).abs().mean())
            torch.log(new.clamp_min_(tiny), out=log_w.detach().view(flat_shape))
        moved_leaf = self.leaves.m_step(stats, eta, kappa, track_changes)
        count = float(stats["count"].sum())
        out = {"log_likelihood": float(stats["log_likelihood"].sum()) / max(count, 1.0)}
        if track_changes:
            out["weight_change"] = float(torch.stack(moved_w).mean())
            out["leaf_change"] = float(moved_leaf)
        return out

    @staticmethod
    def _interpolate_weights(old: Tensor, counts: Tensor, eta: float, kappa: float) -> Tensor:
        """(1 - eta) old + eta (counts + kappa old) / (total + kappa), per sum node (last axis = children).

        Written as old (1 - lam) + counts * eta / (total + kappa) with lam = eta total / (total + kappa):
        a node with zero count keeps its weights exactly.
        """
        total = counts.sum(-1, keepdim=True)
        rate = eta / (total + kappa).clamp_min(MIN_COUNT)
        return torch.addcmul(old * (1 - rate * total), counts, rate)


__all__ = ["RatSpn"]
