"""``until_disconnect``: the work runs in the request's own task and is cancelled when the client goes away."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from openmaas.api.requests import until_disconnect
from openmaas.errors import ClientClosedRequest


class FakeRequest:
    """What ``until_disconnect`` reads of a request: ``receive``, which answers once the client disconnects."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_the_work_runs_in_the_callers_task_and_its_answer_comes_back() -> None:
    async def main() -> None:
        request = FakeRequest()
        caller = asyncio.current_task()
        tasks_before = len(asyncio.all_tasks())

        async def work() -> str:
            assert asyncio.current_task() is caller  # no second task a request
            assert len(asyncio.all_tasks()) == tasks_before + 1  # the watcher only
            return "answer"

        assert await until_disconnect(request, work()) == "answer"  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == tasks_before  # the watcher is gone too

    asyncio.run(main())


def test_a_disconnect_cancels_the_work_and_answers_as_an_error_not_a_cancellation() -> None:
    async def main() -> None:
        request = FakeRequest()
        left_queue = asyncio.Event()

        async def work() -> str:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                left_queue.set()
                raise
            return "never"

        asyncio.get_running_loop().call_later(0.05, request.gone.set)
        with pytest.raises(ClientClosedRequest):
            await until_disconnect(request, work())  # type: ignore[arg-type]
        assert left_queue.is_set()
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0  # the task itself goes on, not cancelled
        await asyncio.sleep(0)  # and awaits normally afterwards

    asyncio.run(main())


def test_a_cancellation_from_elsewhere_still_cancels_the_caller() -> None:
    async def main() -> None:
        request = FakeRequest()

        async def handler() -> None:
            await until_disconnect(request, asyncio.sleep(30))  # type: ignore[arg-type]

        task = asyncio.ensure_future(handler())
        await asyncio.sleep(0.02)
        task.cancel()  # the server shutting down, say
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
