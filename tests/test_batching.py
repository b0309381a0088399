"""trainer/serving/batching.py: which calls share a batch, and that each gets its own answer.

A planted `run` records every batch it is given and answers each call with
its own rows; a gate holds the first batch in the model thread, so the calls
submitted meanwhile are queued, deterministically, without timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from trainer.serving.batching import Batcher, Call


def recommend(*users: str, k: int = 10) -> Call:
    return Call('recommend', {'user_id': list(users)}, k)


class PlantedModel:
    """Answers each call with (signature, k, user) per row; the first batch waits for `gate`."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[list[str]]] = []
        self.started = threading.Semaphore(0)
        self.gate = threading.Event()
        self.fail_on = fail_on

    def run(self, calls: Sequence[Call]) -> list[list[Any]]:
        self.batches.append([call.columns['user_id'] for call in calls])
        self.started.release()
        self.gate.wait(timeout=60)
        if any(self.fail_on in call.columns['user_id'] for call in calls):
            raise RuntimeError(f'planted failure on {self.fail_on}')
        return [[(call.signature, call.k, user) for user in call.columns['user_id']]
                for call in calls]


async def started(model: PlantedModel) -> None:
    """Until the model thread has taken one more batch."""
    assert await asyncio.get_running_loop().run_in_executor(
        None, lambda: model.started.acquire(timeout=60))


def test_calls_queued_while_the_model_runs_share_a_batch_of_their_key():
    model = PlantedModel()

    async def scenario() -> list[Any]:
        batcher = Batcher(model.run, threads=1)
        first = asyncio.ensure_future(batcher.submit(recommend('a')))
        await started(model)  # 'a' runs alone: nothing waited for company
        queued = [asyncio.ensure_future(batcher.submit(call)) for call in [
            recommend('b', 'c'), recommend('d'), recommend('e', k=5), recommend('f'),
            Call('serving_default', {'user_id': ['g'], 'movie_id': ['m']})]]
        await asyncio.sleep(0)  # every submit has queued its call
        model.gate.set()
        return await asyncio.gather(first, *queued)

    answers = asyncio.run(scenario())
    assert model.batches == [[['a']], [['b', 'c'], ['d'], ['f']], [['e']], [['g']]]
    assert answers == [
        [('recommend', 10, 'a')], [('recommend', 10, 'b'), ('recommend', 10, 'c')],
        [('recommend', 10, 'd')], [('recommend', 5, 'e')], [('recommend', 10, 'f')],
        [('serving_default', None, 'g')]]


def test_a_batch_stops_at_max_rows_and_a_larger_call_runs_alone():
    model = PlantedModel()

    async def scenario() -> None:
        batcher = Batcher(model.run, max_rows=4, threads=1)
        first = asyncio.ensure_future(batcher.submit(recommend('a')))
        await started(model)
        queued = [asyncio.ensure_future(batcher.submit(call)) for call in [
            recommend('b', 'c'), recommend('d', 'e'), recommend('f'),
            recommend('g', 'h', 'i', 'j', 'k', 'l')]]
        await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(first, *queued)

    asyncio.run(scenario())
    assert model.batches == [[['a']], [['b', 'c'], ['d', 'e']], [['f']],
                             [['g', 'h', 'i', 'j', 'k', 'l']]]


def test_two_threads_run_two_batches_at_once():
    model = PlantedModel()

    async def scenario() -> None:
        batcher = Batcher(model.run, threads=2)
        first = asyncio.ensure_future(batcher.submit(recommend('a')))
        await started(model)
        second = asyncio.ensure_future(batcher.submit(recommend('b')))
        await started(model)  # both batches are in the model before either ends
        model.gate.set()
        await asyncio.gather(first, second)

    asyncio.run(scenario())
    assert sorted(model.batches) == [[['a']], [['b']]]


def test_a_failed_batch_fails_its_calls_only():
    model = PlantedModel(fail_on='bad')

    async def scenario() -> tuple[list[Any], list[Any]]:
        batcher = Batcher(model.run, threads=1)
        first = asyncio.ensure_future(batcher.submit(recommend('a')))
        await started(model)
        failing = [asyncio.ensure_future(batcher.submit(recommend(user))) for user in
                   ['bad', 'b']]
        other = asyncio.ensure_future(batcher.submit(recommend('c', k=3)))
        await asyncio.sleep(0)
        model.gate.set()
        return (await asyncio.gather(*failing, return_exceptions=True),
                await asyncio.gather(first, other))

    failed, answered = asyncio.run(scenario())
    assert [str(error) for error in failed] == ['planted failure on bad'] * 2
    assert answered == [[('recommend', 10, 'a')], [('recommend', 3, 'c')]]
    # The batcher goes on after a failure.
    assert model.batches[-1] == [['c']]


@pytest.mark.parametrize('columns, rows', [({'user_id': ['a', 'b']}, 2),
                                           ({'user_id': ['a'], 'movie_id': ['m']}, 1)])
def test_a_call_counts_its_rows(columns: dict[str, list[str]], rows: int):
    assert Call('recommend', columns, 10).rows == rows
