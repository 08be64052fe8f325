"""Leaf families behind one interface: composite leaves (categorical codes + Gaussian context) are exact,
a one-family composite equals the plain family, and checkpoints with the old leaf names still load."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from spn import RatSpn
from spn.leaves import CategoricalLeaves, CompositeLeaves, GaussianLeaves

SPEC = [("categorical", [0, 2, 3]), ("gaussian", [1, 4])]


def _mixed(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    x[:, [0, 2, 3]] = torch.randint(0, 3, (n, 3), generator=gen).double()
    return x


def _model(**kwargs) -> RatSpn:
    return RatSpn(5, 1, 3, 2, leaf=SPEC, num_categories=3, seed=4, **kwargs).double()


def test_composite_leaves_equal_the_explicit_mixed_density():
    model = _model()
    x = _mixed(6, 0)
    model.init_from_data(_mixed(50, 1))
    cat, gauss = model.leaves.families["categorical"], model.leaves.families["gaussian"]
    assert isinstance(model.leaves, CompositeLeaves) and isinstance(cat, CategoricalLeaves) and isinstance(gauss, GaussianLeaves)
    mean, var = gauss.per_variable()  # (2, R, I)

    def leaf(v: int, r: int, i: int) -> torch.Tensor:
        if v in (0, 2, 3):
            return cat.log_probs(r, [0, 2, 3].index(v))[x[:, v].long(), i]
        g = [1, 4].index(v)
        return -0.5 * (x[:, v] - mean[g, r, i]) ** 2 / var[g, r, i] - 0.5 * torch.log(2 * math.pi * var[g, r, i])

    total = torch.zeros(6, dtype=torch.float64)
    mix = torch.softmax(model.log_mix, -1)[0]
    w = torch.softmax(model.log_weights[0].reshape(3, 1, 1, -1), -1).view(3, 2, 2)
    terms = []
    for r, a, b in itertools.product(range(3), range(2), range(2)):
        lp = sum(leaf(v, r, (a, b)[int(model.region_of[v, r])]) for v in range(5))
        terms.append(torch.log(mix[r] * w[r, a, b]) + lp)
    total = torch.logsumexp(torch.stack(terms), 0)
    torch.testing.assert_close(model.log_likelihood(x)[:, 0].detach(), total.detach(), atol=1e-10, rtol=0)
    assert model.num_parameters == 3 * 2 * 2 + 3 + cat.table.numel() + 2 * 2 * 3 * 2


def test_composite_marginal_is_the_sum_over_the_codes_and_conditional_normalises():
    """log p(context) from marginalising the codes = log sum_z p(z, context): p(z | context) sums to one."""
    model = _model()
    model.init_from_data(_mixed(50, 2))
    for _ in range(3):
        model.em_update(_mixed(64, 3), step_size=0.5)
    context = _mixed(4, 5)
    missing = torch.zeros(4, 5, dtype=torch.bool)
    missing[:, [0, 2, 3]] = True
    marginal = model.log_likelihood(context, missing)[:, 0]
    joint = []
    for codes in itertools.product(range(3), repeat=3):
        x = context.clone()
        x[:, [0, 2, 3]] = torch.tensor(codes, dtype=torch.float64)
        joint.append(model.log_likelihood(x)[:, 0])
    joint = torch.stack(joint)
    # 1e-6: the data initialisation builds each categorical table in float32 (sums to 1 within ~1e-7)
    torch.testing.assert_close(torch.logsumexp(joint, 0).detach(), marginal.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.logsumexp(joint - marginal, 0).exp().detach(), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert float((joint - marginal).exp().max().detach()) < 0.9  # the codes are not uniform given the context: a real check


def test_full_batch_em_never_decreases_composite_likelihood_and_keeps_evidence():
    model = _model(pseudo_count=0.0)
    x = _mixed(200, 6)
    model.init_from_data(x)
    history = []
    for _ in range(8):
        history.append(model.em_update(x, step_size=1.0)["log_likelihood"])
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:])), history
    assert history[-1] > history[0] + 0.05
    missing = torch.zeros(10, 5, dtype=torch.bool)
    missing[:, 0] = missing[:, 4] = True
    for filled in (model.mpe(x[:10], missing), model.sample(10, seed=1, x=x[:10], missing=missing)):
        torch.testing.assert_close(filled[~missing], x[:10][~missing])
        assert set(filled[:, 0].tolist()) <= {0.0, 1.0, 2.0}
    unconditional = model.sample(20, seed=2)
    assert unconditional.shape == (20, 5) and set(unconditional[:, [0, 2, 3]].flatten().tolist()) <= {0.0, 1.0, 2.0}


@pytest.mark.parametrize("family", ["gaussian", "categorical"])
def test_one_family_composite_gives_the_plain_family_bit_for_bit(family):
    kwargs = {"num_categories": 4} if family == "categorical" else {}
    plain = RatSpn(7, 1, 3, 4, leaf=family, seed=2, **kwargs)
    wrapped = RatSpn(7, 1, 3, 4, leaf=[(family, range(7))], seed=2, **kwargs)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (64, 7), generator=gen) if family == "categorical" else torch.randn(64, 7, generator=gen)
    missing = torch.rand(64, 7, generator=gen) < 0.3
    for model in (plain, wrapped):
        model.init_from_data(x)
        model.em_update(x, step_size=0.3)
        model.em_update(x, step_size=0.3, missing=missing)
    assert torch.equal(plain.log_likelihood(x), wrapped.log_likelihood(x))
    assert torch.equal(plain.log_likelihood(x, missing), wrapped.log_likelihood(x, missing))


def test_composite_specification_must_partition_the_variables():
    with pytest.raises(ValueError, match="exactly one family"):
        RatSpn(5, 1, 2, 2, leaf=[("categorical", [0, 1, 2]), ("gaussian", [2, 3, 4])], num_categories=3)
    with pytest.raises(ValueError, match="exactly one family"):
        RatSpn(5, 1, 2, 2, leaf=[("gaussian", [0, 1])])
    with pytest.raises(ValueError, match="leaf must be"):
        RatSpn(5, 1, 2, 2, leaf=[("poisson", range(5))])


@pytest.mark.parametrize("family", ["gaussian", "categorical"])
def test_state_dict_with_the_old_leaf_names_loads_and_gives_the_same_density(family):
    """A checkpoint from before spn.leaves (``leaf_mean``, ``slot_var``, ``table_base``, ...) loads, also
    into a model built with another seed (the region graph comes from the checkpoint)."""
    kwargs = {"leaf": "categorical", "num_categories": 5} if family == "categorical" else {}
    model = RatSpn(7, 1, 3, 4, seed=1, **kwargs)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40, 7), generator=gen) if kwargs else torch.randn(40, 7, generator=gen)
    model.init_from_data(x)
    model.em_update(x, step_size=0.3)
    old = {}
    for key, value in model.state_dict().items():
        old[key.replace("leaves.", "leaf_") if key.startswith("leaves.") else key] = value
    if family == "gaussian":
        old.update(slot_var=model.slot_var, slot_of=model.slot_of, slot_valid=model.slot_valid, feature_rows=model.leaves.feature_rows)
    else:
        old["table_base"] = torch.zeros(3, 7, dtype=torch.long)
    assert ("leaf_mean" in old) == (family == "gaussian") and "leaves.mean" not in old
    fresh = RatSpn(7, 1, 3, 4, seed=8, **kwargs)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.log_likelihood(x), model.log_likelihood(x))
    assert torch.equal(fresh.leaves.slot_var, model.leaves.slot_var)


def test_composite_state_dict_loads_into_a_model_of_another_seed():
    """Parameter shapes of a family on a variable subset do not depend on the seed's region graph."""
    model = _model()
    x = _mixed(60, 7)
    model.init_from_data(x)
    model.em_update(x, step_size=0.3)
    other = RatSpn(5, 1, 3, 2, leaf=SPEC, num_categories=3, seed=11).double()
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.log_likelihood(x), model.log_likelihood(x))
