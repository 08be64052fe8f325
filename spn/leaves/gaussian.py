"""Gaussian leaves as cached quadratic forms: each region's log-density is one batched matmul."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from spn.cache import derived
from spn.leaves.base import MIN_COUNT, LeafLayout, Leaves


class GaussianLeaves(Leaves):
    """Univariate Gaussians N(mean, var) per (repetition, variable, component), in slot layout.

    ``mean`` and ``log_var`` are ``nn.Parameter`` (R, G, I, smax); padding slots hold mean 0 and are
    never read. Variances are clamped to [min_var, max_var] wherever they are used.
    """

    forward_block = 256  # rows per block of a large forward pass (3x faster at batch 4096 than one block)

    def __init__(self, layout: LeafLayout, num_components: int, generator: torch.Generator, min_var: float = 1e-3, max_var: float = 100.0) -> None:
        super().__init__(layout, num_components)
        if not 0 < min_var <= max_var:
            raise ValueError(f"need 0 < min_var <= max_var, got {min_var}, {max_var}")
        self.min_var, self.max_var = min_var, max_var
        R, G, smax = self.num_repetitions, self.num_regions, self.max_region_size
        shape = (R, G, num_components, smax)  # slot layout: (repetition, region, component, slot)
        self.mean = nn.Parameter(torch.randn(shape, generator=generator) * self.slot_valid)
        self.log_var = nn.Parameter(torch.zeros(shape))

    def set_layout(self, layout: LeafLayout) -> None:
        super().set_layout(layout)
        R, G, smax = self.num_repetitions, self.num_regions, self.max_region_size
        # row of every (statistic, slot) in the transposed feature matrix (3 * (V + 1), N): region-major gather
        rows = torch.arange(3)[None, None, :, None] * (self.num_vars + 1) + layout.slot_var.view(R, G, 1, smax)
        self.register_buffer("feature_rows", rows.reshape(-1).to(layout.slot_var.device), persistent=False)

    @property
    def num_parameters(self) -> int:
        return 2 * int(self.slot_valid.sum()) * self.num_components

    def variance(self) -> Tensor:
        """Variances in slot layout (R, G, I, smax), clamped to [min_var, max_var]."""
        return self.log_var.exp().clamp(self.min_var, self.max_var)

    def per_variable(self) -> tuple[Tensor, Tensor]:
        """(mean, variance), each V x R x I: variable v's component i in repetition r."""
        rep = torch.arange(self.num_repetitions, device=self.slot_of.device)[None].expand_as(self.slot_of)
        return self.slot_major(self.mean)[rep, self.slot_of], self.slot_major(self.variance())[rep, self.slot_of]

    # ------------------------------------------------------------------ log-densities
    def coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """The leaves as quadratic forms: log N(x; mean, var) = -x^2 / (2 var) + x mean / var + const.

        Returns ``(quad_lin, const, bias)``: ``quad_lin`` (R*G, I, 2*smax) holds the x^2 coefficients of
        a region's slots followed by their x coefficients, ``const`` (R*G, I, smax) the constant terms
        -(log(2 pi var) + mean^2 / var) / 2 and ``bias`` (R*G, I, 1) their sum over the region's real
        slots (the constant of a fully observed region). Cached while the parameters are unchanged.
        """
        return derived(self, "gaussian", (self.mean, self.log_var), self._quadratic_forms)

    def _quadratic_forms(self) -> tuple[Tensor, Tensor, Tensor]:
        R, G, I, smax = self.num_repetitions, self.num_regions, self.num_components, self.max_region_size  # noqa: E741 (I = input distributions, as in the paper)
        neg_log_var = self.log_var.clamp(math.log(self.min_var), math.log(self.max_var)).neg_()
        inv = torch.exp(neg_log_var)
        mean = self.mean
        if torch.is_grad_enabled():  # differentiable (gradient training)
            quad_lin = torch.stack([inv * -0.5, mean * inv], dim=3)
        else:  # written in place: a stack along an inner axis costs as much as the rest together
            quad_lin = inv.new_empty(R, G, I, 2, smax)
            torch.mul(inv, -0.5, out=quad_lin[:, :, :, 0])
            torch.mul(mean, inv, out=quad_lin[:, :, :, 1])
        # -(log var + log 2 pi + mean * (mean / var)) / 2, in place on a fresh tensor
        const = torch.addcmul(neg_log_var, mean, quad_lin[:, :, :, 1], value=-1.0).mul_(0.5).sub_(0.5 * math.log(2 * math.pi))
        const = const.view(R * G, I, smax)
        valid = self.slot_valid.view(-1, smax, 1).to(const.dtype)
        return quad_lin.view(R * G, I, 2 * smax), const, torch.bmm(const, valid)

    def _features(self, x: Tensor, obs: Tensor | None) -> Tensor:
        """Per-region (x^2, x, observed) features (R*G, 3, smax, N); missing variables and padding are zero.

        With ``obs`` None every variable is observed: the indicator rows are left out (R*G, 2, smax, N).
        """
        R, G, smax = self.num_repetitions, self.num_regions, self.max_region_size
        N = x.shape[0]
        xt = x.to(self.mean.dtype).T  # V x N
        pad = xt.new_zeros(1, N)
        rows = self.feature_rows.view(R * G, 3, smax)
        if obs is None:
            features, rows = torch.cat([xt * xt, pad, xt, pad]), rows[:, :2]
        else:
            ot = obs.T
            xt = torch.where(ot > 0, xt, torch.zeros_like(xt))
            features = torch.cat([xt * xt, pad, xt, pad, ot, pad])  # 3(V+1) x N
        return features.index_select(0, rows.reshape(-1)).view(R * G, rows.shape[1], smax, N)

    def region_log_probs(self, x: Tensor, obs: Tensor, missing: bool) -> tuple[Tensor, Tensor]:
        """One batched matmul of the (x^2, x) coefficients with the per-region features, plus the constant
        terms: the region's bias when everything is observed, else the constants weighted by the
        observed indicators, so missing variables contribute nothing, i.e. are integrated out exactly.
        The features are handed on to :meth:`statistics`."""
        R, G, I, smax = self.num_repetitions, self.num_regions, self.num_components, self.max_region_size  # noqa: E741 (I = input distributions, as in the paper)
        N = x.shape[0]
        quad_lin, const, bias = self.coefficients()
        features = self._features(x, obs if missing else None)
        base = torch.bmm(const, features[:, 2]) if missing else bias
        regions = torch.baddbmm(base, quad_lin, features[:, :2].reshape(R * G, 2 * smax, N))
        return regions.view(R, G, I, N), features

    # ------------------------------------------------------------------ EM
    def statistics(self, x: Tensor, obs: Tensor, resp: Tensor, missing: bool, reuse: Tensor | None) -> dict[str, Tensor]:
        """``leaf_xx``/``leaf_x`` (R, G, I, smax) and ``leaf_n`` (the same, or R x G x I x 1 when nothing
        is missing: every real slot of a region then has the region's total responsibility)."""
        R, G, I, smax = self.num_repetitions, self.num_regions, self.num_components, self.max_region_size  # noqa: E741
        N = resp.shape[-1]
        features = reuse if reuse is not None else self._features(x, obs if missing else None)
        resp = resp.reshape(R * G, I, N)
        grads = torch.bmm(resp, features[:, :2].reshape(R * G, 2 * smax, N).transpose(1, 2)).view(R, G, I, 2, smax)
        stats = {"leaf_xx": grads[:, :, :, 0], "leaf_x": grads[:, :, :, 1]}
        if missing:
            stats["leaf_n"] = torch.bmm(resp, features[:, 2].transpose(1, 2)).view(R, G, I, smax)
        else:
            stats["leaf_n"] = resp.sum(2).view(R, G, I, 1)
        return stats

    def m_step(self, stats: dict[str, Tensor], step_size: float, pseudo_count: float, track_changes: bool = False) -> Tensor:
        """Moves each leaf towards its batch moments by lam = eta * n / (n + kappa).

        The same as interpolating the expectation parameters (E[x], E[x^2]) towards the smoothed
        M-step, written as a two-component moment match so that large means lose no precision:
        mean' = mean + lam (m_b - mean), var' = (1 - lam) var + lam v_b + lam (1 - lam) (m_b - mean)^2.
        A component with zero count (or a padding slot) is left exactly as it is; lam = 1 is the M-step.
        """
        eta, kappa = step_size, pseudo_count
        n, sx, sxx = stats["leaf_n"], stats["leaf_x"], stats["leaf_xx"]
        mean = self.mean.detach()
        inv_n = n.clamp_min(MIN_COUNT).reciprocal_()
        lam = torch.div(n, (n + kappa).clamp_min_(MIN_COUNT)).mul_(eta).clamp_(0.0, 1.0)
        spread = lam - lam * lam  # lam (1 - lam), per region when the counts are
        lam = lam * self.slot_valid  # padding slots stay as they are
        batch_mean = sx * inv_n
        batch_var = (sxx * inv_n).addcmul_(batch_mean, batch_mean, value=-1.0)  # rounding below 0: clamped below
        delta = batch_mean.sub_(mean)
        new_var = self.variance().lerp_(batch_var, lam).addcmul_(spread, delta * delta)
        moved = torch.zeros(())
        if track_changes:
            moved = (lam * delta).abs().sum() / (self.slot_valid.sum() * self.num_components)
        mean.addcmul_(lam, delta)
        torch.log(new_var.clamp_(self.min_var, self.max_var), out=self.log_var.detach())
        return moved

    def init_from_data(self, x: Tensor, obs: Tensor, picks: Tensor, sharpness: float = 0.5) -> None:
        """Every (repetition, component) takes its means from one data row, its variances from the
        per-variable data variance (a missing entry of the row: the variable's mean)."""
        R, I = picks.shape  # noqa: E741
        xf = torch.where(obs > 0, x.to(obs.dtype), torch.zeros_like(obs))
        count = obs.sum(0).clamp_min(1)
        mean = xf.sum(0) / count
        var = ((xf - mean) ** 2 * obs).sum(0) / count
        filled = torch.where(obs > 0, xf, mean.expand_as(xf))
        filled = torch.cat([filled, filled.new_zeros(filled.shape[0], 1)], dim=1)
        var = torch.cat([var, var.new_ones(1)])
        slot_var = self.slot_var.cpu()  # R x G*smax
        means = filled[picks[:, None, :], slot_var[:, :, None]]  # R x G*smax x I
        G, smax = self.num_regions, self.max_region_size
        self.mean.copy_(means.view(R, G, smax, I).transpose(2, 3).to(self.mean))
        log_var = torch.log(var.clamp(self.min_var, self.max_var))[slot_var][:, :, None].expand(means.shape)
        self.log_var.copy_(log_var.reshape(R, G, smax, I).transpose(2, 3).to(self.log_var))

    # ------------------------------------------------------------------ modes and samples
    def _chosen(self, t: Tensor, rep: Tensor, comp: Tensor) -> Tensor:
        """(N, V) entries of the slot-layout tensor ``t`` at each variable's chosen component."""
        return self.slot_major(t)[rep[:, None].expand_as(comp), self.slot_of.T[rep], comp]

    def mode(self, rep: Tensor, comp: Tensor, x: Tensor, missing: Tensor) -> Tensor:
        return torch.where(missing.bool(), self._chosen(self.mean, rep, comp).to(x.dtype), x)

    def sample(self, rep: Tensor, comp: Tensor, x: Tensor, missing: Tensor, generator: torch.Generator) -> Tensor:
        mean = self._chosen(self.mean, rep, comp)
        std = self._chosen(self.variance(), rep, comp).sqrt()
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return torch.where(missing.bool(), mean + std * noise, x.to(mean.dtype))

    def snapshot(self) -> dict[str, Tensor]:
        return {"mean": self.mean.detach().clone()}

    def distance_from(self, snapshot: dict[str, Tensor]) -> dict[str, Tensor]:
        """``leaf_mean_distance_from_init``: mean absolute change of the real slots' means."""
        moved = (self.mean.detach() - snapshot["mean"]).abs().sum()
        return {"leaf_mean_distance_from_init": moved / (self.slot_valid.sum() * self.num_components)}
