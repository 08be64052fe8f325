"""Border-aware scoring: patch context, Mondrian conformal calibration, the conditional RAT-SPN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.grids import chest_wall, patch_context
from experiments.calibration import observed_rates
from lightning_modules.calibration import MondrianConformal
from lightning_modules.rat_spn_stage import RatSpnStage
from tests.test_rat_spn_stage import TinyAE, _images, _save_autoencoder, _trainer


def _brute_context(mask: np.ndarray, r: int, c: int) -> tuple[float, float]:
    """The definition, spelled out: the chest-wall column is the bounding-box side most rows end on; the
    skin line is every background pixel except those across the chest wall on rows that reach it; the film
    cut is the chest-wall band (4 px) on those rows plus the breast's pixels on the image edge."""
    h, w = mask.shape
    rows = [i for i in range(h) if mask[i].any()]
    lo = min(int(np.flatnonzero(mask[i])[0]) for i in rows)
    hi = max(int(np.flatnonzero(mask[i])[-1]) for i in rows)
    left = [i for i in rows if np.flatnonzero(mask[i])[0] <= lo + 4]
    right = [i for i in rows if np.flatnonzero(mask[i])[-1] >= hi - 4]
    if len(left) >= len(right):
        chest, beyond = [(i, j) for i in left for j in range(lo, lo + 5) if mask[i, j]], lambda i, j: i in left and j < lo
    else:
        chest, beyond = [(i, j) for i in right for j in range(hi - 4, hi + 1) if mask[i, j]], lambda i, j: i in right and j > hi
    on_edge = [(i, j) for i in range(h) for j in range(w) if mask[i, j] and (i in (0, h - 1) or j in (0, w - 1))]
    background = [(i, j) for i in range(h) for j in range(w) if not mask[i, j] and not beyond(i, j)]
    skin = min(math.hypot(i - r, j - c) for i, j in background) if background else math.hypot(h, w)
    return skin, min(math.hypot(i - r, j - c) for i, j in chest + on_edge)


@pytest.mark.parametrize("chest_col", [0, 6])  # breast touching the image edge; cut next to black padding
def test_patch_context_matches_brute_force_distances(chest_col):
    rng = np.random.default_rng(0)
    mask = np.zeros((23, 37), bool)
    yy, xx = np.mgrid[:23, :37]
    mask[((yy - 11) ** 2 / 110 + (xx - chest_col) ** 2 / 500 < 1) & (xx >= chest_col)] = True
    centers = np.argwhere(mask)[rng.choice(int(mask.sum()), 25, replace=False)]
    got = patch_context(mask, centers)
    assert got.shape == (25, 2) and got.dtype == np.float32
    for (r, c), (skin, chest) in zip(centers, got):
        want_skin, want_chest = _brute_context(mask, int(r), int(c))
        assert skin == pytest.approx(want_skin, abs=1e-3)
        assert chest == pytest.approx(want_chest, abs=1e-3)
    # the straight cut is the chest wall, not skin: a centre next to it is far from the skin line
    # (the 4 px tolerance band counts as the cut, so the centre 1 px from the line is inside it)
    r, c = 11, chest_col + 1
    skin, chest = patch_context(mask, np.array([[r, c]]))[0]
    assert chest == pytest.approx(0.0) and skin > 8


def test_chest_wall_finds_the_straight_side():
    mask = np.zeros((30, 40), bool)
    yy, xx = np.mgrid[:30, :40]
    mask[((yy - 15) ** 2 / 150 + (39 - xx) ** 2 / 600 < 1)] = True  # chest wall on the right image edge
    col, side, line = chest_wall(mask)
    assert (col, side) == (39, 1) and line[:, 39].sum() == mask[:, 39].sum() and not line[:, :35].any()
    assert chest_wall(np.zeros((5, 5), bool))[1] == 0


def _context(n: int, skin: float, edge: float = 500.0) -> torch.Tensor:
    return torch.tensor([[skin, edge]]).expand(n, 2).clone()


def test_conformal_p_values_follow_the_formula_and_are_uniform_per_stratum():
    gen = torch.Generator().manual_seed(0)
    cal = MondrianConformal(bins_px=(16.0,), min_count=20)
    # stratum 0 (by the skin line) scores 10 higher than the interior: the border trap in miniature
    border, interior = 10 + torch.randn(400, generator=gen), torch.randn(400, generator=gen)
    info = cal.fit(torch.cat([border, interior]), torch.cat([_context(400, 3.0), _context(400, 40.0)]))
    assert info["counts"][:2] == [400, 400] and not any(info["pooled"][:2])
    # exact conformal p at a calibration score: (1 + #{>= s}) / (n + 1) with the score itself counted once
    ordered = torch.sort(interior).values
    p = cal.p_value(ordered[[0, 199, 399]], _context(3, 40.0))
    torch.testing.assert_close(p, torch.tensor([400 / 401, 201 / 401, 1 / 401]))
    # fresh healthy draws: P(p < alpha) ~ alpha in both strata, so calibrated border and interior agree
    fresh_border, fresh_interior = 10 + torch.randn(4000, generator=gen), torch.randn(4000, generator=gen)
    pb = cal.p_value(fresh_border, _context(4000, 3.0)).numpy()
    pi = cal.p_value(fresh_interior, _context(4000, 40.0)).numpy()
    for alpha, rb, ri in zip((0.01, 0.05, 0.2), observed_rates(pb, (0.01, 0.05, 0.2)), observed_rates(pi, (0.01, 0.05, 0.2))):
        assert abs(rb - alpha) < 0.35 * alpha + 0.004 and abs(ri - alpha) < 0.35 * alpha + 0.004
    # normalised mode: the border's shift and spread are taken out, then one pooled rank for every stratum
    norm = MondrianConformal(bins_px=(16.0,), min_count=20, normalise=True)
    norm.fit(torch.cat([border * 3 - 20, interior]), torch.cat([_context(400, 3.0), _context(400, 40.0)]))
    pb = norm.p_value(fresh_border * 3 - 20, _context(4000, 3.0)).numpy()
    pi = norm.p_value(fresh_interior, _context(4000, 40.0)).numpy()
    for alpha, rb, ri in zip((0.01, 0.05, 0.2), observed_rates(pb, (0.01, 0.05, 0.2)), observed_rates(pi, (0.01, 0.05, 0.2))):
        assert abs(rb - alpha) < 0.35 * alpha + 0.004 and abs(ri - alpha) < 0.35 * alpha + 0.004
    # monotone, also past the highest calibration score (exponential tail keeps the order)
    xs = torch.linspace(-5, 30, 200)
    s = cal(xs, _context(200, 3.0))
    assert bool((s[1:] >= s[:-1]).all()) and float(s[-1]) > float(s[-2]) > math.log(401)
    # far past every healthy score -log p stays finite and ordered (its p underflows float32)
    far = cal(torch.tensor([1e4, 2e4]), _context(2, 3.0))
    assert bool(torch.isfinite(far).all()) and float(far[1]) > float(far[0]) > 80


def test_sparse_strata_fall_back_to_the_pool_and_a_fitted_state_round_trips():
    cal = MondrianConformal(bins_px=(16.0, 32.0), min_count=50)
    scores = torch.arange(100, dtype=torch.float32)
    context = torch.cat([_context(90, 50.0), _context(10, 2.0, edge=1.0)])  # 10 chest-wall patches only
    info = cal.fit(scores, context)
    edge_stratum = int(cal.strata(_context(1, 2.0, edge=1.0))[0])
    assert edge_stratum == 3 and info["counts"][edge_stratum] == 10 and info["pooled"][edge_stratum]
    torch.testing.assert_close(cal.p_value(torch.tensor([49.5]), _context(1, 2.0, edge=1.0)), torch.tensor([50.5 / 101]))
    # two sparse chest-wall strata (30 each) share their side's 60 scores before falling back to the pool
    side = MondrianConformal(bins_px=(16.0, 32.0), min_count=50)
    chest_scores = 1000 + torch.arange(60, dtype=torch.float32)
    chest_ctx = torch.cat([_context(30, 50.0, edge=5.0), _context(30, 50.0, edge=20.0)])
    side.fit(torch.cat([scores, chest_scores]), torch.cat([_context(100, 50.0), chest_ctx]))
    torch.testing.assert_close(side.p_value(torch.tensor([1029.5, 1029.5]), chest_ctx[[0, -1]]),
                               torch.tensor([30.5 / 61, 30.5 / 61]))
    fresh = MondrianConformal(bins_px=(16.0, 32.0))
    assert not fresh.fitted
    state = cal.state_dict()
    fresh.resize_for(state, "")
    fresh.load_state_dict(state)
    x = torch.linspace(-3, 120, 50)
    torch.testing.assert_close(fresh(x, _context(50, 20.0)), cal(x, _context(50, 20.0)))
    assert MondrianConformal.threshold(0.01) == pytest.approx(-math.log(0.01))
    with pytest.raises(ValueError, match="alpha"):
        MondrianConformal.threshold(0.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        MondrianConformal().p_value(x, _context(50, 20.0))


class ContextPatchSet(Dataset):
    """Healthy patches whose brightness depends on where they sit: bright by the skin line, dark inside."""

    def __init__(self, n: int, seed: int, offset: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.near = torch.rand(n, generator=gen) < 0.5
        self.skin = torch.where(self.near, 4 * torch.rand(n, generator=gen), 60 + 40 * torch.rand(n, generator=gen))
        images = _images(n, seed)
        self.images = torch.where(self.near[:, None, None, None], (images + 0.4).clamp(0, 1), images)
        self.offset = offset

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"patches": self.images[i], "index": torch.tensor(self.offset + i), "centers": torch.tensor([32, 32]),
                "context": torch.tensor([float(self.skin[i]), 500.0]), "patient_id": f"p{i % 7}",
                "label": torch.tensor(0)}


def _fit_stage(tmp_path, context: bool) -> RatSpnStage:
    pl.seed_everything(0)
    ae_path = _save_autoencoder(TinyAE(latent_dim=8), tmp_path, f"ae{int(context)}")
    stage = RatSpnStage(str(ae_path), num_repetitions=6, num_input_distributions=6, step_size=0.05,
                        init_batches=8, context=context)
    train = DataLoader(ContextPatchSet(512, 1), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(ContextPatchSet(128, 2, offset=512), batch_size=64)
    _trainer(tmp_path / f"fit{int(context)}", 4).fit(stage, train, val)
    return stage


def test_conditional_rat_spn_scores_a_patch_against_healthy_patches_at_the_same_place(tmp_path):
    stage = _fit_stage(tmp_path, context=True)
    assert stage.uses_context and stage.spn.num_vars == 8 + 2
    bright = (_images(64, seed=20) + 0.4).clamp(0, 1)
    by_skin, inside = _context(64, 2.0), _context(64, 80.0)
    # a bright patch is normal by the skin line and anomalous inside: only position tells them apart
    s_border, s_inside = stage.score_grid(bright, by_skin), stage.score_grid(bright, inside)
    assert float(s_border.median()) + 2.0 < float(s_inside.median())
    # the score is exactly -(log p(z, c) - log p(c)), the context marginal integrating the latents out
    z = stage._standardise(stage._inputs(stage.encode(bright), by_skin))
    missing = torch.zeros_like(z, dtype=torch.bool)
    missing[:, :8] = True
    expected = -(stage.spn.log_likelihood(z)[:, 0] - stage.spn.log_likelihood(z, missing=missing)[:, 0])
    torch.testing.assert_close(s_border, expected)
    with pytest.raises(ValueError, match="context"):
        stage.score_grid(bright)
    # the unconditional model cannot tell them apart: the same patch gets the same score anywhere
    plain = _fit_stage(tmp_path, context=False)
    torch.testing.assert_close(plain.score_grid(bright, by_skin), plain.score_grid(bright, inside))


def test_calibrated_checkpoint_loads_and_scores_minus_log_p(tmp_path):
    stage = _fit_stage(tmp_path, context=True)
    healthy = ContextPatchSet(256, 5)
    raw = stage.score_grid(healthy.images, torch.stack([healthy[i]["context"] for i in range(256)]))
    calibrator = MondrianConformal(bins_px=(16.0,), min_count=20)
    ctx = torch.stack([healthy[i]["context"] for i in range(256)])
    calibrator.fit(raw, ctx)
    stage.calibrator = calibrator
    stage.calibration_alpha.fill_(0.05)
    assert stage.threshold == pytest.approx(-math.log(0.05))
    trainer = _trainer(tmp_path / "save", 1)
    trainer.strategy.connect(stage)
    trainer.save_checkpoint(tmp_path / "calibrated.ckpt")
    restored = RatSpnStage.load_from_checkpoint(tmp_path / "calibrated.ckpt")
    item = {"patches": healthy.images[:32], "context": ctx[:32]}
    torch.testing.assert_close(restored.score_item(item), -torch.log(calibrator.p_value(raw[:32], ctx[:32])))
    assert restored.threshold == pytest.approx(-math.log(0.05))
    # a checkpoint saved before the bilateral calibrator existed (also its autoencoder's) loads, that one unfitted,
    # whether the stage is rebuilt from the checkpoint alone or its autoencoder file is still there
    state = torch.load(tmp_path / "calibrated.ckpt", weights_only=False)
    dropped = [k for k in state["state_dict"] if "bilateral_calibrator." in k]
    assert any(k.startswith("autoencoder.") for k in dropped)
    for key in dropped:
        del state["state_dict"][key]
    torch.save(state, tmp_path / "older.ckpt")
    for older in (RatSpnStage.load_from_checkpoint(tmp_path / "older.ckpt"),
                  RatSpnStage.load_from_checkpoint(tmp_path / "older.ckpt", contralateral="mean")):
        assert not older.bilateral_calibrator.fitted
        torch.testing.assert_close(older.score_item(item), restored.score_item(item))
    # the naive border fix as a load-time option: patches by the skin line get the image's lowest score
    suppressed = RatSpnStage.load_from_checkpoint(tmp_path / "calibrated.ckpt", border_suppression_px=10.0)
    scores = suppressed.score_item(item)
    near = ctx[:32, 0] < 10.0
    assert bool(near.any()) and torch.allclose(scores[near], scores.min().expand(int(near.sum())))


def _grid_item(healthy: ContextPatchSet) -> tuple[dict, torch.Tensor]:
    """The 64 patches of ``healthy`` as one evaluation item on an 8 x 8 grid of stride 16, and their context."""
    ctx = torch.stack([healthy[i]["context"] for i in range(64)])
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    item = {"patches": healthy.images[:64], "context": ctx, "stride": 16,
            "centers": torch.stack([rows, cols], -1).reshape(-1, 2) * 16, "breast_mask": torch.ones(128, 128, dtype=torch.bool)}
    return item, ctx


def test_score_smoothing_averages_neighbours_before_the_calibrator(tmp_path):
    from experiments.calibration import _input, _scored
    from lightning_modules.grid_smoothing import smooth_grid

    stage = _fit_stage(tmp_path, context=True)
    healthy = ContextPatchSet(64, 5)
    item, ctx = _grid_item(healthy)
    raw = stage.score_grid(healthy.images, ctx)
    torch.testing.assert_close(stage.grid_scores(item), raw)  # off by default
    stage.hparams.score_smoothing_px = 24.0
    smoothed = smooth_grid(raw, item["centers"], 16, 24.0)
    assert not torch.allclose(smoothed, raw)
    torch.testing.assert_close(stage.grid_scores(item), smoothed)
    # the calibration fits on what the model scores: smoothed raw scores, ranked by the calibrator afterwards
    torch.testing.assert_close(_input(stage, _scored(stage, item), MondrianConformal()), smoothed)
    stage.calibrator.fit(smoothed, ctx)
    torch.testing.assert_close(stage.score_item(item), stage.calibrator(smoothed, ctx))
    with pytest.raises(ValueError, match="score_smoothing_px must be >= 0"):
        RatSpnStage(autoencoder_ckpt="x.ckpt", score_smoothing_px=-1.0)


def test_smooth_calibrated_smooths_a_first_calibration_and_calibrates_again(tmp_path):
    """``smooth_calibrated``: raw -> first calibrator (-log p) -> grid smoothing -> calibrator; the pair travels in
    the checkpoint, and until the first calibrator is fitted the model smooths raw scores as before."""
    from experiments.calibration import _input, _scored
    from lightning_modules.grid_smoothing import smooth_grid

    stage = _fit_stage(tmp_path, context=True)
    stage.hparams.score_smoothing_px = 24.0
    stage.hparams.smooth_calibrated = True
    item, ctx = _grid_item(ContextPatchSet(64, 5))
    raw = stage.score_grid(item["patches"], ctx)
    torch.testing.assert_close(stage.grid_scores(item), smooth_grid(raw, item["centers"], 16, 24.0))  # not fitted
    healthy = ContextPatchSet(256, 6)
    h_ctx = torch.stack([healthy[i]["context"] for i in range(256)])
    pre = MondrianConformal(bins_px=(16.0,), min_count=20)
    pre.fit(stage.score_grid(healthy.images, h_ctx), h_ctx)
    first = pre(raw, ctx)
    assert not torch.allclose(first, raw)
    expected_input = smooth_grid(first, item["centers"], 16, 24.0)
    # the callback's path (a candidate first calibrator) and the model's (its own, once set) agree
    torch.testing.assert_close(_input(stage, _scored(stage, item), pre), expected_input)
    stage.pre_calibrator = pre
    torch.testing.assert_close(stage.grid_scores(item), expected_input)
    stage.calibrator = MondrianConformal(bins_px=(16.0,), min_count=20)
    stage.calibrator.fit(expected_input, ctx)
    stage.calibration_alpha.fill_(0.05)
    expected = stage.calibrator(expected_input, ctx)
    torch.testing.assert_close(stage.score_item(item), expected)
    trainer = _trainer(tmp_path / "save2", 1)
    trainer.strategy.connect(stage)
    trainer.save_checkpoint(tmp_path / "calibrated2.ckpt")
    restored = RatSpnStage.load_from_checkpoint(tmp_path / "calibrated2.ckpt")
    assert restored.smooths_calibrated and restored.pre_calibrator.fitted
    torch.testing.assert_close(restored.score_item(item), expected)
    assert restored.threshold == pytest.approx(-math.log(0.05))


def test_conditional_rat_spn_on_codes_keeps_them_categorical_and_standardises_only_the_context(tmp_path):
    from tests.test_rat_spn_stage import TinyVQ

    pl.seed_everything(0)
    ae_path = _save_autoencoder(TinyVQ(), tmp_path, "vq")
    stage = RatSpnStage(str(ae_path), num_repetitions=4, num_input_distributions=5, step_size=0.05,
                        init_batches=8, context=True)
    train = DataLoader(ContextPatchSet(256, 1), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    _trainer(tmp_path / "fitvq", 2).fit(stage, train, DataLoader(ContextPatchSet(64, 2, offset=256), batch_size=64))
    assert stage.spn.num_vars == 16 + 2
    # codes are neither shifted nor scaled; the two context columns are standardised
    assert torch.equal(stage.latent_mean[:16], torch.zeros(16)) and torch.equal(stage.latent_std[:16], torch.ones(16))
    assert float(stage.latent_std[16:].min()) > 0 and not torch.equal(stage.latent_mean[16:], torch.zeros(2))
    patches = _images(8, seed=3)
    ctx = _context(8, 2.0)
    z = stage._standardise(stage._inputs(stage.encode(patches), ctx))
    assert torch.equal(z[:, :16], stage.encode(patches).float())
    missing = torch.zeros_like(z, dtype=torch.bool)
    missing[:, :16] = True
    expected = -(stage.spn.log_likelihood(z)[:, 0] - stage.spn.log_likelihood(z, missing=missing)[:, 0])
    torch.testing.assert_close(stage.score_grid(patches, ctx), expected)
