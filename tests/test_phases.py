"""Tests of trainer/phases.py: the seconds of each phase of a trainer run."""

from __future__ import annotations

import pytest

from trainer import phases


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_add_up_in_the_order_they_first_ran_even_when_one_raises():
    clock = FakeClock()
    times = phases.PhaseTimes(clock)
    with times.phase('load'):
        clock.now += 2.0
    with times.phase('rating_epochs'):
        clock.now += 5.0
    with pytest.raises(RuntimeError), times.phase('load'):
        clock.now += 0.5
        raise RuntimeError('stopped')
    times.add('export', 1.5)
    assert times.record() == {'load': 2.5, 'rating_epochs': 5.0, 'export': 1.5}
    shuffled = dict(sorted(times.record().items()))  # as metrics.json holds it
    assert phases.summary_text(shuffled, 10.0) == (
        'load shards 2.5, rating epochs 5.0, export 1.5 (other 1.0 of 10.0 s)')


def test_an_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="'lunch'"):
        phases.PhaseTimes().add('lunch', 1.0)
