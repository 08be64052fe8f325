"""Mondrian (stratified) conformal calibration of anomaly scores, kept in checkpoint buffers.

A patch's raw score is ranked against the raw scores of healthy calibration patches of the same
*border stratum* (how far its centre lies from the skin line or the chest wall), and turned into a
conformal p-value: p = (1 + #{healthy scores >= s}) / (n + 1) within the stratum. The calibrated
score is -log p, comparable across strata: a patch by the skin line is compared with healthy patches
by the skin line, not with the breast interior, so the border no longer outshines a lesion merely by
being the most varied healthy tissue (PROTOCOL "Known traps").

Between calibration scores p is interpolated linearly in the rank (no ties among test patches); past
the highest calibration score it falls off exponentially with the mean excess of the stratum's top
decile, so patches more extreme than every healthy one still keep their order. Strata with fewer than
``min_count`` calibration patches use the scores of their side (skin line or chest wall) as a whole,
or, if that is short too, the pooled scores of all strata. With no bins (``bins_px=()``)
this is plain split-conformal calibration, and ``threshold(alpha)`` = -log(alpha) is a threshold with
false-positive rate ~alpha on healthy tissue.

Plain torch: fitted by `experiments.calibration` from healthy validation images, never from test data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


class MondrianConformal(nn.Module):
    """Per-stratum conformal p-values of scores; strata from the patch context (skin, chest-wall distances in px).

    Args:
        bins_px: upper edges of the border-distance bins (px at evaluation spacing); distance = the nearer
            of the skin line and the chest wall. Patches nearer the chest wall than the skin line and closer
            than the last bin edge form their own strata, so there are ``2 * len(bins) + 1``.
        min_count: calibration patches a stratum needs to stand alone; fewer -> its side's, else all scores.
    """

    def __init__(self, bins_px: tuple[float, ...] | list[float] = (16.0, 32.0, 64.0), min_count: int = 50,
                 normalise: bool = False) -> None:
        super().__init__()
        self.min_count = int(min_count)
        self.normalise = bool(normalise)
        self.register_buffer("bins", torch.tensor([float(b) for b in bins_px]))
        self.register_buffer("sorted_scores", torch.zeros(0))  # per stratum, ascending, concatenated
        self.register_buffer("offsets", torch.zeros(1, dtype=torch.long))  # stratum s: offsets[s]:offsets[s+1]
        self.register_buffer("tail_scale", torch.zeros(0))
        self.register_buffer("pooled", torch.zeros(0, dtype=torch.bool))  # stratum fell back to the pool
        # normalised mode: per-stratum median and robust scale; the ranks then come from all strata together
        self.register_buffer("loc", torch.zeros(0))
        self.register_buffer("scale", torch.zeros(0))

    @property
    def num_strata(self) -> int:
        return 2 * int(self.bins.numel()) + 1

    @property
    def fitted(self) -> bool:
        return int(self.offsets.numel()) == self.num_strata + 1 and int(self.sorted_scores.numel()) > 0

    def strata(self, context: Tensor) -> Tensor:
        """Stratum index (long N) of each patch from its context (N x 2: skin and chest-wall distance, px)."""
        context = context.reshape(-1, 2).float()
        skin, chest = context[:, 0], context[:, 1]
        nearest = torch.minimum(skin, chest)
        b = torch.bucketize(nearest, self.bins.to(nearest.device), right=True)  # 0 .. B
        nb = int(self.bins.numel())
        chest_side = (chest < skin) & (b < nb)
        return torch.where(chest_side, b + nb + 1, b)

    @torch.no_grad()
    def fit(self, scores: Tensor, context: Tensor) -> dict[str, Any]:
        """Stores the calibration scores by stratum; returns per stratum the count, the median raw score (how
        much the border outshines the interior on healthy tissue) and whether it fell back to a pool."""
        scores = scores.reshape(-1).double().cpu()
        if scores.numel() == 0:
            raise ValueError("conformal calibration needs at least one healthy calibration patch")
        if not torch.isfinite(scores).all():
            raise ValueError("conformal calibration scores contain NaN or infinity")
        strata = self.strata(context.cpu())
        pool = torch.sort(scores).values
        parts, offsets, tails, pooled, counts, medians = [], [0], [], [], [], []
        nb = int(self.bins.numel())
        chest = strata > nb
        for s in range(self.num_strata):
            own = torch.sort(scores[strata == s]).values
            counts.append(int(own.numel()))
            medians.append(float(own[own.numel() // 2]) if own.numel() else float("nan"))
            use_pool = own.numel() < self.min_count
            chosen = own
            if use_pool:  # the stratum's side (skin line or chest wall) as a whole, else every stratum
                side = torch.sort(scores[chest == (s > nb)]).values
                chosen = side if side.numel() >= self.min_count else pool
            parts.append(chosen)
            tails.append(self._tail_scale(chosen))
            pooled.append(use_pool)
        if self.normalise:
            parts = self._normalised_parts(scores, context, parts)
            tails = [self._tail_scale(parts[0])] * self.num_strata
        else:
            self.loc = torch.zeros(self.num_strata)
            self.scale = torch.ones(self.num_strata)
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + int(part.numel()))
        self.sorted_scores = torch.cat(parts).float()
        self.offsets = torch.tensor(offsets, dtype=torch.long)
        self.tail_scale = torch.tensor(tails, dtype=torch.float32)
        self.pooled = torch.tensor(pooled, dtype=torch.bool)
        return {"counts": counts, "pooled": pooled, "median_raw_score": medians, "n": int(scores.numel())}

    def _normalised_parts(self, scores: Tensor, context: Tensor, parts: list[Tensor]) -> list[Tensor]:
        """Normalised conformal: each stratum's own (or fallback) scores give a median and a robust scale
        (interquartile range / 1.349); every score is standardised by them (interpolated in its border
        distance, `_location_scale`), and all of them together form one calibration set, so the tails come from every healthy patch, not from a small stratum's."""
        locs, scales = [], []
        for chosen in parts:
            n = chosen.numel()
            q1, med, q3 = chosen[n // 4], chosen[n // 2], chosen[(3 * n) // 4]
            locs.append(float(med))
            scales.append(max(float(q3 - q1) / 1.349, 1e-6))
        self.loc = torch.tensor(locs, dtype=torch.float32)
        self.scale = torch.tensor(scales, dtype=torch.float32)
        loc, scale = self._location_scale(context.cpu())
        z = torch.sort((scores - loc.double()) / scale.double()).values
        return [z] * self.num_strata

    def _location_scale(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised mode: each patch's location and scale, interpolated linearly in its border distance
        between the stratum centres of its side (skin line or chest wall), so neighbouring strata meet
        without a step (a step draws a ring of false alarms where two strata meet)."""
        context = context.reshape(-1, 2).float()
        skin, chest = context[:, 0], context[:, 1]
        nearest = torch.minimum(skin, chest)
        bins = self.bins.to(nearest.device)
        nb = int(bins.numel())
        if nb == 0:
            return self.loc[:1].expand_as(nearest).to(nearest.device), self.scale[:1].expand_as(nearest).to(nearest.device)
        lower = torch.cat([bins.new_zeros(1), bins[:-1]])
        interior = bins[-1] + (bins[-1] - lower[-1]) / 2
        knots = torch.cat([(lower + bins) / 2, interior[None]])  # B + 1 centres, the interior's last
        loc, scale = self.loc.to(nearest.device), self.scale.to(nearest.device)
        skin_side = torch.arange(nb + 1, device=nearest.device)
        chest_side = torch.cat([torch.arange(nb + 1, 2 * nb + 1, device=nearest.device), skin_side[-1:]])
        use_chest = chest < skin
        out = []
        for values in (loc, scale):
            a = _interp(nearest, knots, values[skin_side])
            b = _interp(nearest, knots, values[chest_side])
            out.append(torch.where(use_chest, b, a))
        return out[0], out[1]

    @staticmethod
    def _tail_scale(sorted_scores: Tensor) -> float:
        """Mean excess over the 90th percentile: the exponential tail's scale past the highest score."""
        n = sorted_scores.numel()
        top = sorted_scores[int(0.9 * n):]
        q = sorted_scores[min(int(0.9 * n), n - 1)]
        spread = float((sorted_scores[-1] - sorted_scores[0]).abs())
        return max(float((top - q).mean()), 1e-3 * spread, 1e-6)

    @torch.no_grad()
    def p_value(self, scores: Tensor, context: Tensor) -> Tensor:
        """Conformal p-value of each score within its stratum, float N in [0, 1] (far tails underflow to 0;
        `forward` gives -log p without that loss)."""
        return torch.exp(-self(scores, context))

    def _minus_log_p(self, scores: Tensor, context: Tensor) -> Tensor:
        """-log of the conformal p-value of each score within its stratum, float N >= 0, finite."""
        if not self.fitted:
            raise RuntimeError("the calibrator is not fitted: run `mammospn calibrate` on a checkpoint first")
        scores = scores.reshape(-1).float()
        strata = self.strata(context).to(scores.device)
        out = torch.zeros_like(scores)
        if self.loc.numel() == self.num_strata:  # identity (0, 1) unless fitted in normalised mode
            loc, scale = self._location_scale(context.to(scores.device))
            scores = (scores - loc) / scale
        cal_all = self.sorted_scores.to(scores.device)
        for s in torch.unique(strata).tolist():
            sel = strata == s
            cal = cal_all[int(self.offsets[s]): int(self.offsets[s + 1])]
            out[sel] = self._minus_log_survival(scores[sel], cal, float(self.tail_scale[s]))
        return out

    @staticmethod
    def _minus_log_survival(x: Tensor, cal: Tensor, tail: float) -> Tensor:
        """-log of (1 + #{cal >= x}) / (n + 1), linear in the rank between calibration scores, exponential past
        the max (there in log space: log(n + 1) + (x - max) / tail, which never overflows)."""
        n = cal.numel()
        if n == 1:
            rank = torch.zeros_like(x)
        else:
            hi = torch.searchsorted(cal, x, right=True).clamp(1, n - 1)
            lo = hi - 1
            gap = (cal[hi] - cal[lo]).clamp_min(1e-12)
            frac = ((x - cal[lo]) / gap).clamp(0.0, 1.0)
            rank = lo.float() + frac  # 0 at cal[0], n - 1 at cal[-1]
        p = (n - rank) / (n + 1)
        p = torch.where(x < cal[0], torch.ones_like(p), p)
        beyond = x > cal[-1]
        past_max = math.log(n + 1) + (x - cal[-1]) / tail
        return torch.where(beyond, past_max, -torch.log(p.clamp_min(1.0 / (n + 1))))

    def forward(self, scores: Tensor, context: Tensor) -> Tensor:
        """Calibrated score -log p (higher = more anomalous), float N."""
        return self._minus_log_p(scores, context)

    @staticmethod
    def threshold(alpha: float) -> float:
        """Calibrated-score threshold whose false-positive rate on healthy patches is ~``alpha``."""
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        return -math.log(alpha)

    def resize_for(self, state: dict[str, Tensor], prefix: str) -> None:
        """Gives the buffers the shapes of a saved state, so `load_state_dict` accepts a fitted calibrator."""
        for name in ("bins", "sorted_scores", "offsets", "tail_scale", "pooled", "loc", "scale"):
            key = prefix + name
            if key in state:
                setattr(self, name, torch.empty_like(state[key]))


def _interp(x: Tensor, knots: Tensor, values: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``values`` at ``knots`` (ascending), constant beyond the ends."""
    if knots.numel() == 1:
        return values.expand_as(x)
    hi = torch.searchsorted(knots, x.contiguous()).clamp(1, knots.numel() - 1)
    lo = hi - 1
    w = ((x - knots[lo]) / (knots[hi] - knots[lo]).clamp_min(1e-12)).clamp(0.0, 1.0)
    return values[lo] + w * (values[hi] - values[lo])


__all__ = ["MondrianConformal"]
