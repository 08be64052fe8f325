"""spn.em_schedule: the online-EM step over a run, against its closed form and the convergence conditions."""

from __future__ import annotations

import math

import pytest

from spn import em_step_size


def test_constant_without_decay_is_the_paper_step():
    assert [em_step_size(1e-4, t) for t in (0, 1, 10_000)] == [1e-4] * 3


@pytest.mark.parametrize("power", [0.6, 0.75, 1.0])
def test_decay_matches_the_closed_form_and_shrinks_monotonically(power):
    steps = [em_step_size(0.1, t, 500.0, power) for t in range(0, 20_000, 250)]
    assert steps[0] == 0.1
    for t, value in zip(range(0, 20_000, 250), steps):
        assert value == pytest.approx(0.1 / (1 + t / 500) ** power, rel=1e-12)
    assert all(a > b for a, b in zip(steps, steps[1:]))
    # one decay constant in: the step has shrunk by 2 ** -power
    assert em_step_size(0.1, 500, 500.0, power) == pytest.approx(0.1 * 2 ** -power)


def test_robbins_monro_conditions_hold_numerically_for_the_allowed_powers():
    """Over each tenfold stretch of steps [n, 10 n) the steps add up to no less (sum eta_t diverges: EM never
    freezes), while their squares add up to less and less (sum eta_t^2 converges: the batch noise dies out)."""
    def stretch(power: float, n: int, exponent: int) -> float:
        return math.fsum(em_step_size(0.1, t, 10.0, power) ** exponent for t in range(n, 10 * n))

    for power in (0.6, 0.75, 1.0):
        assert stretch(power, 10_000, 1) >= 0.99 * stretch(power, 1_000, 1)
        assert stretch(power, 10_000, 2) < 0.7 * stretch(power, 1_000, 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"step_size": 0.0, "step": 0}, "step_size"),
    ({"step_size": 1.5, "step": 0}, "step_size"),
    ({"step_size": 0.1, "step": -1}, "step must"),
    ({"step_size": 0.1, "step": 5, "decay_steps": 10.0, "power": 0.5}, "power"),
    ({"step_size": 0.1, "step": 5, "decay_steps": 10.0, "power": 1.2}, "power"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        em_step_size(**kwargs)
