"""Categorical leaves over K categories, looked up by index (never one-hot) and updated sparsely."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from spn.leaves.base import MIN_COUNT, LeafLayout, Leaves

#: log-probability floor for categorical entries set to zero by a full (step 1.0) M-step.
LOG_FLOOR = -80.0
#: a row whose old parameters keep less than this weight is rewritten densely.
_RESET_BELOW = 1e-6
#: rows of sparse statistics applied at a time (their intermediates stay in cache).
_ROW_BLOCK = 4096


class CategoricalLeaves(Leaves):
    """p(k) = exp(log_scale) * table[k] per (repetition, variable, component).

    Buffers kept normalised by EM only: ``table`` (R*V*K, I), row ``(r * V + v) * K + k``, and
    ``log_scale`` (R, V, I); ``log_table`` is the log of ``table`` for the look-ups (derived: not saved,
    rebuilt after ``load_state_dict``). The factorisation lets an online-EM step touch only the codes
    seen in the batch (K = 512 costs O(batch), not O(K)).
    """

    discrete = True

    def __init__(self, layout: LeafLayout, num_components: int, generator: torch.Generator, num_categories: int) -> None:
        if num_categories is None or num_categories < 2:
            raise ValueError("categorical leaves need num_categories >= 2")
        self.num_categories = num_categories
        super().__init__(layout, num_components)
        R, V, K, I = self.num_repetitions, self.num_vars, num_categories, num_components  # noqa: E741 (I = input distributions, as in the paper)
        probs = 0.01 + 0.98 * torch.rand(R, V, K, I, generator=generator)
        probs = probs / probs.sum(2, keepdim=True)
        self.register_buffer("table", probs.reshape(R * V * K, I))
        self.register_buffer("log_table", torch.log(probs).reshape(R * V * K, I), persistent=False)
        self.register_load_state_dict_post_hook(CategoricalLeaves._rebuild_log_table)
        self.register_buffer("log_scale", torch.zeros(R, V, I))
    def set_layout(self, layout: LeafLayout) -> None:
        super().set_layout(layout)
        R, V, K = self.num_repetitions, self.num_vars, self.num_categories
        # flat table row of every slot before adding the code: (r * V + v) * K (padding: any row, weight 0)
        var = torch.where(layout.slot_var < V, layout.slot_var, torch.zeros_like(layout.slot_var))
        base = (torch.arange(R, device=var.device)[:, None] * V + var) * K
        self.register_buffer("slot_base", base, persistent=False)
        self.register_buffer("assignment", F.one_hot(layout.region_of, self.num_regions).float(), persistent=False)  # V x R x G
        self.padded = layout.padded

    @staticmethod
    def _rebuild_log_table(module: CategoricalLeaves, incompatible_keys: object) -> None:
        with torch.no_grad():
            torch.log(module.table.clamp_min(math.exp(LOG_FLOOR)), out=module.log_table)

    @property
    def num_parameters(self) -> int:
        return self.log_table.numel()

    def log_probs(self, rep: int, var: int) -> Tensor:
        """Log-probabilities (K x I) of variable ``var`` in repetition ``rep``."""
        K = self.num_categories
        row = (rep * self.num_vars + var) * K
        return self.log_table[row : row + K] + self.log_scale[rep, var][None, :]

    # ------------------------------------------------------------------ log-probabilities
    def _slots(self, t: Tensor) -> Tensor:
        """(V, N) per variable -> (R, G * smax, N) per slot, padding slots 0."""
        return torch.cat([t, t.new_zeros(1, t.shape[1])])[self.slot_var]

    def _codes(self, x: Tensor, obs: Tensor, missing: bool) -> Tensor:
        codes = x.long().clamp(0, self.num_categories - 1)
        return torch.where(obs > 0, codes, torch.zeros_like(codes)) if missing else codes

    def region_log_probs(self, x: Tensor, obs: Tensor, missing: bool) -> tuple[Tensor, None]:
        """embedding_bag look-ups, one bag per (repetition, region, sample), ordered so that consecutive
        bags read the same repetition's block of the table (far more cache-friendly random reads)."""
        R, V, G, I, smax = self.num_repetitions, self.num_vars, self.num_regions, self.num_components, self.max_region_size  # noqa: E741
        N = x.shape[0]
        rows = self.slot_base[:, :, None] + self._slots(self._codes(x, obs, missing).T)  # R x G*smax x N
        index = rows.view(R, G, smax, N).transpose(2, 3).reshape(-1)
        offsets = torch.arange(0, R * G * N * smax, smax, device=x.device)
        weights = None
        if missing or self.padded:
            weights = self._slots(obs.T).view(R, G, smax, N).transpose(2, 3).reshape(-1)
        looked_up = F.embedding_bag(
            index, self.log_table, offsets, mode="sum", per_sample_weights=weights, sparse=True
        ).view(R, G, N, I)
        scale = torch.einsum("vrg,rvi->vrgi", self.assignment.to(self.log_scale.dtype), self.log_scale)
        looked_up = looked_up + (obs @ scale.reshape(V, R * G * I)).view(N, R, G, I).permute(1, 2, 0, 3)
        return looked_up.transpose(2, 3), None

    # ------------------------------------------------------------------ EM
    def statistics(self, x: Tensor, obs: Tensor, resp: Tensor, missing: bool, reuse: object = None) -> dict[str, Tensor]:
        """``leaf_table``: sparse rows of the flat table (one per (repetition, slot, sample) look-up, I
        columns, duplicates allowed, consecutive rows in the same (repetition, variable) block) and
        ``leaf_n``: the expected count per (r, v, i)."""
        R, V, K, I = self.num_repetitions, self.num_vars, self.num_categories, self.num_components  # noqa: E741
        rows = self.slot_base[:, :, None] + self._slots(self._codes(x, obs, missing).T)  # R x G*smax x N
        values = resp.transpose(2, 3).index_select(1, self.region_at_slot())  # R x G*smax x N x I
        if missing or self.padded:
            values.mul_(self._slots(obs.T)[..., None])
        table = torch.sparse_coo_tensor(rows.reshape(1, -1), values.view(-1, I), (R * V * K, I), check_invariants=False)
        per_region = torch.matmul(obs.T, resp.transpose(2, 3))  # R x G x V x I
        counts = per_region.gather(1, self.region_of.T[:, None, :, None].expand(R, 1, V, I)).squeeze(1)
        return {"leaf_table": table, "leaf_n": counts.contiguous()}

    def m_step(self, stats: dict[str, Tensor], step_size: float, pseudo_count: float, track_changes: bool = False) -> Tensor:
        """theta' = a * theta + eta * s / (n + kappa) per (r, v, i) row, a = 1 - eta * n / (n + kappa).

        ``a`` goes into the per-row log-scale and only the table entries with statistics are touched
        (one index_add and a log refresh of those rows), so the cost is O(batch) however large K is.
        """
        eta, kappa = step_size, pseudo_count
        R, V, K, I = self.num_repetitions, self.num_vars, self.num_categories, self.num_components  # noqa: E741
        n = stats["leaf_n"]  # R x V x I
        table_stats = stats["leaf_table"]  # sparse rows x I, duplicates allowed
        denom = (n + kappa).clamp_min(MIN_COUNT)
        keep = 1 - eta * n / denom
        reset = keep < _RESET_BELOW
        any_reset = bool(reset.any())
        scale = self.log_scale
        if any_reset:  # (close to) a full M-step for these rows: forget the old parameters
            self.table.view(R, V, K, I).masked_fill_(reset[:, :, None, :], 0.0)
            scale.masked_fill_(reset, 0.0)
        scale.add_(torch.where(reset, torch.zeros_like(keep), torch.log(keep.clamp_min(_RESET_BELOW))))
        factor = (eta / denom) * torch.exp(-scale)  # per row: eta / ((n + kappa) * new scale)
        if not table_stats.is_sparse:  # dense statistics (chunked large batch): one dense update
            self.table.view(R, V, K, I).addcmul_(table_stats.view(R, V, K, I), factor.view(R, V, 1, I))
            torch.log(self.table.clamp_min(math.exp(LOG_FLOOR)), out=self.log_table)
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
            self.table.index_add_(0, block, values)
            if not any_reset:
                self.log_table.index_copy_(0, block, self.table.index_select(0, block).log_())
        if any_reset:
            torch.log(self.table.clamp_min(math.exp(LOG_FLOOR)), out=self.log_table)
        if float(scale.min()) < -30.0:  # fold the scale into the table long before float32 suffers
            self.table.view(R, V, K, I).mul_(scale.exp()[:, :, None, :])
            self.log_table.view(R, V, K, I).add_(scale[:, :, None, :])
            scale.zero_()
        return (1 - keep).mean()

    def init_from_data(self, x: Tensor, obs: Tensor, picks: Tensor, sharpness: float = 0.5) -> None:
        """Each component puts ``sharpness`` of its mass on the code of its data row and the rest on
        the variable's smoothed data histogram."""
        R, V, K, I = self.num_repetitions, self.num_vars, self.num_categories, self.num_components  # noqa: E741
        codes = x.long().clamp(0, K - 1)
        hist = torch.zeros(V, K)
        hist.scatter_add_(1, codes.T, obs.T.float())
        hist = (hist + 1.0 / K) / (hist + 1.0 / K).sum(1, keepdim=True)  # V x K, smoothed
        table = self.log_table.view(R, V, K, I)
        for r in range(R):
            picked = codes[picks[r]]  # I x V
            probs = (1 - sharpness) * hist[:, :, None].expand(V, K, I).clone()
            probs.scatter_add_(1, picked.T[:, None, :], torch.full((V, 1, I), sharpness))
            table[r].copy_(torch.log(probs).to(table))
        self.table.copy_(self.log_table.exp())
        self.log_scale.zero_()

    # ------------------------------------------------------------------ modes and samples
    def _chosen_log_probs(self, rep: Tensor, comp: Tensor) -> Tensor:
        """(N, V, K) log-probabilities of the chosen components."""
        R, V, K, I = self.num_repetitions, self.num_vars, self.num_categories, self.num_components  # noqa: E741
        var = torch.arange(V, device=rep.device)[None].expand_as(comp)
        r = rep[:, None].expand_as(comp)
        return self.log_table.view(R, V, K, I)[r, var, :, comp] + self.log_scale[r, var, comp][..., None]

    def mode(self, rep: Tensor, comp: Tensor, x: Tensor, missing: Tensor) -> Tensor:
        return torch.where(missing.bool(), self._chosen_log_probs(rep, comp).argmax(-1), x.long())

    def sample(self, rep: Tensor, comp: Tensor, x: Tensor, missing: Tensor, generator: torch.Generator) -> Tensor:
        probs = torch.softmax(self._chosen_log_probs(rep, comp).reshape(-1, self.num_categories).float(), -1)
        draws = torch.multinomial(probs, 1, generator=generator).squeeze(-1).view(comp.shape)
        return torch.where(missing.bool(), draws, x.long())

    def distance_from(self, snapshot: dict[str, Tensor]) -> dict[str, Tensor]:
        """``leaf_mass_replaced``: share of each leaf's probability mass EM has rewritten (since the
        last data initialisation, which sets every scale to 1)."""
        return {"leaf_mass_replaced": 1.0 - self.log_scale.exp().mean()}
