"""The batch runner: an asyncio task in the server that takes active batches and runs their lines.

Each line goes through the online path (``LineExecutor``: the same route, validation, errors and formatting as an
online call) as a ``BatchLine``: batch priority in the model's queue, outside the key's per-minute limits, rated
at the batch discount. The runner keeps at most ``cap`` lines of a batch in flight (a model step or two of rows),
so online calls, taken first by the batcher, wait at most for the step that is running.

Exactly once: a line's usage record (with its charge) and its result row are written in one transaction by the
metering writer; lines with a result are never run again. After a crash the batch's lease runs out, a runner
takes it over, gives back the holds its dead runner left open, and runs only the lines without a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import orjson

from openmaas.batches.lines import Checked, InvalidBatch, Line, LineError, check
from openmaas.batches.service import BatchService, line_request_id
from openmaas.billing.service import BillingService
from openmaas.errors import OpenMaaSError
from openmaas.gateway.admission import AdmissionControl, BatchLine
from openmaas.gateway.auth import Principal
from openmaas.metering.records import UsageRecord
from openmaas.store.tables import BatchRow
from openmaas.telemetry import Metrics

log = logging.getLogger(__name__)

#: Error codes a line is retried on (later, within its batch's window) instead of becoming an error line.
RETRYABLE = frozenset({"overloaded", "model_not_ready", "metering_unavailable"})


@dataclass(frozen=True)
class LineOutcome:
    """What a line's call answered: its status and body, and (2xx, metering on) its usage record to store."""

    status_code: int
    body: bytes
    record: UsageRecord | None = None


#: Runs one line's body against the batch's endpoint, as the line's principal: (url, body, line) -> outcome.
LineExecutor = Callable[[str, bytes, BatchLine, str], Awaitable[LineOutcome]]


def _error_code(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return code if isinstance(code, str) else None
    return None


class BatchRunner:
    def __init__(
        self,
        batches: BatchService,
        execute: LineExecutor,
        principal_of: Callable[[str], Principal],
        cap_of: Callable[[Principal, str, str], int],
        admission: AdmissionControl,
        billing: BillingService,
        metrics: Metrics,
        *,
        lease_s: float = 10.0,
        poll_s: float = 0.5,
    ) -> None:
        self.batches = batches
        self._execute = execute
        self._principal_of = principal_of
        self._cap_of = cap_of
        self._admission = admission
        self._billing = billing
        self._metrics = metrics
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.name = f"{socket.gethostname()}:{secrets.token_hex(4)}"
        self._task: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._last_sweep = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-runner")

    async def stop(self) -> None:
        held = bool(self._running)
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._task = None
        self._running.clear()
        if held:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.batches.let_go, self.name)

    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch runner step failed")
            await asyncio.sleep(self.poll_s)

    async def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep > 60:
            self._last_sweep = now
            await asyncio.to_thread(self.batches.files.sweep)
        await asyncio.to_thread(self.batches.renew, self.name, list(self._running), self.lease_s)
        for row in await asyncio.to_thread(self.batches.claim, self.name, self.lease_s):
            if row.id in self._running:
                continue
            task = asyncio.get_running_loop().create_task(self._drive(row.id, row.attempts), name=f"batch-{row.id}")
            self._running[row.id] = task
            task.add_done_callback(self._forget)
        self._metrics.batches_active.set(len(self._running))

    def _forget(self, task: asyncio.Task[None]) -> None:
        for batch_id, running in list(self._running.items()):
            if running is task:
                del self._running[batch_id]

    # -- one batch ----------------------------------------------------------------------------------------------

    async def _drive(self, batch_id: str, attempt: int) -> None:
        try:
            await self._advance(batch_id, attempt)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch failed to run", extra={"batch": batch_id})

    def _checked(self, row: BatchRow) -> Checked:
        try:
            data = self.batches.files.read(row.org_id, row.input_file_id)
        except OpenMaaSError:
            raise InvalidBatch(
                [LineError("input_file_missing", f"input file {row.input_file_id} was deleted or has expired")]
            ) from None
        return check(data, row.endpoint)

    async def _advance(self, batch_id: str, attempt: int) -> None:
        row = await asyncio.to_thread(self.batches.row, batch_id)
        checked: Checked | None = None
        if row.status == "validating":
            try:
                checked = await asyncio.to_thread(self._checked, row)
                principal = await asyncio.to_thread(self._principal_of, row.key_id)
                # The model must exist and be visible to the key.
                await asyncio.to_thread(self._cap_of, principal, row.endpoint, checked.model)
            except InvalidBatch as e:
                await asyncio.to_thread(self.batches.fail, batch_id, e.errors)
                return
            except OpenMaaSError as e:
                error = LineError(e.code.value, e.message)
                await asyncio.to_thread(self.batches.fail, batch_id, [error])
                return
            total = len(checked.lines)
            moved = await asyncio.to_thread(
                self.batches.move, batch_id, ("validating",), "in_progress", total=total, model=checked.model
            )
            if not moved:  # cancelled while it was being checked
                await asyncio.to_thread(self.batches.move, batch_id, ("cancelling",), "cancelled", runner=None)
                return
            row = await asyncio.to_thread(self.batches.row, batch_id)
        if row.status in ("in_progress", "cancelling"):
            if checked is None:
                try:
                    checked = await asyncio.to_thread(self._checked, row)
                except InvalidBatch as e:
                    await asyncio.to_thread(self._finish, batch_id, "failed", e.errors)
                    return
            ended = await self._run_lines(row, attempt, checked)
            if ended == "cancelled":
                await asyncio.to_thread(self._finish, batch_id, "cancelled")
                return
            if ended == "expired":
                await asyncio.to_thread(self._expire, batch_id, checked)
                return
            await asyncio.to_thread(self.batches.move, batch_id, ("in_progress",), "finalizing")
            row = await asyncio.to_thread(self.batches.row, batch_id)
        if row.status == "finalizing":
            await asyncio.to_thread(self._finish, batch_id, "completed")

    def _finish(self, batch_id: str, status: str, errors: list[LineError] | None = None) -> None:
        output, error = self.batches.write_outputs(batch_id)
        extra = {"errors": [e.to_json() for e in errors]} if errors else {}
        self.batches.end(batch_id, status, output, error, **extra)
        log.info("batch ended", extra={"batch": batch_id, "status": status})

    def _expire(self, batch_id: str, checked: Checked) -> None:
        """The window has passed: every line without a result gets a ``batch_expired`` error line."""
        done = self.batches.done_lines(batch_id)
        message = "this request could not be executed before the completion window expired"
        error = {"code": "batch_expired", "message": message}
        self.batches.store(
            *(
                self.batches.result_step(batch_id, line.number, line.custom_id, 0, b"null", error=error)
                for line in checked.lines
                if line.number not in done
            )
        )
        self._finish(batch_id, "expired")

    async def _run_lines(self, row: BatchRow, attempt: int, checked: Checked) -> str:
        """Run every line without a result; returns "done", "cancelled" or "expired"."""
        batch_id = row.id
        # Holds a dead runner left open for lines in flight (their lines have no result and run again).
        released = await asyncio.to_thread(self._billing.release_open_holds, f"{batch_id}-")
        if released:
            log.info("gave back holds of an interrupted batch run", extra={"batch": batch_id, "holds": released})
        done = await asyncio.to_thread(self.batches.done_lines, batch_id)
        pending: deque[Line] = deque(line for line in checked.lines if line.number not in done)
        if row.status == "cancelling":
            return "cancelled"
        try:
            principal = await asyncio.to_thread(self._principal_of, row.key_id)
            cap = max(1, await asyncio.to_thread(self._cap_of, principal, row.endpoint, checked.model))
        except OpenMaaSError as e:
            # The key was revoked, or the model went away: the rest of the lines fail as the online call would.
            body = orjson.dumps(
                {"error": {"message": e.message, "type": "invalid_request_error", "code": e.code.value}}
            )
            steps = [self.batches.result_step(batch_id, x.number, x.custom_id, e.status, body) for x in pending]
            await asyncio.to_thread(self.batches.store, *steps)
            return "done"
        tries: dict[int, int] = {}
        in_flight: dict[asyncio.Task[bool], Line] = {}
        stop: str | None = None
        next_check = 0.0
        expires = row.expires_at
        model = checked.model
        try:
            while (pending and stop is None) or in_flight:
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + self.poll_s
                    status = (await asyncio.to_thread(self.batches.row, batch_id)).status
                    if status == "cancelling":
                        stop = "cancelled"
                    elif datetime.now(UTC) >= expires:
                        stop = "expired"
                while stop is None and pending and len(in_flight) < cap:
                    line = pending.popleft()
                    n = tries[line.number] = tries.get(line.number, 0) + 1
                    hold_id = f"{line_request_id(batch_id, line.number)}.{attempt}.{n}"
                    task = asyncio.ensure_future(
                        self._one(batch_id, row.endpoint, line, BatchLine(principal, hold_id), model)
                    )
                    in_flight[task] = line
                if not in_flight:
                    continue
                finished, _ = await asyncio.wait(in_flight, timeout=self.poll_s, return_when=asyncio.FIRST_COMPLETED)
                retry = False
                for task in finished:
                    line = in_flight.pop(task)
                    ok = not task.cancelled() and task.exception() is None and task.result()
                    if not ok:
                        if task.exception() is not None:
                            log.error(
                                "batch line failed",
                                extra={"batch": batch_id, "line": line.number, "error": str(task.exception())},
                            )
                        pending.appendleft(line)
                        retry = True
                if retry:
                    await asyncio.sleep(0.2)
        finally:
            for task in in_flight:
                task.cancel()
        return stop or "done"

    async def _one(self, batch_id: str, endpoint: str, line: Line, batch_line: BatchLine, model: str) -> bool:
        """Run one line and store its result; False when it should run again later."""
        request_id = line_request_id(batch_id, line.number)
        try:
            outcome = await self._execute(endpoint, line.body, batch_line, request_id)
        except BaseException:
            await self._give_back(batch_line.deferred)
            raise
        ok = 200 <= outcome.status_code < 300
        record = outcome.record if ok else None
        if not ok:
            await self._give_back(outcome.record)  # metered, then failed on the way out: nothing is charged
        if not ok and outcome.status_code in (429, 503) and _error_code(outcome.body) in RETRYABLE:
            return False
        step = self.batches.result_step(
            batch_id,
            line.number,
            line.custom_id,
            outcome.status_code,
            outcome.body,
            input_tokens=record.input_tokens if record is not None else 0,
            output_tokens=record.output_tokens if record is not None else 0,
        )
        if record is not None:
            try:
                await self._admission.record(replace(record, also=step), batch=True)
            except BaseException:
                await self._give_back(record)
                raise
        else:
            await asyncio.to_thread(self.batches.store, step)
        self._metrics.batch_lines.labels(model, "ok" if ok else "error").inc()
        return True

    async def _give_back(self, record: UsageRecord | None) -> None:
        if record is not None and record.charge is not None:
            with contextlib.suppress(Exception):
                await self._admission.release_hold(record.charge)
