"""MicroBatcher: batches form up to max_batch, results go back to their own callers, failures stay contained."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hierax.serve.batcher import MicroBatcher


def test_results_return_to_their_callers_in_bounded_batches():
    seen: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        seen.append(list(items))
        return [2 * i for i in items]

    async def main() -> list[int]:
        batcher = MicroBatcher(double, max_batch=4, max_wait_ms=60_000)
        results = await asyncio.gather(*[batcher.submit(i) for i in range(10)])
        await batcher.aclose()
        return results, batcher.stats

    results, stats = asyncio.run(main())
    assert results == [2 * i for i in range(10)]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert (stats.batches, stats.items, stats.largest, stats.mean_batch) == (3, 10, 4, 10 / 3)


def test_runs_off_the_event_loop_in_one_worker_thread():
    threads: set[int] = set()

    def record(items: list[int]) -> list[int]:
        threads.add(threading.get_ident())
        return items

    async def main() -> int:
        batcher = MicroBatcher(record, max_batch=2, max_wait_ms=0)
        for i in range(3):
            assert await batcher.submit(i) == i
        await asyncio.gather(*[batcher.submit(i) for i in range(5)])
        await batcher.aclose()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(threads) == 1 and loop_thread not in threads


def test_a_lone_item_does_not_wait_when_nothing_is_announced():
    async def main() -> int:
        batcher = MicroBatcher(lambda items: items, max_batch=64, max_wait_ms=60_000)
        result = await asyncio.wait_for(batcher.submit(7), timeout=30)
        await batcher.aclose()
        return result

    assert asyncio.run(main()) == 7


def test_a_batch_waits_for_announced_items():
    batches: list[list[int]] = []

    def record(items: list[int]) -> list[int]:
        batches.append(list(items))
        return items

    async def main() -> list[int]:
        batcher = MicroBatcher(record, max_batch=8, max_wait_ms=60_000)

        async def late(i: int) -> int:
            with batcher.expect():
                await asyncio.sleep(0.02 * i)
            return await batcher.submit(i)

        async def broken() -> None:
            with batcher.expect():
                await asyncio.sleep(0.01)

        results = await asyncio.wait_for(asyncio.gather(batcher.submit(0), late(1), late(2), broken()), 30)
        await batcher.aclose()
        return results

    assert asyncio.run(main()) == [0, 1, 2, None]
    assert batches == [[0, 1, 2]]


def test_waiting_for_announced_items_is_capped_by_max_wait():
    batches: list[list[int]] = []

    def record(items: list[int]) -> list[int]:
        batches.append(list(items))
        return items

    async def main() -> list[int]:
        batcher = MicroBatcher(record, max_batch=8, max_wait_ms=20)
        release = asyncio.Event()

        async def late() -> int:
            with batcher.expect():
                await release.wait()
            return await batcher.submit(1)

        pending = asyncio.ensure_future(late())
        await asyncio.sleep(0)
        first = await asyncio.wait_for(batcher.submit(0), 30)
        release.set()
        second = await pending
        await batcher.aclose()
        return [first, second]

    assert asyncio.run(main()) == [0, 1]
    assert batches == [[0], [1]]


def test_failures_reach_every_caller_of_the_batch_and_the_batcher_recovers():
    def fragile(items: list[int]) -> list[int]:
        if -1 in items:
            raise ValueError("bad item in batch")
        return items

    async def main():
        batcher = MicroBatcher(fragile, max_batch=3, max_wait_ms=1000)
        outcome = await asyncio.gather(*[batcher.submit(i) for i in (1, -1, 2)], return_exceptions=True)
        after = await asyncio.gather(*[batcher.submit(i) for i in (4, 5, 6)])
        await batcher.aclose()
        return outcome, after, batcher.stats

    outcome, after, stats = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in outcome)
    assert after == [4, 5, 6] and stats.failures == 1 and stats.batches == 1


def test_wrong_number_of_results_is_an_error():
    async def main():
        batcher = MicroBatcher(lambda items: items[:1], max_batch=2, max_wait_ms=1000)
        outcome = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        await batcher.aclose()
        return outcome

    outcome = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "1 results for 2 items" in str(r) for r in outcome)


def test_cancelled_callers_are_skipped():
    batches: list[list[int]] = []

    def record(items: list[int]) -> list[int]:
        batches.append(list(items))
        return items

    async def main() -> int:
        batcher = MicroBatcher(record, max_batch=8, max_wait_ms=50)
        doomed = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0)
        doomed.cancel()
        result = await batcher.submit(2)
        await batcher.aclose()
        return result

    assert asyncio.run(main()) == 2
    assert batches == [[2]]


def test_a_cancel_as_the_wait_for_announced_items_ends_stops_the_worker():
    # the last announcement ends and the loop shuts down in the same step: the worker must still stop (with
    # asyncio.wait_for on Python 3.11 it swallowed that cancel and asyncio.run never returned)
    batcher = MicroBatcher(lambda items: items, max_batch=4, max_wait_ms=60_000)

    async def main():
        with batcher.expect():
            waiting = asyncio.ensure_future(batcher.submit(1))
            await asyncio.sleep(0.05)
            waiting.cancel()

    runner = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "asyncio.run did not return: the batcher's worker ignored its cancel"


def test_close_fails_pending_and_a_new_loop_restarts_the_worker():
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    batcher = MicroBatcher(slow, max_batch=1, max_wait_ms=0)

    async def first():
        running = asyncio.ensure_future(batcher.submit(1))
        queued = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.05)
        close = asyncio.ensure_future(batcher.aclose())
        await asyncio.sleep(0.05)
        release.set()
        await close
        return await asyncio.gather(running, queued, return_exceptions=True)

    outcome = asyncio.run(first())
    assert [str(r) for r in outcome] == ["the batcher was closed"] * 2

    async def second() -> int:
        value = await batcher.submit(3)
        await batcher.aclose()
        return value

    assert asyncio.run(second()) == 3


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_batch=0)
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_wait_ms=-1)
