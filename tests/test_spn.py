"""Exactness of the RAT-SPN: explicit mixture expansion, normalisation, marginals, EM monotonicity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from spn import RatSpn, balanced_region_sizes, random_region_graph


def _explicit_log_likelihood(model: RatSpn, leaf_log_prob) -> torch.Tensor:
    """log p(x) (N x C) by enumerating every induced tree of the circuit as one mixture component.

    ``leaf_log_prob(v, r, i)`` -> (N,) log-density of variable v under leaf component i of repetition r.
    """
    weights = [torch.softmax(w.reshape(*w.shape[:3], -1), -1).view(w.shape) for w in model.log_weights]
    mix = torch.softmax(model.log_mix, -1)
    depth = model.depth

    def trees(level: int, r: int, j: int, s: int):
        if level == depth:
            return [(1.0, {j: s})]
        out = []
        w = weights[level][r, j, s]
        for a in range(w.shape[0]):
            for b in range(w.shape[1]):
                for wl, left in trees(level + 1, r, 2 * j, a):
                    for wr, right in trees(level + 1, r, 2 * j + 1, b):
                        out.append((float(w[a, b].detach()) * wl * wr, {**left, **right}))
        return out

    columns = []
    for c in range(model.num_roots):
        terms = []
        for r in range(model.num_repetitions):
            for weight, choice in trees(0, r, 0, c):
                logp = math.log(float(mix[c, r].detach()) * weight)
                total = sum(leaf_log_prob(v, r, choice[int(model.region_of[v, r])]) for v in range(model.num_vars))
                terms.append(logp + total)
        columns.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(columns, 1)


@pytest.mark.parametrize(
    "num_vars,depth,reps,inputs,sums,roots",
    [(4, 1, 2, 3, 1, 1), (5, 2, 2, 2, 2, 2), (9, 3, 1, 2, 1, 1)],
)
def test_gaussian_network_equals_its_mixture_expansion(num_vars, depth, reps, inputs, sums, roots):
    model = RatSpn(num_vars, depth, reps, inputs, num_sums=sums, num_roots=roots, seed=3, min_var=0.05).double()
    with torch.no_grad():
        model.leaf_log_var.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, num_vars, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mean, var = model.gaussian_leaves()

    def leaf(v, r, i):
        return -0.5 * (x[:, v] - mean[v, r, i]) ** 2 / var[v, r, i] - 0.5 * torch.log(2 * math.pi * var[v, r, i])

    expected = _explicit_log_likelihood(model, leaf)
    got = model.log_likelihood(x).detach()
    assert got.shape == (7, roots)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=0)


def test_categorical_network_equals_its_mixture_expansion_and_sums_to_one():
    model = RatSpn(4, 1, 2, 3, num_roots=2, leaf="categorical", num_categories=3, seed=5).double()
    states = torch.tensor(list(itertools.product(range(3), repeat=4)))
    table = model.leaf_log_table.view(2, 4, 3, 3) + model.leaf_log_scale[:, :, None, :]

    def leaf(v, r, i):
        return table[r, v, states[:, v], i]

    ll = model.log_likelihood(states).detach()
    torch.testing.assert_close(ll, _explicit_log_likelihood(model, leaf).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ll.exp().sum(0), torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_categorical_stays_normalised_through_online_em_and_marginalises_exactly():
    model = RatSpn(4, 1, 3, 2, leaf="categorical", num_categories=3, seed=1, pseudo_count=0.5)
    data = torch.randint(0, 3, (50, 4), generator=torch.Generator().manual_seed(2))
    model.init_from_data(data)
    for step in range(60):  # large steps drive the per-row log-scale down until it is folded
        model.em_update(data[(step % 5) * 10 : (step % 5 + 1) * 10], step_size=0.9)
    states = torch.tensor(list(itertools.product(range(3), repeat=4)))
    joint = model.log_likelihood(states).detach().exp()[:, 0]
    assert abs(float(joint.sum()) - 1.0) < 1e-4
    # marginalise variable 2: p(x0, x1, x3) == sum over x2 of the joint
    missing = torch.zeros_like(states, dtype=torch.bool)
    missing[:, 2] = True
    marginal = model.log_likelihood(states, missing).detach().exp()[:, 0]
    summed = joint.view(3, 3, 3, 3).sum(2)  # index (x0, x1, x3)
    expected = summed[states[:, 0], states[:, 1], states[:, 3]]
    torch.testing.assert_close(marginal, expected, atol=1e-6, rtol=1e-4)
    all_missing = model.log_likelihood(states[:2], torch.ones(2, 4, dtype=torch.bool)).detach()
    torch.testing.assert_close(all_missing, torch.zeros(2, 1), atol=1e-5, rtol=0)


def test_gaussian_integrates_to_one_in_2d_and_marginal_equals_integral():
    model = RatSpn(2, 1, 3, 3, seed=7, min_var=0.05).double()
    with torch.no_grad():
        model.leaf_log_var.uniform_(-1.0, 0.5, generator=torch.Generator().manual_seed(3))
    grid = torch.linspace(-9.0, 9.0, 601, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    density = model.log_likelihood(points).detach().exp().view(601, 601)
    total = torch.trapezoid(torch.trapezoid(density, grid, dim=1), grid)
    assert abs(float(total) - 1.0) < 1e-6
    # p(x0) with x1 missing == integral over x1
    integral = torch.trapezoid(density, grid, dim=1)
    missing = torch.tensor([[False, True]]).expand(601, 2)
    marginal = model.log_likelihood(torch.stack([grid, torch.full_like(grid, 123.0)], 1), missing).detach().exp()
    torch.testing.assert_close(marginal[:, 0], integral, atol=1e-7, rtol=1e-6)


def _gaussian_data(n: int, num_vars: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(4, num_vars, generator=gen)
    labels = torch.randint(0, 4, (n,), generator=gen)
    return centers[labels] + 0.5 * torch.randn(n, num_vars, generator=gen)


@pytest.mark.parametrize("depth", [1, 2])
def test_full_batch_em_never_decreases_gaussian_likelihood(depth):
    x = _gaussian_data(300, 8, seed=depth).double()
    model = RatSpn(8, depth, 3, 4, num_sums=3, seed=2, pseudo_count=0.0, min_var=1e-3).double()
    model.init_from_data(x)
    history = [float(model.log_likelihood(x).mean())]
    for _ in range(20):
        reported = model.em_update(x, step_size=1.0)["log_likelihood"]
        assert abs(reported - history[-1]) < 1e-8  # em_update reports the likelihood before its step
        history.append(float(model.log_likelihood(x).mean()))
    diffs = torch.tensor(history).diff()
    assert (diffs >= -1e-9).all(), history
    assert history[-1] > history[0] + 1.0


@pytest.mark.parametrize("depth", [1, 2])
def test_full_batch_em_never_decreases_categorical_likelihood(depth):
    gen = torch.Generator().manual_seed(depth)
    prototypes = torch.randint(0, 6, (3, 8), generator=gen)
    x = prototypes[torch.randint(0, 3, (200,), generator=gen)]
    noise = torch.rand(x.shape, generator=gen) < 0.2
    x = torch.where(noise, torch.randint(0, 6, x.shape, generator=gen), x)
    model = RatSpn(8, depth, 3, 4, num_sums=3, leaf="categorical", num_categories=6, seed=2, pseudo_count=0.0).double()
    model.init_from_data(x)
    history = [float(model.log_likelihood(x).mean())]
    for _ in range(20):
        model.em_update(x, step_size=1.0)
        history.append(float(model.log_likelihood(x).mean()))
    diffs = torch.tensor(history).diff()
    assert (diffs >= -1e-9).all(), history
    assert history[-1] > history[0] + 0.5


def test_online_em_with_small_steps_improves_and_leaves_unused_components_alone():
    x = _gaussian_data(512, 6, seed=4)
    model = RatSpn(6, 1, 2, 3, seed=0)
    model.init_from_data(x)
    before = float(model.log_likelihood(x).mean())
    with torch.no_grad():
        model.leaf_mean[0, 0, 2, :] = 1e4  # a component far from every data point: zero responsibility
    frozen = model.leaf_mean[0, 0, 2, :].clone()
    frozen_var = model.leaf_variance()[0, 0, 2, :].clone()
    for _epoch in range(10):
        for batch in x.split(64):
            model.em_update(batch, step_size=0.05)
    torch.testing.assert_close(model.leaf_mean[0, 0, 2, :].detach(), frozen)
    torch.testing.assert_close(model.leaf_variance()[0, 0, 2, :].detach(), frozen_var)
    assert float(model.log_likelihood(x).mean()) > before + 0.5


def test_paper_setting_parameter_count_and_seeding():
    model = RatSpn(64, depth=1, num_repetitions=50, num_input_distributions=45, num_roots=1, seed=11)
    assert model.num_parameters == 389_300
    assert sum(p.numel() for p in model.parameters()) == 389_300
    assert model.leaf_mean.numel() * 2 == 288_000
    assert model.log_weights[0].numel() == 101_250 and model.log_mix.numel() == 50
    same = RatSpn(64, 1, 50, 45, seed=11)
    other = RatSpn(64, 1, 50, 45, seed=12)
    for a, b in zip(model.state_dict().values(), same.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(model.permutation, other.permutation)
    assert not torch.equal(model.leaf_mean, other.leaf_mean)


def test_region_graph_is_a_balanced_random_partition_per_repetition():
    assert balanced_region_sizes(7, 2) == [2, 2, 2, 1]
    graph = random_region_graph(7, 2, 5, torch.Generator().manual_seed(0))
    for r in range(5):
        assert sorted(graph.permutation[r].tolist()) == list(range(7))
        counts = torch.bincount(graph.region_of[:, r], minlength=4)
        assert counts.tolist() == [2, 2, 2, 1]
    assert not all(torch.equal(graph.permutation[0], graph.permutation[r]) for r in range(1, 5))
    with pytest.raises(ValueError, match="too small"):
        random_region_graph(3, 2, 1, torch.Generator())


def test_init_from_data_places_gaussian_leaves_on_data_rows():
    x = _gaussian_data(100, 6, seed=9)
    model = RatSpn(6, 1, 4, 5, seed=1)
    model.init_from_data(x, seed=3)
    mean, var = model.gaussian_leaves()
    for r in range(4):
        for i in range(5):
            column = mean[:, r, i]
            assert ((x - column).abs().max(1).values < 1e-6).any()
    torch.testing.assert_close(var[:, 0, 0], x.var(0, unbiased=False), rtol=1e-5, atol=1e-6)


def test_categorical_samples_follow_the_exact_distribution():
    model = RatSpn(3, 1, 2, 2, leaf="categorical", num_categories=3, seed=4)
    states = torch.tensor(list(itertools.product(range(3), repeat=3)))
    probs = model.log_likelihood(states).detach().exp()[:, 0]
    samples = model.sample(20000, seed=0)
    assert samples.shape == (20000, 3) and samples.dtype == torch.long
    codes = samples[:, 0] * 9 + samples[:, 1] * 3 + samples[:, 2]
    freq = torch.bincount(codes, minlength=27).float() / 20000
    assert float((freq - probs).abs().sum()) / 2 < 0.03
    assert torch.equal(model.sample(50, seed=1), model.sample(50, seed=1))


def test_gaussian_conditional_sampling_and_mpe_keep_evidence():
    model = RatSpn(4, 1, 2, 3, seed=6)
    samples = model.sample(4000, seed=2)
    mean, var = model.gaussian_leaves()
    # the sample mean matches the exact mean of the mixture (mixture weights x component means)
    weights = torch.softmax(model.log_weights[0].reshape(2, -1), -1).view(2, 3, 3)
    mix = torch.softmax(model.log_mix, -1)[0]
    region = model.region_of
    exact = torch.zeros(4)
    for r in range(2):
        for a in range(3):
            for b in range(3):
                comp = torch.tensor([a if region[v, r] == 0 else b for v in range(4)])
                exact += mix[r] * weights[r, a, b] * mean[torch.arange(4), r, comp]
    torch.testing.assert_close(samples.mean(0), exact.detach(), atol=0.15, rtol=0)
    x = torch.randn(5, 4)
    missing = torch.tensor([[True, False, False, True]]).expand(5, 4)
    cond = model.sample(5, seed=3, x=x, missing=missing)
    completed = model.mpe(x, missing)
    assert torch.equal(cond[:, 1:3], x[:, 1:3]) and torch.equal(completed[:, 1:3], x[:, 1:3])
    # every MPE value of a missing variable is the mean of one of that variable's leaves
    for n in range(5):
        for v in (0, 3):
            assert (mean[v].reshape(-1) - completed[n, v]).abs().min() < 1e-6


def test_mpe_is_exact_for_a_single_product_of_leaves():
    model = RatSpn(4, 1, 1, 1, leaf="categorical", num_categories=5, seed=8)
    x = torch.zeros(3, 4, dtype=torch.long)
    missing = torch.ones(3, 4, dtype=torch.bool)
    completed = model.mpe(x, missing)
    modes = model.leaf_log_table.view(1, 4, 5, 1)[0, :, :, 0].argmax(1)
    assert torch.equal(completed, modes.expand(3, 4))
    # the MPE state is at least as likely as every other state
    states = torch.tensor(list(itertools.product(range(5), repeat=4)))
    best = model.log_likelihood(states).max()
    assert float(model.log_likelihood(completed[:1])) >= float(best) - 1e-5


def test_bad_inputs_give_clear_errors():
    model = RatSpn(4, 1, 2, 2)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        model.log_likelihood(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="step_size"):
        model.em_update(torch.zeros(3, 4), step_size=0.0)
    with pytest.raises(ValueError, match="num_categories"):
        RatSpn(4, 1, 2, 2, leaf="categorical")


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
def test_chunked_statistics_equal_one_pass(leaf):
    kwargs = {"leaf": leaf, "num_categories": 5} if leaf == "categorical" else {}
    model = RatSpn(6, 2, 2, 3, num_sums=2, seed=1, **kwargs)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (50, 6), generator=gen) if leaf == "categorical" else torch.randn(50, 6, generator=gen)
    missing = torch.rand(50, 6, generator=gen) < 0.2
    whole = model.em_statistics(x, missing, chunk_size=1024)
    chunked = model.em_statistics(x, missing, chunk_size=16)
    assert set(whole) == set(chunked)
    for key in whole:
        a, b = whole[key], chunked[key]
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_state_dict_round_trip_restores_the_same_density():
    for kwargs in ({}, {"leaf": "categorical", "num_categories": 6}):
        model = RatSpn(6, 1, 2, 3, seed=1, **kwargs)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 6, (40, 6), generator=gen) if kwargs else torch.randn(40, 6, generator=gen)
        model.init_from_data(x)
        for _ in range(3):
            model.em_update(x, step_size=0.2)
        fresh = RatSpn(6, 1, 2, 3, seed=99, **kwargs)  # another seed: structure and parameters come from the state
        fresh.load_state_dict(model.state_dict())
        assert "leaf_log_table" not in model.state_dict()
        torch.testing.assert_close(fresh.log_likelihood(x).detach(), model.log_likelihood(x).detach())


def test_chunked_categorical_em_step_equals_one_pass():
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 5, (60, 6), generator=gen)
    one, chunked = (RatSpn(6, 1, 2, 3, leaf="categorical", num_categories=5, seed=2) for _ in range(2))
    for model, size in ((one, 1024), (chunked, 16)):
        model.init_from_data(x)
        for _ in range(3):
            model.apply_statistics(model.em_statistics(x, chunk_size=size), step_size=0.3)
    assert not chunked.em_statistics(x, chunk_size=16)["leaf_table"].is_sparse
    torch.testing.assert_close(chunked.leaf_table, one.leaf_table, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked.log_likelihood(x).detach(), one.log_likelihood(x).detach(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
@pytest.mark.parametrize("with_missing", [False, True])
@pytest.mark.parametrize("num_roots", [1, 3])
def test_depth1_closed_form_statistics_equal_autograd(leaf, with_missing, num_roots):
    """The closed-form depth-1 EM statistics (and the EM step they give) equal the autograd ones."""
    import copy

    gen = torch.Generator().manual_seed(7)
    kwargs = {"leaf": "categorical", "num_categories": 6} if leaf == "categorical" else {}
    model = RatSpn(11, depth=1, num_repetitions=4, num_input_distributions=5, num_roots=num_roots, seed=3, **kwargs)
    n = 40
    if leaf == "categorical":
        x = torch.randint(0, 6, (n, 11), generator=gen)
    else:
        x = 2.0 * torch.randn(n, 11, generator=gen) + 0.5
    model.init_from_data(x)
    missing = torch.rand(n, 11, generator=gen) < 0.3 if with_missing else None
    root = torch.randint(0, num_roots, (n,), generator=gen) if num_roots > 1 else 0
    fast = model._em_statistics_depth1(x, missing, root)
    slow = model._em_statistics_autograd(x, missing, root)
    assert fast.keys() == slow.keys()
    for key in fast:
        a = fast[key].to_dense() if fast[key].is_sparse else fast[key]
        b = slow[key].to_dense() if slow[key].is_sparse else slow[key]
        assert a.shape == b.shape, key
        assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1e-12), key
    stepped = []
    for stats in (fast, slow):
        copy_ = copy.deepcopy(model)
        copy_.apply_statistics(stats, 0.5)
        stepped.append(copy_.state_dict())
    for key, value in stepped[1].items():
        other = stepped[0][key]
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(other, value), key
    # the public entry point takes the closed form at depth 1, the autograd path elsewhere
    torch.testing.assert_close(model.em_statistics(x, missing, root)["mix"], slow["mix"], rtol=1e-5, atol=1e-7)


def test_large_gaussian_batch_forward_in_blocks_equals_small_batches():
    """A batch above the forward block size (evaluated in row blocks) gives the per-row results."""
    gen = torch.Generator().manual_seed(5)
    model = RatSpn(10, depth=1, num_repetitions=3, num_input_distributions=4, seed=2)
    x = torch.randn(700, 10, generator=gen)
    missing = torch.rand(700, 10, generator=gen) < 0.2
    for mask in (None, missing):
        full = model.log_likelihood(x, mask)
        parts = torch.cat(
            [model.log_likelihood(x[s : s + 50], None if mask is None else mask[s : s + 50]) for s in range(0, 700, 50)]
        )
        assert full.shape == (700, 1)
        torch.testing.assert_close(full, parts, rtol=1e-5, atol=1e-5)
