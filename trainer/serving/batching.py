"""Server-side batching: the model calls of concurrent requests, run together.

Owns how the prediction server (`trainer.serving`) shares model calls between
requests.  Each request becomes a `Call` (a signature, its k, and its inputs
as id columns); a `Batcher` on the server's event loop queues the calls and
hands them to a few model threads, each batch one signature call over the
rows of every call in it.  Calls are batched only with calls of the same key
(signature and k), in arrival order, up to `MAX_BATCH_ROWS` rows (a larger
call runs alone); a lone call runs at once, never held back to wait for
company.  Nothing here knows TensorFlow or HTTP: `run` is given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Rows per batch.  A `recommend` call costs about 0.4 ms for one user and
# 50-65 us a user from 32 users on (2 cores): bigger batches gain nothing,
# and smaller ones let the model threads take turns.
MAX_BATCH_ROWS = 256
# Batches in flight: while one runs in TensorFlow, which releases the GIL,
# the other turns its outputs into lists.
MODEL_THREADS = 2


@dataclasses.dataclass(frozen=True)
class Call:
    """One request's signature call: its inputs as id columns, one row per instance.

    Calls with the same `key` (signature and k) can share one signature call.
    """
    signature: str
    columns: Mapping[str, list[str]]
    k: int | None = None

    @property
    def key(self) -> tuple[str, int | None]:
        return self.signature, self.k

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values())))


Run = Callable[[Sequence[Call]], list[list[Any]]]


class Batcher:
    """Runs the calls of concurrent requests together, a few batches at a time.

    `submit` queues a call; whenever one of `threads` model threads is free,
    the oldest queued call and the queued calls with its key (up to
    `max_rows` rows) go to it as one batch: `run(calls)` returns each call's
    predictions.  Calls queued meanwhile wait for the next free thread.  If
    `run` raises, every call of that batch gets the error.
    """

    def __init__(self, run: Run, max_rows: int = MAX_BATCH_ROWS,
                 threads: int = MODEL_THREADS) -> None:
        self._run = run
        self._max_rows = max_rows
        self._threads = threads
        self._queue: list[tuple[Call, asyncio.Future]] = []
        # Counted in the drain itself, so a call queued as a drain ends is never
        # left without one; the tasks are held so none is collected mid-run.
        self._running = 0
        self._drains: set[asyncio.Task] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix='model')

    async def submit(self, call: Call) -> list[Any]:
        """The call's predictions, computed in a batch with its neighbours."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((call, future))
        if self._running < self._threads:
            self._running += 1
            task = loop.create_task(self._drain())
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        return await future

    def _next_batch(self) -> list[tuple[Call, asyncio.Future]]:
        key = self._queue[0][0].key
        batch, rest, rows = [], [], 0
        for item in self._queue:
            if item[0].key == key and (not batch or rows + item[0].rows <= self._max_rows):
                batch.append(item)
                rows += item[0].rows
            else:
                rest.append(item)
        self._queue = rest
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = self._next_batch()
                try:
                    results: list[Any] = await loop.run_in_executor(
                        self._pool, self._run, [call for call, _ in batch])
                    if len(results) != len(batch):
                        raise ValueError(f'run gave {len(results)} results for '
                                         f'{len(batch)} calls')
                except Exception as error:  # pylint: disable=broad-except
                    # Handed to each waiting request, which answers 500 and logs it.
                    results = [error] * len(batch)
                for (_, future), result in zip(batch, results):
                    if future.done():  # the request was cancelled
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._running -= 1
