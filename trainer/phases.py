"""The seconds of each phase of a trainer run: where the time went.

`PhaseTimes.phase(name)` times a block; a name timed twice adds up.  The
record is written under `phase_seconds` in metrics.json; the run summaries
show it in the order the phases run, with the rest of the wall time as
'other'.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

# The phases of `python -m trainer.task`, in the order they run, with what the
# summaries call them.  A run skips the phases its flags turn off.
LABELS = {
    'load': 'load shards',
    'rating_epochs': 'rating epochs',
    'refit': 'refit',
    'posterior': 'posterior',
    'topn_search': 'top-N search',
    'topn_train': 'top-N training',
    'topn_refit': 'top-N refit',
    'topn_validation': 'top-N validation',
    'export': 'export',
    'ranking': 'ranking eval',
    'eval_predictions': 'eval predictions',
}


class PhaseTimes:
    """Seconds per named phase, timed with a monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block under name (added to earlier blocks of that name)."""
        started = self._clock()
        try:
            yield
        finally:
            self.add(name, self._clock() - started)

    def add(self, name: str, seconds: float) -> None:
        """Adds seconds measured elsewhere to the phase name."""
        if name not in LABELS:
            raise ValueError(f'unknown phase {name!r}; one of {", ".join(LABELS)}')
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def record(self) -> dict[str, float]:
        """{phase: seconds} in the order the phases first ran."""
        return dict(self._seconds)


def summary_text(seconds: dict[str, float], wall_seconds: float | None = None) -> str:
    """'load shards 1.2, rating epochs 30.1, ... (other 0.4 of 35.0 s)'."""
    # In the order the phases run (metrics.json sorts its keys).
    order = [name for name in LABELS if name in seconds] + [
        name for name in seconds if name not in LABELS]
    text = ', '.join(f'{LABELS.get(name, name)} {seconds[name]:.1f}' for name in order)
    if wall_seconds is not None:
        other = max(0.0, wall_seconds - sum(seconds.values()))
        text += f' (other {other:.1f} of {wall_seconds:.1f} s)'
    return text
