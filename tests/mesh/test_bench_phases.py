"""`exegpt bench adapt --phases`: pure parts."""

from optimizer.verify import outstanding
from services.bench.phases import calibration_counts
from services.bench.schedules import calibration_schedules


def test_a_quick_calibration_run_still_refills_each_closed_loop_once():
    """A closed loop sent once drains without ever admitting a prompt beside running decodes: a
    calibration run needs a second wave for the fused prefill-and-decode steps of open-loop
    traffic, quick or not."""
    for quick in (True, False):
        counts = calibration_counts(calibration_schedules(32), quick)
        assert all(n >= 2 * outstanding(s) for s, n in counts.items()), counts
