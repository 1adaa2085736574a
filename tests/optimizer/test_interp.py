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


def test_noise_rule_raises_a_dip_to_the_point_before_and_reports_only_big_ones():
    from optimizer.interp import smooth_points

    out = smooth_points({1: 1.0, 2: 0.95, 4: 2.0, 8: 1.0, 16: 3.0}, tolerance=0.1)
    assert out.points == {1: 1.0, 2: 1.0, 4: 2.0, 8: 2.0, 16: 3.0}
    assert [(d.at, d.above) for d in out.drops] == [(8, 4)]  # 2 -> 0.95 is within the 10 % tolerance
    assert out.drops[0].fraction == pytest.approx(0.5)


def test_noise_rule_floor_ignores_tiny_absolute_dips():
    from optimizer.interp import smooth_points

    assert smooth_points({1: 0.010, 2: 0.005}, tolerance=0.1, floor=0.01).drops == ()
    assert len(smooth_points({1: 0.010, 2: 0.005}, tolerance=0.1).drops) == 1


def test_noise_rule_smooths_tables_along_rows_and_columns():
    from optimizer.interp import smooth_points

    raw = {(1, 10): 1.0, (1, 20): 0.5, (2, 10): 0.8, (2, 20): 3.0, (4, 20): 2.0}
    out = smooth_points(raw, tolerance=0.1)
    p = out.points
    assert p[(1, 20)] == 1.0 and p[(2, 10)] == 1.0 and p[(4, 20)] == 3.0
    for rows in ([(1, 10), (1, 20)], [(2, 10), (2, 20)], [(1, 10), (2, 10)], [(1, 20), (2, 20), (4, 20)]):
        assert all(p[a] <= p[b] for a, b in zip(rows, rows[1:]))
    assert {(d.at, d.above) for d in out.drops} == {((1, 20), (1, 10)), ((2, 10), (1, 10)), ((4, 20), (2, 20))}
    assert smooth_points(p, tolerance=0.1).drops == ()  # idempotent: smoothed tables raise no warning


def test_grid_extrapolates_along_the_batch_where_a_row_stops_short():
    # attention-like: linear in batch, quadratic in length; the batch-4 row skips its big cell
    pts = {(b, s): b * s * s / 1e4 for b in (1, 2) for s in (100, 200, 400)}
    pts.update({(4, 100): 4.0, (4, 200): 16.0})
    grid = MonotoneGrid.from_points(pts)
    assert grid(4, 400) == pytest.approx(4 * 16.0)  # from rows 1 and 2 at s=400, linear in the batch
    assert grid(4, 200) == pytest.approx(16.0)  # within its reach the row's own measurement counts


def _pointwise(grid, rows, col):
    """The grid at each row alone, through the general path (a column that is not one value)."""
    return np.array([grid(np.array([r, r]), np.array([col, col * (1 + 1e-15) + 1e-300]))[0] for r in rows])


@pytest.mark.parametrize("col", [0.5, 100.0, 150.0, 200.0, 300.0, 400.0, 900.0])
def test_a_grid_at_one_length_equals_the_general_path_on_ragged_rows(col):
    """The search asks many batches at one length; that path (cached per length, each group of
    rows measured at the same lengths interpolated at once) gives the general path's values."""
    pts = {(b, s): b * s * s / 1e4 + s / 10 for b in (1, 2, 8) for s in (100, 200, 400)}
    pts.update({(16, 100): 30.0, (16, 200): 95.0, (32, 50): 40.0})  # rows that stop short, one starts early
    grid = MonotoneGrid.from_points(pts)
    rows = np.array([1e-9, 0.5, 1, 1.5, 2, 5, 8, 12, 16, 24, 32, 40, 100])
    expected = _pointwise(grid, rows, col)
    assert grid(rows, col) == pytest.approx(expected, rel=1e-12)
    assert grid(rows, col) == pytest.approx(expected, rel=1e-12)  # again, from the cache
    assert grid(rows, np.full(len(rows), col)) == pytest.approx(expected, rel=1e-12)
    assert grid(5.0, col) == pytest.approx(expected[5], rel=1e-12) and isinstance(grid(5.0, col), float)
