"""Dynamic batching: concurrent requests to one model version are grouped, run once, and split back.

The pure parts (``take_batch``, ``drop_expired``, ``concat_inputs``, ``split_result``) are tested without threads
or HTTP; ``Batcher`` is the small asyncio loop around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openmaas.errors import BatchMismatch, DeadlineExceeded, Overloaded
from openmaas.runtimes.base import RuntimeResult
from openmaas.serving.stats import InferenceCounters
from openmaas.telemetry import Metrics

log = logging.getLogger(__name__)

#: While an online request came this recently (seconds), batch lines leave a model copy free for the next one.
ONLINE_QUIET_S = 0.5
#: A batch may use every core only if the model has had nothing else running or waiting for this long (seconds):
#: two clients in a closed loop rarely overlap at the moment a batch is taken, but the other one's request comes
#: while it runs, and two copies then compete for the cores (one with all of them, one beside it).
CROWD_MEMORY_S = 0.5


@dataclass(frozen=True)
class BatchConfig:
    """Per-model batching settings (defaults from Settings, overridable per model in the registry)."""

    #: Most rows (batch-dimension entries) one runtime call receives.
    max_batch_size: int = 64
    #: How long the first queued request may wait for others to join; 0 = dispatch as soon as the model is free
    #: (requests that arrive while a batch runs are batched together, so load alone forms batches).
    max_queue_delay_ms: float = 0.0
    #: Most requests waiting per model; beyond it requests are refused at once (429/503 with Retry-After).
    max_queue_size: int = 256
    #: For text models: most tokens (estimated) one batch may carry.
    max_batch_tokens: int = 16384
    #: With several copies: how long a free copy may wait for its fair share of the work (a batch as large as
    #: the other copies are running) before it takes what is queued. 0 = never wait. See ``balance_wait``.
    max_balance_wait_ms: float = 3.0


@dataclass(eq=False)
class Pending:
    """One request waiting in a batcher's queue."""

    inputs: dict[str, np.ndarray]
    rows: int
    cost: int
    enqueued: float
    deadline: float | None
    future: asyncio.Future[RuntimeResult] | None = None
    #: Requests can be concatenated only when their non-batch dimensions agree.
    key: tuple[Any, ...] = field(default=())
    cancelled: bool = False
    #: 0 online; > 0 an offline batch line.
    priority: int = 0


def compat_key(inputs: dict[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))


def drop_expired(queue: deque[Pending], now: float) -> list[Pending]:
    """Remove and return the queued requests whose deadline has passed (and those cancelled, silently)."""
    expired = []
    kept: list[Pending] = []
    for item in queue:
        if item.cancelled:
            continue
        if item.deadline is not None and item.deadline <= now:
            expired.append(item)
        else:
            kept.append(item)
    if len(kept) != len(queue):
        queue.clear()
        queue.extend(kept)
    return expired


def take_batch(queue: deque[Pending], max_rows: int, max_cost: int) -> list[Pending]:
    """Pop the next batch: the head request plus later compatible ones, within the row and cost limits.

    The head is always taken (a request larger than the limits runs alone). Requests that do not fit or are not
    compatible keep their place in the queue.
    """
    if not queue:
        return []
    head = queue.popleft()
    batch = [head]
    rows, cost = head.rows, head.cost
    skipped: list[Pending] = []
    while queue and rows < max_rows:
        item = queue.popleft()
        if item.cancelled:
            continue
        if item.key != head.key or rows + item.rows > max_rows or cost + item.cost > max_cost:
            skipped.append(item)
            if len(skipped) >= 8:  # do not scan a long queue for stragglers
                break
            continue
        batch.append(item)
        rows += item.rows
        cost += item.cost
    queue.extendleft(reversed(skipped))
    return batch


def fair_share(queued_rows: int, running_rows: int, copies: int, max_rows: int) -> int:
    """Rows the next batch should carry when ``copies`` copies share the work: an equal part of everything queued
    or running (``ceil((queued + running) / copies)``), at least one and at most ``max_rows``.

    Taking more would leave the other copies idle when they finish (and a large batch runs slower per row than
    a medium one: its activations leave the CPU cache); taking less fragments the work into small batches.
    """
    if copies <= 1:
        return max(1, min(max_rows, queued_rows))
    return max(1, min(max_rows, -(-(queued_rows + running_rows) // copies)))


def balance_wait(
    queued_rows: int, running_rows: int, copies: int, max_rows: int, head_waited_s: float, max_wait_s: float
) -> float:
    """Seconds a free model copy should still wait before taking a batch (0 = take it now).

    Under concurrent load the requests a copy has just answered come back a moment later; a copy that took the
    first of them alone would run a string of tiny batches (a batch of one costs about as much machine time as
    several rows of a full one) while the other copies run large ones. So while other copies are busy, a free
    copy waits until the queue holds its fair share (``fair_share``), or until the oldest queued request has
    waited ``max_wait_s``. With no other copy busy (a single client, light load) nothing waits.
    """
    if queued_rows <= 0 or copies <= 1 or running_rows <= 0 or max_wait_s <= 0:
        return 0.0
    if queued_rows >= fair_share(queued_rows, running_rows, copies, max_rows):
        return 0.0
    return max(0.0, max_wait_s - head_waited_s)


def concat_inputs(batch: list[Pending]) -> dict[str, np.ndarray]:
    if len(batch) == 1:
        return batch[0].inputs
    return {name: np.concatenate([p.inputs[name] for p in batch], axis=0) for name in batch[0].inputs}


def split_result(result: RuntimeResult, sizes: list[int]) -> list[RuntimeResult]:
    """Cut a batch result back into per-request results; a wrong row count is a server error, never truncated."""
    total = sum(sizes)
    for name, array in result.outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            got = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
            raise BatchMismatch(f"the model returned {got} for output '{name}' but the batch had {total}")
    if result.tokens is not None and len(result.tokens) != total:
        raise BatchMismatch(f"the model returned {len(result.tokens)} token counts for a batch of {total}")
    if len(sizes) == 1:
        return [result]
    bounds = np.cumsum([0, *sizes])
    parts = []
    for start, end in itertools.pairwise(bounds):
        parts.append(
            RuntimeResult(
                outputs={k: v[start:end] for k, v in result.outputs.items()},
                tokens=None if result.tokens is None else result.tokens[start:end],
            )
        )
    return parts


# Runs one batch on one model instance (its own thread) and returns the result. The flag says whether the model had
# nothing else running or waiting for CROWD_MEMORY_S when the batch was taken: only then may the copy use more than
# one core (another batch would otherwise soon start on the other copy, and the two would compete for the cores).
Worker = Callable[[dict[str, np.ndarray], bool], Awaitable[RuntimeResult]]


class Batcher:
    """The queue and dispatch loop of one loaded model version, feeding one or more model instances.

    A batch is formed whenever an instance is free and requests are waiting, so load alone forms batches: what
    arrives while the instances are busy is batched together.
    """

    def __init__(
        self,
        label: str,
        workers: list[Worker],
        config: BatchConfig,
        metrics: Metrics,
        stats: InferenceCounters | None = None,
    ) -> None:
        if not workers:
            raise ValueError("a batcher needs at least one worker")
        self.label = label
        #: Kept by the pool across loads, so a version's statistics outlive an eviction.
        self.stats = stats if stats is not None else InferenceCounters()
        self.config = config
        self._workers = workers
        self._free: list[int] = list(range(len(workers)))
        #: Online rows each busy copy is running now (batch lines do not count: an online request never waits
        #: for a fair share beside them).
        self._running_rows: dict[int, int] = {}
        self._metrics = metrics
        # This version's series, looked up once (labels() validates and locks on every call).
        self._queue_wait = metrics.queue_wait.labels(label)
        self._batch_size = metrics.batch_size.labels(label)
        self._compute = metrics.compute.labels(label)
        self._queue: deque[Pending] = deque()
        #: Offline batch lines (priority > 0): taken only when no online request waits.
        self._low: deque[Pending] = deque()
        # The depth gauges read the queues when scraped: setting them on every request and batch was a part of
        # each request's time on the event loop.
        queue, low = self._queue, self._low
        metrics.queue_depth.labels(label).set_function(lambda: len(queue) + len(low))
        metrics.queue_depth_by_priority.labels(label, "online").set_function(lambda: len(queue))
        metrics.queue_depth_by_priority.labels(label, "batch").set_function(lambda: len(low))
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._recent_batch_s = 0.05
        #: When the last online request arrived (time.monotonic()).
        self._last_online = -1e9
        #: When a batch was last taken while another ran or requests were left waiting (time.monotonic()).
        self._last_crowded = -1e9

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def low_depth(self) -> int:
        return len(self._low)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.label}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for item in itertools.chain(self._queue, self._low):
            if item.future is not None and not item.future.done():
                item.future.set_exception(Overloaded(f"model '{self.label}' was unloaded", retry_after=1))
        self._queue.clear()
        self._low.clear()

    async def submit(
        self, inputs: dict[str, np.ndarray], rows: int, cost: int, deadline: float | None, priority: int = 0
    ) -> RuntimeResult:
        """Queue a request and wait for its share of a batch result (``priority`` > 0: behind every online
        request; the batch scheduler bounds how many such rows wait, so their queue has no limit here)."""
        queue = self._queue if priority <= 0 else self._low
        if priority <= 0:
            self._last_online = time.monotonic()
        if priority <= 0 and len(self._queue) >= self.config.max_queue_size:
            self.stats.fail.add(0.0)
            # Rough time for the queue ahead to drain: batches needed times the recent batch duration.
            batches = len(self._queue) / max(1, self.config.max_batch_size * len(self._workers))
            raise Overloaded(
                f"model '{self.label}' is at capacity ({len(self._queue)} requests queued); retry later",
                retry_after=max(1.0, batches * self._recent_batch_s),
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item = Pending(inputs, rows, cost, now, deadline, loop.create_future(), compat_key(inputs), priority=priority)
        assert item.future is not None
        if priority <= 0 and self._can_start_at_once():
            # The model is idle: start the batch here, without a turn of the dispatch loop (at low load that turn
            # and its wake-up were a part of every request's time on the event loop).
            if deadline is not None and deadline <= now:
                self.stats.fail.add(0.0)
                raise self._deadline_passed()
            self._start([item], now)
            return await item.future
        queue.append(item)
        self._wakeup.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            # The client went away or the caller gave up: leave the queue if still in it.
            item.cancelled = True
            with contextlib.suppress(ValueError):
                queue.remove(item)
            raise

    async def _wait_for_batch(self) -> None:
        """Wait up to max_queue_delay_ms after the head arrived for a full batch (no wait when delay is 0)."""
        delay = self.config.max_queue_delay_ms / 1000
        if delay <= 0:
            return
        while self._queue:
            rows = sum(p.rows for p in self._queue)
            remaining = self._queue[0].enqueued + delay - time.monotonic()
            if rows >= self.config.max_batch_size or remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _loop(self) -> None:
        while True:
            if not (self._queue or self._low) or not self._free:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_batch()
            now = time.monotonic()
            queued = sum(p.rows for p in self._queue)
            running = sum(self._running_rows.values())
            copies = len(self._workers)
            if self._queue:
                wait = balance_wait(
                    queued,
                    running,
                    copies,
                    self.config.max_batch_size,
                    now - self._queue[0].enqueued,
                    self.config.max_balance_wait_ms / 1000,
                )
                if wait > 0:
                    # Woken early by a new request or by a copy finishing; then the rule is checked again.
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    continue
            for item in drop_expired(self._queue, now):
                self.stats.fail.add(now - item.enqueued)
                if item.future is not None and not item.future.done():
                    item.future.set_exception(self._deadline_passed())
            if self._queue:
                share = fair_share(queued, running, copies, self.config.max_batch_size)
                # Online steps carry online requests only: batch lines in their spare rows made each online step
                # longer, which a closed loop of online clients pays for in throughput.
                batch = take_batch(self._queue, share, self.config.max_batch_tokens)
            else:  # only batch lines wait
                quiet_for = now - self._last_online
                if quiet_for < ONLINE_QUIET_S and copies > 1 and len(self._free) < 2:
                    # Online traffic is about: keep the last free copy for it, so an online request never waits
                    # for a step of batch lines; look again when a copy frees or the traffic has gone quiet.
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), ONLINE_QUIET_S - quiet_for)
                    continue
                rows = self.config.max_batch_size
                if quiet_for < ONLINE_QUIET_S:
                    # Short steps while online traffic is about: a step's answers come back to the event loop
                    # together, and an online request shares each of its turns on the loop with them.
                    rows = max(1, rows // 8)
                batch = take_batch(self._low, rows, self.config.max_batch_tokens)
            batch = [p for p in batch if not p.cancelled]
            if batch:
                self._start(batch, now)

    def _deadline_passed(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request's deadline passed while it waited for model '{self.label}'")

    def _can_start_at_once(self) -> bool:
        """Whether an online request can start from ``submit`` itself: the model is idle (no batch running, every
        copy free, nothing queued) and no batching delay applies. Under load requests go through the queue, so
        those arriving in the same turn of the event loop share a batch (a batch of one costs about as much machine
        time as several rows of a full one)."""
        return (
            not self._running
            and len(self._free) == len(self._workers)
            and not self._queue
            and not self._low
            and self.config.max_queue_delay_ms <= 0
        )

    def _start(self, batch: list[Pending], now: float) -> None:
        """Run ``batch`` on a free copy (the caller checked that one is free)."""
        for p in batch:
            self._queue_wait.observe(now - p.enqueued)
            self.stats.queue.add(now - p.enqueued)
        # Most recently used copy first: at low load one copy (one thread pool) does all the work.
        worker = self._free.pop()
        rows = sum(p.rows for p in batch)
        if self._queue or self._low or self._running_rows:
            self._last_crowded = now
        spare = now - self._last_crowded > CROWD_MEMORY_S
        self._running_rows[worker] = sum(p.rows for p in batch if p.priority <= 0)
        task = asyncio.get_running_loop().create_task(self._run_batch(worker, batch, rows, spare))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_batch(self, worker: int, batch: list[Pending], rows: int, spare: bool) -> None:
        self._batch_size.observe(rows)
        started = time.perf_counter()
        try:
            inputs = concat_inputs(batch)
            gathered = time.perf_counter()
            result = await self._workers[worker](inputs, spare)
            inferred = time.perf_counter()
            parts = split_result(result, [p.rows for p in batch])
            self.stats.executed(
                rows, len(batch), gathered - started, inferred - gathered, time.perf_counter() - inferred
            )
        except Exception as e:
            if not isinstance(e, BatchMismatch):
                log.exception("batch failed", extra={"model": self.label, "rows": rows})
            now = time.monotonic()
            for p in batch:
                self.stats.fail.add(now - p.enqueued)
                if p.future is not None and not p.future.done():
                    p.future.set_exception(e)
            return
        finally:
            elapsed = time.perf_counter() - started
            self._compute.inc(elapsed)
            self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * elapsed
            self._running_rows.pop(worker, None)
            self._free.append(worker)
            if self._queue or self._low:
                # Something waits for this copy (when nothing does, the dispatch loop sleeps until a request comes).
                self._wakeup.set()
        now = time.monotonic()
        for p, part in zip(batch, parts, strict=True):
            self.stats.success.add(now - p.enqueued)
            if p.future is not None and not p.future.done():
                p.future.set_result(part)
