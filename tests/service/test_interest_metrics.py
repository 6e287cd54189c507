"""Interest signals in /metrics: routing concentration, items per interest slot, coverage."""

import numpy as np
import pytest

from service.signals import CoverageWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_coverage_window_counts_distinct_rows_and_rotates():
    clock = Clock()
    window = CoverageWindow(60, clock=clock)
    window.reset(11)  # rows 1..10 are items
    window.add(np.array([1, 2, 2, 3, 0]))  # padding row 0 is not an item
    window.add(np.array([3, 4]))
    assert window.current() == 4 and window.last() is None
    assert window.coverage() == pytest.approx(0.4)  # no window has ended: the current one
    clock.now += 61
    window.add(np.array([5]))
    assert window.last() == 4 and window.current() == 1
    assert window.coverage() == pytest.approx(0.4)
    clock.now += 60
    assert window.last() == 1 and window.current() == 0
    clock.now += 500  # a silent stretch: the last complete window saw nothing
    assert window.last() == 0
    window.add(np.array([99, -1]))  # rows outside the catalogue are ignored, never an error
    assert window.current() == 0
    window.reset(5)
    assert window.current() == 0 and window.last() is None
