"""The batcher's pure parts: grouping, splitting, deadlines. No threads, no event loop, no HTTP."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest

from openmaas.errors import BatchMismatch
from openmaas.runtimes.base import RuntimeResult
from openmaas.serving.batcher import (
    Pending,
    balance_wait,
    compat_key,
    concat_inputs,
    drop_expired,
    fair_share,
    split_result,
    take_batch,
)


def item(
    rows: int = 1, cost: int | None = None, width: int = 4, deadline: float | None = None, t: float = 0.0
) -> Pending:
    inputs = {"x": np.full((rows, width), float(rows), np.float32)}
    return Pending(inputs, rows, rows if cost is None else cost, t, deadline, None, compat_key(inputs))


@pytest.mark.parametrize(
    ("rows", "max_rows", "expected"),
    [
        ([1] * 10, 4, [4, 4, 2]),
        ([1] * 3, 64, [3]),
        ([3, 3, 3], 6, [6, 3]),
        ([5, 1, 1], 4, [5, 2]),  # an oversized request runs alone, the rest batch behind it
        ([2, 3, 1], 4, [3, 3]),  # 3 does not fit beside 2: 1 joins instead, 3 keeps its turn
        ([1], 1, [1]),
    ],
)
def test_take_batch_respects_max_rows(rows: list[int], max_rows: int, expected: list[int]) -> None:
    queue = deque(item(r) for r in rows)
    sizes = []
    while queue:
        sizes.append(sum(p.rows for p in take_batch(queue, max_rows, 10**9)))
    assert sizes == expected


def test_take_batch_keeps_order_of_what_it_leaves() -> None:
    a, b, c, d = item(2), item(3), item(1), item(3)
    queue = deque([a, b, c, d])
    assert take_batch(queue, 4, 10**9) == [a, c]
    assert list(queue) == [b, d]


def test_take_batch_respects_token_budget() -> None:
    queue = deque([item(1, cost=100), item(1, cost=100), item(1, cost=100)])
    assert len(take_batch(queue, 64, 250)) == 2
    assert len(take_batch(queue, 64, 250)) == 1


def test_incompatible_shapes_are_not_batched_together() -> None:
    queue = deque([item(1, width=4), item(1, width=5), item(1, width=4)])
    first = take_batch(queue, 64, 10**9)
    assert [p.inputs["x"].shape[1] for p in first] == [4, 4]
    assert [p.inputs["x"].shape[1] for p in take_batch(queue, 64, 10**9)] == [5]


def test_cancelled_requests_are_skipped() -> None:
    a, b, c = item(), item(), item()
    b.cancelled = True
    queue = deque([a, b, c])
    assert take_batch(queue, 64, 10**9) == [a, c]


def test_drop_expired() -> None:
    keep, late, no_deadline, gone = item(deadline=10.0), item(deadline=4.0), item(), item(deadline=1.0)
    gone.cancelled = True
    queue = deque([keep, late, no_deadline, gone])
    assert drop_expired(queue, now=5.0) == [late]
    assert list(queue) == [keep, no_deadline]
    assert drop_expired(queue, now=5.0) == []


def test_concat_and_split_round_trip() -> None:
    batch = [item(1), item(3), item(2)]
    inputs = concat_inputs(batch)
    assert inputs["x"].shape == (6, 4)
    result = RuntimeResult(outputs={"y": inputs["x"][:, 0] * 2}, tokens=np.arange(6))
    parts = split_result(result, [p.rows for p in batch])
    assert [p.outputs["y"].tolist() for p in parts] == [[2.0], [6.0, 6.0, 6.0], [4.0, 4.0]]
    assert [p.tokens.tolist() for p in parts if p.tokens is not None] == [[0], [1, 2, 3], [4, 5]]


@pytest.mark.parametrize(
    "outputs",
    [
        {"y": np.zeros(5)},  # one row short
        {"y": np.zeros(7)},  # one row too many
        {"y": np.zeros(6), "z": np.zeros(4)},  # one output of several
        {"y": np.float32(1.0).reshape(())},  # a scalar
    ],
)
def test_wrong_output_count_is_a_server_error(outputs: dict) -> None:
    with pytest.raises(BatchMismatch) as info:
        split_result(RuntimeResult(outputs=outputs), [1, 3, 2])
    assert info.value.status == 500


def test_wrong_token_count_is_a_server_error() -> None:
    with pytest.raises(BatchMismatch):
        split_result(RuntimeResult(outputs={"y": np.zeros(3)}, tokens=np.zeros(2)), [1, 2])


@pytest.mark.parametrize(
    ("queued", "running", "copies", "max_rows", "share"),
    [
        (1, 0, 2, 64, 1),  # a single request: it goes at once, alone
        (60, 0, 2, 64, 30),  # both copies free: the queue is split between them
        (40, 24, 2, 64, 32),  # one copy busy with 24: the free one takes an equal part of all the work
        (3, 61, 2, 64, 32),  # the share may exceed what is queued: then balance_wait says whether to wait
        (500, 0, 2, 64, 64),  # never more than max_rows
        (7, 0, 1, 64, 7),  # one copy takes everything it may
        (0, 5, 4, 64, 2),
    ],
)
def test_fair_share_splits_the_work_evenly(queued: int, running: int, copies: int, max_rows: int, share: int) -> None:
    assert fair_share(queued, running, copies, max_rows) == share


def test_balance_wait_waits_only_while_other_copies_are_busy_and_the_share_is_short() -> None:
    # C=1 (nothing else running): never wait.
    assert balance_wait(1, 0, 2, 64, 0.0, 0.003) == 0.0
    # One copy runs 32 rows; 5 have come back so far: wait the rest of the 3 ms for the others.
    assert balance_wait(5, 32, 2, 64, 0.001, 0.003) == pytest.approx(0.002)
    # Once the head has waited the limit, go with what there is.
    assert balance_wait(5, 32, 2, 64, 0.004, 0.003) == 0.0
    # The share is there: go.
    assert balance_wait(32, 32, 2, 64, 0.0, 0.003) == 0.0
    assert balance_wait(64, 200, 2, 64, 0.0, 0.003) == 0.0  # a full batch never waits
    # Waiting switched off, or a single copy (nobody to balance with): never wait.
    assert balance_wait(5, 32, 2, 64, 0.0, 0.0) == 0.0
    assert balance_wait(5, 32, 1, 64, 0.0, 0.003) == 0.0
    assert balance_wait(0, 32, 2, 64, 0.0, 0.003) == 0.0


def test_an_online_request_runs_before_every_queued_batch_line() -> None:
    """With hundreds of batch rows queued, an online request waits for the step that is running only."""
    import asyncio

    from openmaas.serving.batcher import BatchConfig, Batcher
    from openmaas.telemetry import Metrics

    steps: list[list[float]] = []
    gate = asyncio.Event()

    async def worker(inputs: dict[str, np.ndarray], spare: bool) -> RuntimeResult:
        steps.append(inputs["x"][:, 0].tolist())
        await gate.wait()
        gate.clear()
        return RuntimeResult(outputs={"y": inputs["x"]})

    async def scenario() -> None:
        batcher = Batcher("m:1", [worker], BatchConfig(max_batch_size=8), Metrics())
        batcher.start()
        lines = [
            asyncio.ensure_future(batcher.submit({"x": np.full((1, 1), 1.0, np.float32)}, 1, 1, None, priority=1))
            for _ in range(40)
        ]
        await asyncio.sleep(0.01)
        assert len(steps) == 1 and steps[0] == [1.0] * 8  # batch lines run in full steps when nothing else waits
        assert batcher.low_depth == 32
        online = asyncio.ensure_future(batcher.submit({"x": np.full((1, 1), 2.0, np.float32)}, 1, 1, None))
        await asyncio.sleep(0.01)
        gate.set()  # the running step ends: the next one carries the online request
        await asyncio.sleep(0.01)
        assert len(steps) == 2 and 2.0 in steps[1], steps
        gate.set()
        result = await asyncio.wait_for(online, 1)
        assert result.outputs["y"][0, 0] == 2.0
        while not all(f.done() for f in lines):
            gate.set()
            await asyncio.sleep(0.001)
        await batcher.stop()

    asyncio.run(scenario())


def test_while_online_traffic_is_about_batch_lines_leave_a_copy_free_and_take_short_steps() -> None:
    import asyncio

    from openmaas.serving.batcher import BatchConfig, Batcher
    from openmaas.telemetry import Metrics

    steps: list[tuple[int, int]] = []
    gates = [asyncio.Event(), asyncio.Event()]

    def worker(k: int):  # type: ignore[no-untyped-def]
        async def run(inputs: dict[str, np.ndarray], spare: bool) -> RuntimeResult:
            steps.append((k, len(inputs["x"])))
            await gates[k].wait()
            gates[k].clear()
            return RuntimeResult(outputs={"y": inputs["x"]})

        return run

    async def scenario() -> None:
        batcher = Batcher("m:1", [worker(0), worker(1)], BatchConfig(max_batch_size=64), Metrics())
        batcher.start()

        def submit(priority: int) -> asyncio.Future[RuntimeResult]:
            return asyncio.ensure_future(
                batcher.submit({"x": np.zeros((1, 1), np.float32)}, 1, 1, None, priority=priority)
            )

        online = submit(0)
        await asyncio.sleep(0.01)
        gates[steps[-1][0]].set()
        await online  # online traffic was just seen
        lines = [submit(1) for _ in range(100)]
        await asyncio.sleep(0.01)
        assert len(steps) == 2 and steps[1][1] == 8, steps  # one copy, a short step; the other copy stays free
        second = submit(0)
        await asyncio.sleep(0.01)
        assert len(steps) == 3 and steps[2] == (1 - steps[1][0], 1), steps  # on the free copy at once
        gates[steps[2][0]].set()
        await second
        for gate in gates:
            gate.set()
        await asyncio.sleep(0.6)  # online traffic has gone quiet: full steps on every copy
        while not all(f.done() for f in lines):
            for gate in gates:
                gate.set()
            await asyncio.sleep(0.001)
        assert max(rows for _, rows in steps) > 8
        await batcher.stop()

    asyncio.run(scenario())


def test_a_batch_gets_every_core_only_when_the_model_has_been_alone_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two clients in a closed loop rarely overlap when a batch is taken, but the other's request arrives while it
    runs: a copy with every core beside another with one made both slower."""
    import asyncio

    from openmaas.serving import batcher as module
    from openmaas.serving.batcher import BatchConfig, Batcher
    from openmaas.telemetry import Metrics

    monkeypatch.setattr(module, "CROWD_MEMORY_S", 0.2)
    spare_flags: list[bool] = []

    async def worker(inputs: dict[str, np.ndarray], spare: bool) -> RuntimeResult:
        spare_flags.append(spare)
        await asyncio.sleep(0.02)
        return RuntimeResult(outputs={"y": inputs["x"]})

    async def scenario() -> None:
        batcher = Batcher("m:1", [worker, worker], BatchConfig(max_batch_size=8), Metrics())
        batcher.start()

        def one() -> Coroutine[Any, Any, RuntimeResult]:
            return batcher.submit({"x": np.zeros((1, 1), np.float32)}, 1, 1, None)

        await one()  # alone: every core
        first = asyncio.ensure_future(one())
        await asyncio.sleep(0.005)
        await asyncio.gather(first, one())  # the second arrives while the first runs: one core
        await one()  # alone again, but the model was crowded a moment ago: still one core
        await asyncio.sleep(0.25)
        await one()  # alone for longer than the memory: every core again
        await batcher.stop()

    asyncio.run(scenario())
    assert spare_flags == [True, True, False, False, True], spare_flags


def test_a_request_to_an_idle_model_starts_without_a_turn_of_the_dispatch_loop() -> None:
    """At low load the dispatch loop's turn and its wake-up were a part of every request's time on the event loop:
    a request that finds the model idle starts from ``submit`` itself; requests that arrive while its copy is busy
    queue and go together, in order; one whose deadline has passed fails as it would in the queue."""
    import asyncio

    from openmaas.errors import DeadlineExceeded
    from openmaas.serving.batcher import BatchConfig, Batcher
    from openmaas.telemetry import Metrics

    started: list[float] = []
    gate = asyncio.Event()

    async def worker(inputs: dict[str, np.ndarray], spare: bool) -> RuntimeResult:
        started.extend(inputs["x"][:, 0].tolist())
        await gate.wait()
        return RuntimeResult(outputs={"y": inputs["x"]})

    def x(value: float) -> dict[str, np.ndarray]:
        return {"x": np.full((1, 1), value, np.float32)}

    async def scenario() -> None:
        batcher = Batcher("m:1", [worker], BatchConfig(max_batch_size=8), Metrics())
        batcher.start()
        await asyncio.sleep(0)
        first = asyncio.ensure_future(batcher.submit(x(1.0), 1, 1, None))
        await asyncio.sleep(0)  # submit ran and started the batch's task
        await asyncio.sleep(0)  # the batch's task called the copy
        assert started == [1.0]
        # The copy is busy: these two queue and go together, in order, when it frees.
        second = asyncio.ensure_future(batcher.submit(x(2.0), 1, 1, None))
        third = asyncio.ensure_future(batcher.submit(x(3.0), 1, 1, None))
        await asyncio.sleep(0.01)
        assert started == [1.0] and batcher.depth == 2
        gate.set()
        assert (await asyncio.wait_for(first, 1)).outputs["y"][0, 0] == 1.0
        results = await asyncio.wait_for(asyncio.gather(second, third), 1)
        assert [r.outputs["y"][0, 0] for r in results] == [2.0, 3.0] and started == [1.0, 2.0, 3.0]
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(x(4.0), 1, 1, time.monotonic() - 1)
        assert started == [1.0, 2.0, 3.0] and batcher.stats.fail.count == 1
        await batcher.stop()

    asyncio.run(scenario())


def test_with_a_batching_delay_requests_still_wait_for_company() -> None:
    import asyncio

    from openmaas.serving.batcher import BatchConfig, Batcher
    from openmaas.telemetry import Metrics

    batches: list[int] = []

    async def worker(inputs: dict[str, np.ndarray], spare: bool) -> RuntimeResult:
        batches.append(len(inputs["x"]))
        return RuntimeResult(outputs={"y": inputs["x"]})

    async def scenario() -> None:
        batcher = Batcher("m:1", [worker], BatchConfig(max_batch_size=8, max_queue_delay_ms=50), Metrics())
        batcher.start()
        submits = [batcher.submit({"x": np.zeros((1, 1), np.float32)}, 1, 1, None) for _ in range(3)]
        first = asyncio.ensure_future(submits[0])
        await asyncio.sleep(0.005)
        await asyncio.gather(first, *submits[1:])
        await batcher.stop()

    asyncio.run(scenario())
    assert batches == [3], batches
