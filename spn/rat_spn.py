"""RAT-SPN: random tensorized sum-product network with exact inference and stochastic EM.

Peharz et al., "Random Sum-Product Networks: A Simple and Effective Approach to Probabilistic Deep
Learning" (UAI 2020), evaluated the Einsum-Network way (Peharz et al., ICML 2020): every sum layer is
one log-einsum-exp, and the EM statistics are gradients of the log-likelihood with respect to the
(normalised) weights and the leaves' sufficient-statistic coefficients, taken once per batch.

Layout (R repetitions, G = 2**depth leaf regions per repetition, I leaf components per region,
S internal sums, C roots): leaf regions ``(R, G, I, N)`` (batch last) -> ``depth`` product+sum layers that pair the
sibling regions ``2j, 2j+1`` and take weighted sums over all I x I (or S x S) products -> one root
value per repetition and root ``(R, N, C)`` -> a mixing layer over the repetitions ``(N, C)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spn.distributed import default_stats_reducer
from spn.region_graph import random_region_graph

#: log-probability floor for categorical entries set to zero by a full (step 1.0) M-step.
LOG_FLOOR = -80.0
#: a categorical row whose old parameters keep less than this weight is rewritten densely.
_RESET_BELOW = 1e-6
#: expected counts below this (plus the pseudo-count) leave a component's parameters unchanged.
_MIN_COUNT = 1e-8
#: rows per block of a large Gaussian forward pass (3x faster at batch 4096 than one block on one thread).
_FORWARD_BLOCK = 256
#: rows of sparse categorical statistics applied at a time (their intermediates stay in cache).
_ROW_BLOCK = 4096

StatsReducer = Callable[[dict[str, Tensor]], dict[str, Tensor]]
_T = TypeVar("_T")


class RatSpn(nn.Module):
    """RAT-SPN density p(x) over ``num_vars`` variables with Gaussian or categorical leaves.

    Parameters (paper setting ``RatSpn(64, depth=1, num_repetitions=50, num_input_distributions=45)``,
    Gaussian leaves): leaves 64 x 50 x 45 x (mean, variance) = 288,000; product-sum weights
    50 x 45 x 45 = 101,250; a separate mixing layer over the repetitions, 50. Total **389,300**
    (counted the EinsumNetworks way; without the mixing layer it would be 389,250).

    Sum weights and Gaussian leaves are ``nn.Parameter`` (so DDP can wrap the module and gradient
    training is possible); EM (:meth:`em_update`) writes them in place. Categorical leaves are buffers
    kept normalised by EM only: ``p(k) = exp(leaf_log_scale) * leaf_table[k]`` (``leaf_log_table`` is the
    log of ``leaf_table``, kept for the look-ups), a factorisation that lets an online-EM step touch
    only the codes seen in the batch (K = 512 costs O(batch), not O(K)).
    """

    def __init__(
        self,
        num_vars: int,
        depth: int = 1,
        num_repetitions: int = 50,
        num_input_distributions: int = 45,
        num_sums: int = 10,
        num_roots: int = 1,
        leaf: str = "gaussian",
        num_categories: int | None = None,
        seed: int = 0,
        min_var: float = 1e-3,
        max_var: float = 100.0,
        pseudo_count: float = 0.1,
    ) -> None:
        super().__init__()
        if leaf not in ("gaussian", "categorical"):
            raise ValueError(f"leaf must be 'gaussian' or 'categorical', got {leaf!r}")
        if leaf == "categorical" and (num_categories is None or num_categories < 2):
            raise ValueError("categorical leaves need num_categories >= 2")
        if not 0 < min_var <= max_var:
            raise ValueError(f"need 0 < min_var <= max_var, got {min_var}, {max_var}")
        for name, value in (("num_input_distributions", num_input_distributions), ("num_sums", num_sums), ("num_roots", num_roots)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_vars = num_vars
        self.depth = depth
        self.num_repetitions = num_repetitions
        self.num_input_distributions = num_input_distributions
        self.num_sums = num_sums
        self.num_roots = num_roots
        self.leaf = leaf
        self.num_categories = num_categories if leaf == "categorical" else None
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
        # Gaussian leaves live in "slots": region g of repetition r owns slots [g * smax, g * smax + size_g);
        # slot_var maps a slot to its variable (num_vars = padding), slot_of maps (v, r) back to its slot.
        G, smax = 2**depth, max(graph.sizes)
        self.max_region_size = smax
        slot_var = torch.full((num_repetitions, G * smax), num_vars, dtype=torch.long)
        slot_of = torch.empty(num_vars, num_repetitions, dtype=torch.long)
        for g, (start, size) in enumerate(zip(graph.starts, graph.sizes)):
            slots = torch.arange(g * smax, g * smax + size)
            slot_var[:, slots] = graph.permutation[:, start : start + size]
            slot_of.scatter_(0, graph.permutation[:, start : start + size].T, slots[:, None].expand(size, num_repetitions))
        self.register_buffer("slot_var", slot_var)
        self.register_buffer("slot_of", slot_of)
        self.register_buffer("slot_valid", (slot_var < num_vars).view(num_repetitions, G, 1, smax))
        # row of every (statistic, slot) in the transposed feature matrix (3 * (V + 1), N): region-major gather
        stat_rows = torch.arange(3)[None, None, :, None] * (num_vars + 1) + slot_var.view(num_repetitions, G, 1, smax)
        self.register_buffer("feature_rows", stat_rows.reshape(-1))

        R, V, I = num_repetitions, num_vars, num_input_distributions  # noqa: E741 (I = input distributions, as in the paper)
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

        if leaf == "gaussian":
            shape = (R, 2**depth, I, self.max_region_size)  # slot layout: (repetition, region, component, slot)
            self.leaf_mean = nn.Parameter(torch.randn(shape, generator=gen) * self.slot_valid)
            self.leaf_log_var = nn.Parameter(torch.zeros(shape))
        else:
            K = num_categories
            probs = 0.01 + 0.98 * torch.rand(R, V, K, I, generator=gen)
            probs = probs / probs.sum(2, keepdim=True)
            self.register_buffer("leaf_table", probs.reshape(R * V * K, I))
            # derived from leaf_table: not saved (halves checkpoints), rebuilt after load_state_dict
            self.register_buffer("leaf_log_table", torch.log(probs).reshape(R * V * K, I), persistent=False)
            self.register_load_state_dict_post_hook(RatSpn._rebuild_log_table)
            self.register_buffer("leaf_log_scale", torch.zeros(R, V, I))
            # flat table row of (repetition, position) before adding the code: (r * V + v) * K
            base = (torch.arange(R)[:, None] * V + graph.permutation) * K
            self.register_buffer("table_base", base)

    @staticmethod
    def _rebuild_log_table(module: RatSpn, incompatible_keys: object) -> None:
        with torch.no_grad():
            torch.log(module.leaf_table.clamp_min(math.exp(LOG_FLOOR)), out=module.leaf_log_table)

    # ------------------------------------------------------------------ structure helpers
    @property
    def num_parameters(self) -> int:
        """Free-parameter count the EinsumNetworks way (leaf parameters + every sum weight)."""
        weights = sum(w.numel() for w in self.log_weights) + self.log_mix.numel()
        if self.leaf == "gaussian":
            return weights + 2 * int(self.slot_valid.sum()) * self.num_input_distributions
        return weights + self.leaf_log_table.numel()

    def leaf_variance(self) -> Tensor:
        """Gaussian leaf variances in slot layout (R, G, I, smax), clamped to [min_var, max_var]."""
        return self.leaf_log_var.exp().clamp(self.min_var, self.max_var)

    def gaussian_leaves(self) -> tuple[Tensor, Tensor]:
        """Gaussian leaf (mean, variance), each V x R x I: variable v's component i in repetition r."""
        R = self.num_repetitions
        rep = torch.arange(R, device=self.slot_of.device)[None].expand_as(self.slot_of)
        mean = self._slot_major(self.leaf_mean)[rep, self.slot_of]
        var = self._slot_major(self.leaf_variance())[rep, self.slot_of]
        return mean, var

    def _slot_major(self, t: Tensor) -> Tensor:
        """(R, G, I, smax) slot-layout tensor -> (R, G * smax, I), indexable by ``slot_of``."""
        R, G = self.num_repetitions, 2**self.depth
        return t.transpose(2, 3).reshape(R, G * self.max_region_size, self.num_input_distributions)

    def categorical_log_probs(self, rep: int, var: int) -> Tensor:
        """Leaf log-probabilities (K x I) of variable ``var`` in repetition ``rep`` (categorical)."""
        K = self.num_categories
        row = (rep * self.num_vars + var) * K
        return self.leaf_log_table[row : row + K] + self.leaf_log_scale[rep, var][None, :]

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

    # ------------------------------------------------------------------ derived tensors
    def _derived(self, name: str, params: tuple[Tensor, ...], compute: Callable[[], _T]) -> _T:
        """``compute()``, a pure function of ``params``, reused while none of them changes (no-grad only).

        The key is each parameter's storage and in-place version counter, which every in-place write
        (EM, optimiser steps, ``load_state_dict``, ``.to()``) changes, so a reused value is always the
        one ``compute()`` would give. Writes through ``param.data`` bypass the version counter: write
        parameters in place under ``torch.no_grad()`` instead, as ``load_state_dict`` does. An EM step
        thus normalises its weights once for the statistics and the M-step, and a scoring pass in row
        blocks builds the leaves' quadratic forms once. The cache lives in ``_derived_cache`` (created
        here, so a module unpickled from before the cache existed works too).
        """
        if torch.is_grad_enabled():
            return compute()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        cache = self.__dict__.setdefault("_derived_cache", {})
        hit = cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        cache[name] = (key, value)
        return value

    def _normalised_weights(self) -> list[Tensor]:
        """Sum weights as probabilities (R, regions, S_out, S_in, S_in) per level."""
        return [self._derived(f"weights.{level}", (w,), lambda w=w: self._softmax_children(w)) for level, w in enumerate(self.log_weights)]

    @staticmethod
    def _softmax_children(log_w: Tensor) -> Tensor:
        shape = log_w.shape
        return torch.softmax(log_w.reshape(*shape[:3], -1), -1).view(shape)

    # ------------------------------------------------------------------ leaves
    def _gaussian_coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """The leaves as quadratic forms: log N(x; mean, var) = -x^2 / (2 var) + x mean / var + const.

        Returns ``(quad_lin, const, bias)``: ``quad_lin`` (R*G, I, 2*smax) holds the x^2 coefficients of
        a region's slots followed by their x coefficients, ``const`` (R*G, I, smax) the constant terms
        -(log(2 pi var) + mean^2 / var) / 2 and ``bias`` (R*G, I, 1) their sum over the region's real
        slots (the constant of a fully observed region).
        """
        return self._derived("gaussian", (self.leaf_mean, self.leaf_log_var), self._quadratic_forms)

    def _quadratic_forms(self) -> tuple[Tensor, Tensor, Tensor]:
        R, G, I, smax = self.num_repetitions, 2**self.depth, self.num_input_distributions, self.max_region_size  # noqa: E741 (I = input distributions, as in the paper)
        neg_log_var = self.leaf_log_var.clamp(math.log(self.min_var), math.log(self.max_var)).neg_()
        inv = torch.exp(neg_log_var)
        mean = self.leaf_mean
        if torch.is_grad_enabled():  # differentiable (gradient training, autograd EM statistics)
            quad_lin = torch.stack([inv * -0.5, mean * inv], dim=3)
        else:  # written in place: a stack along an inner axis costs as much as the rest together
            quad_lin = inv.new_empty(R, G, I, 2, smax)
            torch.mul(inv, -0.5, out=quad_lin[:, :, :, 0])
            torch.mul(mean, inv, out=quad_lin[:, :, :, 1])
        # -(log var + log 2 pi + mean * (mean / var)) / 2, in place on a fresh tensor
        const = torch.addcmul(neg_log_var, mean, quad_lin[:, :, :, 1], value=-1.0).mul_(0.5).sub_(0.5 * math.log(2 * math.pi))
        const = const.view(R * G, I, smax)
        return quad_lin.view(R * G, I, 2 * smax), const, self._region_bias(const)

    def _region_bias(self, const: Tensor) -> Tensor:
        """(R*G, I, 1) sum of the constant terms over each region's real slots."""
        valid = self.slot_valid.view(-1, self.max_region_size, 1).to(const.dtype)
        return torch.bmm(const, valid)

    def _gaussian_features(self, x: Tensor, obs: Tensor | None) -> Tensor:
        """Per-region (x^2, x, observed) features (R*G, 3, smax, N); missing variables and padding are zero.

        With ``obs`` None every variable is observed: the indicator rows are left out (R*G, 2, smax, N).
        """
        R, G, smax = self.num_repetitions, 2**self.depth, self.max_region_size
        N = x.shape[0]
        xt = x.to(self._float_dtype()).T  # V x N
        pad = xt.new_zeros(1, N)
        rows = self.feature_rows.view(R * G, 3, smax)
        if obs is None:
            features, rows = torch.cat([xt * xt, pad, xt, pad]), rows[:, :2]
        else:
            ot = obs.T
            xt = torch.where(ot > 0, xt, torch.zeros_like(xt))
            features = torch.cat([xt * xt, pad, xt, pad, ot, pad])  # 3(V+1) x N
        return features.index_select(0, rows.reshape(-1)).view(R * G, rows.shape[1], smax, N)

    def _gaussian_regions(
        self, x: Tensor, obs: Tensor, coeffs: tuple[Tensor, Tensor, Tensor], missing: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Leaf-region log-densities (R, G, I, N) and the features they came from.

        One batched matmul of the (x^2, x) coefficients with the per-region features, plus the constant
        terms: the region's bias when everything is observed, else the constants weighted by the
        observed indicators, so missing variables contribute nothing, i.e. are integrated out exactly.
        """
        R, G, I, smax = self.num_repetitions, 2**self.depth, self.num_input_distributions, self.max_region_size  # noqa: E741 (I = input distributions, as in the paper)
        N = x.shape[0]
        quad_lin, const, bias = coeffs
        features = self._gaussian_features(x, obs if missing else None)
        base = torch.bmm(const, features[:, 2]) if missing else bias
        regions = torch.baddbmm(base, quad_lin, features[:, :2].reshape(R * G, 2 * smax, N))
        return regions.view(R, G, I, N), features

    def _categorical_regions(self, x: Tensor, obs: Tensor, log_table: Tensor, log_scale: Tensor, missing: bool) -> Tensor:
        """Leaf-region log-probabilities (R, G, I, N) by embedding_bag look-ups (no one-hot tensor).

        The look-ups are ordered (repetition, region, sample, position): consecutive bags read the same
        repetition's block of the table, which keeps the (random) reads far more cache-friendly.
        """
        R, V, G, I = self.num_repetitions, self.num_vars, 2**self.depth, self.num_input_distributions  # noqa: E741 (I = input distributions, as in the paper)
        N = x.shape[0]
        codes = x.long().clamp(0, self.num_categories - 1)
        if missing:
            codes = torch.where(obs > 0, codes, torch.zeros_like(codes))
        index = self._region_major(self.table_base[:, :, None] + codes.T[self.permutation]).reshape(-1)
        dev = x.device
        starts = torch.tensor(self.region_starts, device=dev)
        sizes = torch.tensor(self.region_sizes, device=dev)
        offsets = (
            torch.arange(R, device=dev)[:, None, None] * (N * V)
            + (starts * N)[None, :, None]
            + torch.arange(N, device=dev)[None, None, :] * sizes[None, :, None]
        ).reshape(-1)
        weights = self._region_major(obs.T[self.permutation]).reshape(-1) if missing else None
        looked_up = F.embedding_bag(
            index, log_table, offsets, mode="sum", per_sample_weights=weights, sparse=True
        ).view(R, G, N, I)
        scale = torch.einsum("vrg,rvi->vrgi", self.assignment.to(log_scale.dtype), log_scale)
        looked_up = looked_up + (obs @ scale.reshape(V, R * G * I)).view(N, R, G, I).permute(1, 2, 0, 3)
        return looked_up.transpose(2, 3)

    def _region_major(self, t: Tensor) -> Tensor:
        """(R, V, N) in position order -> (R, V * N) ordered (region, sample, position in the region)."""
        R = t.shape[0]
        parts = [t[:, a : a + z].transpose(1, 2).reshape(R, -1) for a, z in zip(self.region_starts, self.region_sizes)]
        return torch.cat(parts, 1)

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

    def _regions(self, x: Tensor, obs: Tensor, missing: Tensor | None) -> Tensor:
        if self.leaf == "gaussian":
            return self._gaussian_regions(x, obs, self._gaussian_coefficients(), missing is not None)[0]
        return self._categorical_regions(x, obs, self.leaf_log_table, self.leaf_log_scale, missing is not None)

    # ------------------------------------------------------------------ inference
    def log_likelihood(self, x: Tensor, missing: Tensor | None = None) -> Tensor:
        """Exact log p(x) per root, (N, C); variables flagged in ``missing`` (bool N x V) are integrated out."""
        n = x.shape[0]
        if self.leaf == "gaussian" and n > _FORWARD_BLOCK:  # blocks of rows keep the (R, G, I, N) layers in cache
            return torch.cat(
                [
                    self.log_likelihood(x[s : s + _FORWARD_BLOCK], None if missing is None else missing[s : s + _FORWARD_BLOCK])
                    for s in range(0, n, _FORWARD_BLOCK)
                ]
            )
        obs = self._observed(x, missing)
        root, _ = self._upward(self._regions(x, obs, missing), self._normalised_weights(), torch.softmax(self.log_mix, -1))
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

    def _leaf_log_probs_categorical(self, rep: Tensor, comp: Tensor) -> Tensor:
        """(N, V, K) log-probabilities of the selected categorical leaves."""
        R, V, K, I = self.num_repetitions, self.num_vars, self.num_categories, self.num_input_distributions  # noqa: E741 (I = input distributions, as in the paper)
        table = self.leaf_log_table.view(R, V, K, I)
        var = torch.arange(V, device=rep.device)[None].expand_as(comp)
        r = rep[:, None].expand_as(comp)
        logits = table[r, var, :, comp]  # N x V x K
        return logits + self.leaf_log_scale[r, var, comp][..., None]

    @torch.no_grad()
    def mpe(self, x: Tensor, missing: Tensor, root: int = 0) -> Tensor:
        """Most probable explanation of the ``missing`` variables given the observed ones (per sample).

        The usual max-product approximation for SPNs: exact bottom-up marginals, then top-down the
        child with the largest posterior weight at every sum node; missing variables take the mode of
        their selected leaf, observed variables are returned unchanged.
        """
        obs = self._observed(x, missing)
        regions = self._regions(x, obs, missing)
        _, inputs = self._upward(regions, self._normalised_weights(), torch.softmax(self.log_mix, -1), keep=True)
        rep, chosen = self._descend(inputs, root, lambda s: s.argmax(-1))
        comp = self._leaf_components(rep, chosen)
        if self.leaf == "gaussian":
            slot = self.slot_of.T[rep]  # N x V
            mode = self._slot_major(self.leaf_mean)[rep[:, None], slot, comp]
            return torch.where(missing.bool(), mode.to(x.dtype), x)
        mode = self._leaf_log_probs_categorical(rep, comp).argmax(-1)
        return torch.where(missing.bool(), mode, x.long())

    @torch.no_grad()
    def sample(
        self, n: int, seed: int | None = None, x: Tensor | None = None, missing: Tensor | None = None, root: int = 0
    ) -> Tensor:
        """``n`` exact ancestral samples (N x V); with ``x``/``missing``, samples p(missing | observed)."""
        gen = torch.Generator(device=self.log_mix.device)
        gen.manual_seed(self.seed + 1 if seed is None else seed)
        dev = self.log_mix.device
        if x is None:
            dtype = torch.long if self.leaf == "categorical" else self._float_dtype()
            x = torch.zeros(n, self.num_vars, dtype=dtype, device=dev)
            missing = torch.ones(n, self.num_vars, dtype=torch.bool, device=dev)
        elif missing is None:
            raise ValueError("conditional sampling needs the missing mask")
        n = x.shape[0]

        def draw(scores: Tensor) -> Tensor:
            probs = torch.softmax(scores.float(), -1)
            return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

        obs = self._observed(x, missing)
        regions = self._regions(x, obs, missing)
        _, inputs = self._upward(regions, self._normalised_weights(), torch.softmax(self.log_mix, -1), keep=True)
        rep, chosen = self._descend(inputs, root, draw)
        comp = self._leaf_components(rep, chosen)
        if self.leaf == "gaussian":
            r = rep[:, None].expand_as(comp)
            slot = self.slot_of.T[rep]
            mean = self._slot_major(self.leaf_mean)[r, slot, comp]
            std = self._slot_major(self.leaf_variance())[r, slot, comp].sqrt()
            noise = torch.randn(mean.shape, generator=gen, device=dev, dtype=mean.dtype)
            return torch.where(missing.bool(), mean + std * noise, x.to(mean.dtype))
        draws = draw(self._leaf_log_probs_categorical(rep, comp).reshape(-1, self.num_categories)).view(n, -1)
        return torch.where(missing.bool(), draws, x.long())

    # ------------------------------------------------------------------ initialisation from data
    @torch.no_grad()
    def init_from_data(self, x: Tensor, missing: Tensor | None = None, seed: int | None = None, sharpness: float = 0.5) -> None:
        """Places the leaves on the data, because a step of 1e-4 barely moves a random initialisation.

        Gaussian: every (repetition, component) takes its means from one random data row and the
        per-variable data variance. Categorical: each component puts ``sharpness`` of its mass on the
        code of one random data row and the rest on the variable's smoothed data histogram.
        """
        gen = torch.Generator().manual_seed(self.seed + 2 if seed is None else seed)
        R, V, I = self.num_repetitions, self.num_vars, self.num_input_distributions  # noqa: E741 (I = input distributions, as in the paper)
        obs = self._observed(x, missing).cpu()
        x = x.detach().cpu()
        picks = torch.randint(0, x.shape[0], (R, I), generator=gen)
        if self.leaf == "gaussian":
            xf = torch.where(obs > 0, x.to(obs.dtype), torch.zeros_like(obs))
            count = obs.sum(0).clamp_min(1)
            mean = xf.sum(0) / count
            var = ((xf - mean) ** 2 * obs).sum(0) / count
            filled = torch.where(obs > 0, xf, mean.expand_as(xf))
            filled = torch.cat([filled, filled.new_zeros(filled.shape[0], 1)], dim=1)
            var = torch.cat([var, var.new_ones(1)])
            slot_var = self.slot_var.cpu()  # R x G*smax
            means = filled[picks[:, None, :], slot_var[:, :, None]]  # R x G*smax x I
            G, smax = 2**self.depth, self.max_region_size
            self.leaf_mean.copy_(means.view(R, G, smax, I).transpose(2, 3).to(self.leaf_mean))
            log_var = torch.log(var.clamp(self.min_var, self.max_var))[slot_var][:, :, None].expand(means.shape)
            self.leaf_log_var.copy_(log_var.reshape(R, G, smax, I).transpose(2, 3).to(self.leaf_log_var))
            return
        K = self.num_categories
        codes = x.long().clamp(0, K - 1)
        hist = torch.zeros(V, K)
        hist.scatter_add_(1, codes.T, obs.T.float())
        hist = (hist + 1.0 / K) / (hist + 1.0 / K).sum(1, keepdim=True)  # V x K, smoothed
        table = self.leaf_log_table.view(R, V, K, I)
        for r in range(R):
            picked = codes[picks[r]]  # I x V
            probs = (1 - sharpness) * hist[:, :, None].expand(V, K, I).clone()
            probs.scatter_add_(1, picked.T[:, None, :], torch.full((V, 1, I), sharpness))
            table[r].copy_(torch.log(probs).to(table))
        self.leaf_table.copy_(self.leaf_log_table.exp())
        self.leaf_log_scale.zero_()

    # ------------------------------------------------------------------ EM
    def em_statistics(
        self, x: Tensor, missing: Tensor | None = None, root: Tensor | int = 0, chunk_size: int = 1024
    ) -> dict[str, Tensor]:
        """Expected sufficient statistics of one batch, from autograd of sum_n log p(x_n).

        Keys: ``weights.<level>`` and ``mix`` (expected counts of every sum edge), Gaussian
        ``leaf_x``/``leaf_xx`` (slot layout R x G x I x smax) and ``leaf_n`` (the same, or R x G x I x 1
        when nothing is missing: every slot of a region then has the region's count), or categorical ``leaf_n``
        (R x V x I) and the sparse ``leaf_table`` (rows of the flat table, I columns, duplicates
        allowed; a dense table when the batch was chunked), plus ``log_likelihood`` (sum) and ``count``. Batches above ``chunk_size`` rows are
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
        if self.leaf == "gaussian":
            regions, features = self._gaussian_regions(x, obs, self._gaussian_coefficients(), missing is not None)
        else:
            regions = self._categorical_regions(x, obs, self.leaf_log_table, self.leaf_log_scale, missing is not None)
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
        if self.leaf == "gaussian":
            smax = self.max_region_size
            resp = resp.view(R * 2, I, N)
            grads = torch.bmm(resp, features[:, :2].reshape(R * 2, 2 * smax, N).transpose(1, 2)).view(R, 2, I, 2, smax)
            stats["leaf_xx"], stats["leaf_x"] = grads[:, :, :, 0], grads[:, :, :, 1]
            if missing is None:  # every real slot of a region has the region's total responsibility
                stats["leaf_n"] = resp.sum(2).view(R, 2, I, 1)
            else:
                stats["leaf_n"] = torch.bmm(resp, features[:, 2].transpose(1, 2)).view(R, 2, I, smax)
        else:
            stats["leaf_table"], stats["leaf_n"] = self._categorical_statistics(x, obs, resp, missing is not None)
        stats["log_likelihood"] = ll.sum().reshape(1)
        stats["count"] = torch.tensor([float(N)], device=x.device, dtype=ll.dtype)
        return stats

    def _categorical_statistics(self, x: Tensor, obs: Tensor, resp: Tensor, missing: bool) -> tuple[Tensor, Tensor]:
        """Categorical leaf statistics from region responsibilities ``resp`` (R, G, I, N).

        The sparse table statistics (one row per (repetition, position, sample) look-up, ordered so that
        consecutive rows fall in the same (repetition, variable) block of the table) and the expected
        count per (r, v, i), exactly what the backward pass of :meth:`_categorical_regions` produces.
        """
        R, V, K, I = self.num_repetitions, self.num_vars, self.num_categories, self.num_input_distributions  # noqa: E741 (I = input distributions, as in the paper)
        G = resp.shape[1]
        codes = x.long().clamp(0, K - 1)
        if missing:
            codes = torch.where(obs > 0, codes, torch.zeros_like(codes))
        rows = self.table_base[:, :, None] + codes.T[self.permutation]  # R x V x N
        region_at = torch.repeat_interleave(
            torch.arange(G, device=x.device), torch.tensor(self.region_sizes, device=x.device)
        )  # region of each position
        values = resp.transpose(2, 3).index_select(1, region_at)  # R x V x N x I
        if missing:
            values.mul_(obs.T[self.permutation][..., None])
        table = torch.sparse_coo_tensor(
            rows.reshape(1, -1), values.view(-1, I), (R * V * K, I), check_invariants=False
        )
        per_region = torch.matmul(obs.T, resp.transpose(2, 3))  # R x G x V x I
        counts = per_region.gather(1, self.region_of.T[:, None, :, None].expand(R, 1, V, I)).squeeze(1)
        return table, counts.contiguous()

    def _em_statistics_autograd(self, x: Tensor, missing: Tensor | None, root: Tensor | int) -> dict[str, Tensor]:
        obs = self._observed(x, missing)
        weights = [w.detach().requires_grad_() for w in self._normalised_weights()]
        mix = torch.softmax(self.log_mix.detach(), -1).requires_grad_()
        if self.leaf == "gaussian":
            with torch.no_grad():
                coeffs = self._gaussian_coefficients()
        with torch.enable_grad():
            if self.leaf == "gaussian":
                quad_lin, const, bias = (c.detach().requires_grad_() for c in coeffs)
                leaf_inputs = [quad_lin, const if missing is not None else bias]  # the constants that are used
                regions, _ = self._gaussian_regions(x, obs, (quad_lin, const, bias), missing is not None)
            else:
                table = self.leaf_log_table.detach().requires_grad_()
                scale = self.leaf_log_scale.detach().requires_grad_()
                leaf_inputs = [table, scale]
                regions = self._categorical_regions(x, obs, table, scale, missing is not None)
            root_ll, _ = self._upward(regions, weights, mix)
            if isinstance(root, int):
                ll = root_ll[:, root]
            else:
                ll = root_ll.gather(1, root.view(-1, 1)).squeeze(1)
            total = ll.sum()
            grads = torch.autograd.grad(total, [*weights, mix, *leaf_inputs])
        stats: dict[str, Tensor] = {}
        for level, (w, g) in enumerate(zip(weights, grads[: self.depth])):
            stats[f"weights.{level}"] = (w * g).detach()
        stats["mix"] = (mix * grads[self.depth]).detach()
        leaf_grads = grads[self.depth + 1 :]
        if self.leaf == "gaussian":
            g = leaf_grads[0].view(*self.leaf_mean.shape[:3], 2, self.max_region_size)
            stats["leaf_xx"], stats["leaf_x"] = g[:, :, :, 0], g[:, :, :, 1]
            stats["leaf_n"] = leaf_grads[1].view(*self.leaf_mean.shape[:3], -1)  # per region if all observed
        else:
            stats["leaf_table"] = leaf_grads[0]
            stats["leaf_n"] = leaf_grads[1]
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
        if self.leaf == "gaussian":
            moved_leaf = self._update_gaussian(stats, eta, kappa, track_changes)
        else:
            moved_leaf = self._update_categorical(stats, eta, kappa)
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
        rate = eta / (total + kappa).clamp_min(_MIN_COUNT)
        return torch.addcmul(old * (1 - rate * total), counts, rate)

    def _update_gaussian(self, stats: dict[str, Tensor], eta: float, kappa: float, track_changes: bool = False) -> Tensor:
        """Moves each leaf towards its batch moments by lam = eta * n / (n + kappa).

        The same as interpolating the expectation parameters (E[x], E[x^2]) towards the smoothed
        M-step, written as a two-component moment match so that large means lose no precision:
        mean' = mean + lam (m_b - mean), var' = (1 - lam) var + lam v_b + lam (1 - lam) (m_b - mean)^2.
        A component with zero count (or a padding slot) is left exactly as it is; lam = 1 is the M-step.
        """
        n, sx, sxx = stats["leaf_n"], stats["leaf_x"], stats["leaf_xx"]
        mean = self.leaf_mean.detach()
        inv_n = n.clamp_min(_MIN_COUNT).reciprocal_()
        lam = torch.div(n, (n + kappa).clamp_min_(_MIN_COUNT)).mul_(eta).clamp_(0.0, 1.0)
        spread = lam - lam * lam  # lam (1 - lam), per region when the counts are
        lam = lam * self.slot_valid  # padding slots stay as they are
        batch_mean = sx * inv_n
        batch_var = (sxx * inv_n).addcmul_(batch_mean, batch_mean, value=-1.0)  # rounding below 0: clamped below
        delta = batch_mean.sub_(mean)
        new_var = self.leaf_variance().lerp_(batch_var, lam).addcmul_(spread, delta * delta)
        moved = torch.zeros(())
        if track_changes:
            moved = (lam * delta).abs().sum() / (self.slot_valid.sum() * self.num_input_distributions)
        mean.addcmul_(lam, delta)
        torch.log(new_var.clamp_(self.min_var, self.max_var), out=self.leaf_log_var.detach())
        return moved

    def _update_categorical(self, stats: dict[str, Tensor], eta: float, kappa: float) -> Tensor:
        """theta' = a * theta + eta * s / (n + kappa) per (r, v, i) row, a = 1 - eta * n / (n + kappa).

        ``a`` goes into the per-row log-scale and only the table entries with statistics are touched
        (one index_add and a log refresh of those rows), so the cost is O(batch) however large K is.
        """
        R, V, K, I = self.num_repetitions, self.num_vars, self.num_categories, self.num_input_distributions  # noqa: E741 (I = input distributions, as in the paper)
        n = stats["leaf_n"]  # R x V x I
        table_stats = stats["leaf_table"]  # sparse rows x I, duplicates allowed
        denom = (n + kappa).clamp_min(_MIN_COUNT)
        keep = 1 - eta * n / denom
        reset = keep < _RESET_BELOW
        any_reset = bool(reset.any())
        scale = self.leaf_log_scale
        if any_reset:  # (close to) a full M-step for these rows: forget the old parameters
            self.leaf_table.view(R, V, K, I).masked_fill_(reset[:, :, None, :], 0.0)
            scale.masked_fill_(reset, 0.0)
        scale.add_(torch.where(reset, torch.zeros_like(keep), torch.log(keep.clamp_min(_RESET_BELOW))))
        factor = (eta / denom) * torch.exp(-scale)  # per row: eta / ((n + kappa) * new scale)
        if not table_stats.is_sparse:  # dense statistics (chunked large batch): one dense update
            view = self.leaf_table.view(R, V, K, I)
            view.addcmul_(table_stats.view(R, V, K, I), factor.view(R, V, 1, I))
            torch.log(self.leaf_table.clamp_min(math.exp(LOG_FLOOR)), out=self.leaf_log_table)
            rows = table_stats.new_zeros(0, dtype=torch.long)
            any_reset = False
        else:
            rows = table_stats._indices()[0]
        factor = factor.view(R * V, I)
        # in blocks of rows, so that the per-row intermediates stay in cache; a row's log is refreshed
        # after each block that adds to it, so the last refresh follows its last addition
        for start in range(0, rows.numel(), _ROW_BLOCK):
            block = rows[start : start + _ROW_BLOCK]
            values = table_stats._values()[start : start + _ROW_BLOCK] * factor.index_select(0, block // K)
            self.leaf_table.index_add_(0, block, values)
            if not any_reset:
                self.leaf_log_table.index_copy_(0, block, self.leaf_table.index_select(0, block).log_())
        if any_reset:
            torch.log(self.leaf_table.clamp_min(math.exp(LOG_FLOOR)), out=self.leaf_log_table)
        if float(scale.min()) < -30.0:  # fold the scale into the table long before float32 suffers
            self.leaf_table.view(R, V, K, I).mul_(scale.exp()[:, :, None, :])
            self.leaf_log_table.view(R, V, K, I).add_(scale[:, :, None, :])
            scale.zero_()
        return (1 - keep).mean()
