"""TGI's `max_concurrent_requests` permits: try-acquire without waiting, exact counts, nothing released twice."""

from __future__ import annotations

import pytest

from loom.router.state import Permits


def test_permits_try_acquire_and_release():
    permits = Permits(3)
    assert permits.try_acquire(2) and permits.in_use == 2
    assert not permits.try_acquire(2) and permits.in_use == 2  # all-or-nothing: best_of=2 needs two at once
    assert permits.try_acquire(1) and not permits.try_acquire(1)
    permits.release(3)
    assert permits.in_use == 0 and permits.try_acquire(3)
    with pytest.raises(AssertionError):
        permits.release(4)
