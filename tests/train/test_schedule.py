"""Learning-rate schedules against values worked out by hand."""

import math

import pytest

from cptfast.training.schedule import lr_at


def test_warmup_rises_linearly_from_the_first_step():
    values = [lr_at(s, lr=1.0, steps=100, warmup_steps=4) for s in range(4)]
    assert values == [0.25, 0.5, 0.75, 1.0]


def test_cosine_goes_from_peak_to_floor():
    common = dict(lr=2.0, steps=11, kind="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert lr_at(0, **common) == pytest.approx(2.0)
    assert lr_at(5, **common) == pytest.approx(0.2 + 1.8 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_at(10, **common) == pytest.approx(0.2)
    values = [lr_at(s, **common) for s in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_decays_after_warmup():
    common = dict(lr=1.0, steps=13, kind="linear", warmup_steps=2, min_lr_ratio=0.0)
    assert lr_at(1, **common) == 1.0          # end of warmup
    assert lr_at(2, **common) == 1.0          # decay starts at the peak ...
    assert lr_at(7, **common) == pytest.approx(0.5)   # ... (7 - 2) / (12 - 2) of the way ...
    assert lr_at(12, **common) == 0.0         # ... and ends at the floor on the last step


@pytest.mark.parametrize("shape,remaining", [("linear", lambda p: 1 - p),
                                              ("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2),
                                              ("1-sqrt", lambda p: 1 - math.sqrt(p))])
def test_wsd_is_flat_then_decays_over_the_final_fraction(shape, remaining):
    common = dict(lr=1.0, steps=100, kind="wsd", warmup_steps=10, min_lr_ratio=0.1,
                  decay_fraction=0.2, decay_shape=shape)
    assert [lr_at(s, **common) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    for step in (80, 85, 90, 99):  # decay from step 80 to the last step, 99
        progress = (step - 80) / 19
        assert lr_at(step, **common) == pytest.approx(0.1 + 0.9 * remaining(progress))
    assert lr_at(99, **common) == pytest.approx(0.1)


def test_constant_stays_at_the_peak():
    assert {lr_at(s, lr=3e-4, steps=50, kind="constant", warmup_steps=5)
            for s in range(5, 50)} == {3e-4}


def test_steps_outside_the_run_and_unknown_kinds_are_errors():
    with pytest.raises(ValueError, match="outside the run"):
        lr_at(10, lr=1.0, steps=10)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        lr_at(3, lr=1.0, steps=10, kind="exp")
