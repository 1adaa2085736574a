import numpy as np
import pytest

from optimizer.interp import MonotoneCurve, MonotoneGrid


def test_curve_is_exact_on_points_and_linear_between():
    curve = MonotoneCurve.from_points({1: 1.0, 3: 5.0, 7: 6.0})
    assert curve(3) == 5.0
    assert curve(2) == pytest.approx(3.0)
    assert curve(5) == pytest.approx(5.5)


def test_curve_clamps_below_and_extrapolates_with_last_slope():
    curve = MonotoneCurve.from_points({2: 1.0, 4: 2.0})
    assert curve(0.5) == 1.0
    assert curve(8) == pytest.approx(4.0)


def test_curve_forces_measured_noise_to_be_non_decreasing():
    curve = MonotoneCurve.from_points({1: 2.0, 2: 1.5, 3: 3.0})
    xs = np.linspace(0, 10, 101)
    assert np.all(np.diff(curve(xs)) >= 0)


def test_grid_interpolates_along_both_axes_over_ragged_rows():
    grid = MonotoneGrid.from_points({(1, 10): 1.0, (1, 20): 2.0, (3, 10): 3.0})  # row 3 lacks col 20
    assert grid(2, 10) == pytest.approx(2.0)
    assert grid(1, 15) == pytest.approx(1.5)
    assert grid(3, 20) >= grid(1, 20)  # rows kept monotone even where one is extrapolated


def test_grid_evaluates_arrays_of_any_shape():
    grid = MonotoneGrid.from_points({(1, 1): 1.0, (2, 1): 2.0, (1, 2): 2.0, (2, 2): 3.0})
    out = grid(np.array([[1.0], [2.0]]), np.array([[1.0, 2.0]]))
    assert out.shape == (2, 2)
    assert out.tolist() == [[1.0, 2.0], [2.0, 3.0]]


@pytest.mark.parametrize("xs", [(), (2, 1)])
def test_bad_curves_rejected(xs):
    with pytest.raises(ValueError):
        MonotoneCurve(tuple(xs), tuple(1.0 for _ in xs))
