"""The residency pool: which model versions are in memory, within a memory budget.

Models load on first use (concurrent first requests share one load), are admitted by their measured memory
footprint, are evicted least-recently-used when the budget would be exceeded, can be pinned, and are never
unloaded while a request holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from openmaas.entities.models import ModelVersion, Preparation
from openmaas.errors import ModelLoadFailed, ModelNotReady, Overloaded
from openmaas.runtimes import Runtime, RuntimeOptions, RuntimeResult, create_runtime, runtime_class
from openmaas.runtimes.base import can_settle_rss, settled_rss
from openmaas.serving.batcher import BatchConfig, Batcher
from openmaas.serving.stats import InferenceCounters
from openmaas.telemetry import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
Key = tuple[str, int]

# How long a load waits for busy models to finish so it can evict them, before answering 503.
_ADMISSION_WAIT_S = 30.0


@dataclass(eq=False)
class Instance:
    """One loaded copy of a model with the single thread that runs it.

    Every call into a copy, load and unload included, happens on its own thread: PyTorch and ONNX Runtime keep
    per-thread thread pools, and one thread per copy keeps them from competing.
    """

    runtime: Runtime
    executor: ThreadPoolExecutor
    cores: CoreShare

    async def call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def infer(self, inputs: dict[str, np.ndarray], spare: bool = True) -> RuntimeResult:
        """Run a batch; ``spare``: the batcher found its model alone for a while (see ``CoreShare.begin``)."""
        threads = self.cores.begin(spare)
        try:
            if threads > 1 and self.runtime.threads_follow_caller:
                # The process's one thread with an OpenMP team of several (see Runtime.threads_follow_caller).
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self.cores.wide(), functools.partial(self._infer, threads, inputs))
            return await self.call(functools.partial(self._infer, threads, inputs))
        finally:
            self.cores.end()

    def _infer(self, threads: int, inputs: dict[str, np.ndarray]) -> RuntimeResult:
        self.runtime.set_threads(threads)
        return self.runtime.infer(inputs)


class CoreShare:
    """How many threads a model copy may use for its next batch: all of ``max_threads`` when it runs alone, one
    when other copies are busy too (single requests get low latency, full load gets no oversubscription)."""

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max(1, max_threads)
        self.busy = 0
        self._wide: ThreadPoolExecutor | None = None

    def wide(self) -> ThreadPoolExecutor:
        """The one thread that runs multi-threaded calls of runtimes whose threads follow their caller; one
        call at a time reaches it (a copy gets several threads only while no other copy is busy)."""
        if self._wide is None:
            self._wide = ThreadPoolExecutor(1, thread_name_prefix="openmaas-wide")
        return self._wide

    def close(self) -> None:
        if self._wide is not None:
            self._wide.shutdown(wait=False)
            self._wide = None

    def begin(self, spare: bool = True) -> int:
        """Threads for a batch that starts now: every core only when no other copy is busy and the batcher found
        the model alone for a while (``spare``); under load another batch soon starts on another copy, and a copy
        with several threads beside it made both slower than one thread each."""
        self.busy += 1
        return self.max_threads if self.busy == 1 and spare else 1

    def end(self) -> None:
        self.busy -= 1


@dataclass(eq=False)
class Resident:
    """A loaded model version (one or more instances), its batcher, and the requests using it now."""

    version: ModelVersion
    instances: list[Instance]
    batcher: Batcher
    memory_bytes: int
    pinned: bool = False
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    unloaded: bool = False
    #: Chosen for eviction: it takes no new requests and goes once those in flight finish.
    draining: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> Key:
        return (self.version.model, self.version.version)


@dataclass(eq=False)
class _Waiter:
    """A request waiting for its model's load; the load sets ``granted`` (and counts it in flight) when done."""

    granted: Resident | None = None


def choose_victims(
    residents: list[Resident], needed: int, used: int, budget: int, *, include_busy: bool = False
) -> list[Resident] | None:
    """Least-recently-used unpinned residents (idle ones only, unless ``include_busy``) whose eviction makes
    ``needed`` bytes fit in ``budget``; None if impossible."""
    if used + needed <= budget:
        return []
    victims = []
    for r in sorted(residents, key=lambda r: r.last_used):
        if r.pinned or (r.in_flight and not include_busy):
            continue
        victims.append(r)
        used -= r.memory_bytes
        if used + needed <= budget:
            return victims
    return None


class ResidencyPool:
    """Loaded model versions keyed by (model, version), within ``budget_bytes`` (None: unlimited)."""

    def __init__(
        self,
        artifact_path: Callable[[ModelVersion], Path],
        options: RuntimeOptions,
        metrics: Metrics,
        *,
        budget_bytes: int | None = None,
        batch_config: Callable[[ModelVersion], BatchConfig] = lambda mv: BatchConfig(),
        pinned: Callable[[ModelVersion], bool] = lambda mv: False,
        instances: Callable[[ModelVersion], int] = lambda mv: 1,
    ) -> None:
        self._artifact_path = artifact_path
        self._options = options
        self._metrics = metrics
        self._instances = instances
        self._cores = CoreShare(options.torch_threads)
        self.budget_bytes = budget_bytes
        self._batch_config = batch_config
        self._pinned = pinned
        self._resident: dict[Key, Resident] = {}
        #: Statistics since this process started, per version (they outlive evictions).
        self._stats: dict[Key, InferenceCounters] = {}
        self._loading: dict[Key, asyncio.Task[Resident]] = {}
        self._waiting: dict[Key, set[_Waiter]] = {}
        # Loads run one at a time: the footprint is measured as the process's memory growth during the load.
        self._load_lock = asyncio.Lock()
        self._released = asyncio.Condition()
        self._footprints: dict[Key, int] = {}
        # Who needs each version kept loaded (dedicated capacity, the repository API): pinned while any does.
        self._holders: dict[Key, set[str]] = {}
        metrics.memory_budget_bytes.set(budget_bytes or 0)

    # -- inspection --------------------------------------------------------------------------------------------

    @property
    def options(self) -> RuntimeOptions:
        return self._options

    def artifact_path(self, mv: ModelVersion) -> Path:
        return self._artifact_path(mv)

    def inference_stats(self, name: str, version: int) -> InferenceCounters:
        return self._stats.get((name, version)) or InferenceCounters()

    def all_inference_stats(self) -> dict[Key, InferenceCounters]:
        return dict(self._stats)

    def batch_config(self, mv: ModelVersion) -> BatchConfig:
        return self._batch_config(mv)

    def instances(self, mv: ModelVersion) -> int:
        return max(1, self._instances(mv))

    def get(self, name: str, version: int) -> Resident | None:
        return self._resident.get((name, version))

    def residents(self) -> list[Resident]:
        return list(self._resident.values())

    def is_loading(self, name: str, version: int) -> bool:
        return (name, version) in self._loading

    def loading(self) -> list[Key]:
        return list(self._loading)

    @property
    def used_bytes(self) -> int:
        return sum(r.memory_bytes for r in self._resident.values())

    # -- the request path --------------------------------------------------------------------------------------

    async def infer(
        self,
        mv: ModelVersion,
        inputs: dict[str, np.ndarray],
        rows: int,
        cost: int,
        deadline: float | None,
        priority: int = 0,
    ) -> RuntimeResult:
        """Run one request through the model's batcher, loading the model if needed."""
        resident = await self.acquire(mv)
        try:
            return await resident.batcher.submit(inputs, rows, cost, deadline, priority)
        except Overloaded:
            self._metrics.rejected.labels(mv.model).inc()
            raise
        finally:
            await self.release(resident)

    async def acquire(self, mv: ModelVersion) -> Resident:
        """A loaded model held for one request: it is never unloaded until ``release``."""
        key = (mv.model, mv.version)
        while True:
            resident = self._resident.get(key)
            if resident is not None and resident.draining:
                await resident.gone.wait()  # being evicted: wait, then load it again
                continue
            if resident is None:
                return await self._acquire_loading(mv)
            if not resident.unloaded:
                resident.in_flight += 1
                resident.last_used = time.monotonic()
                return resident

    async def _acquire_loading(self, mv: ModelVersion) -> Resident:
        """Wait for ``mv``'s load; the load holds the model for every request waiting on it before anything else
        can run, so the next model's load cannot evict it before these requests had their turn (under a budget
        that fits fewer models than are called, loads would otherwise evict each other's models for ever)."""
        key = (mv.model, mv.version)
        waiter = _Waiter()
        self._waiting.setdefault(key, set()).add(waiter)
        loaded = None
        try:
            loaded = await self.load(mv)
        finally:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(waiter)
                if not waiting:
                    del self._waiting[key]
            if loaded is None and waiter.granted is not None:
                await self.release(waiter.granted)  # held for us, but we went away (cancelled) or it failed
        if waiter.granted is loaded:
            loaded.last_used = time.monotonic()
            return loaded
        # The model was already loaded when we asked (no grant): hold it as any request does.
        return await self.acquire(mv)

    async def release(self, resident: Resident) -> None:
        resident.in_flight -= 1
        resident.last_used = time.monotonic()
        if resident.in_flight == 0:
            async with self._released:
                self._released.notify_all()

    # -- loading and eviction ----------------------------------------------------------------------------------

    def _is_pinned(self, mv: ModelVersion) -> bool:
        return self._pinned(mv) or bool(self._holders.get((mv.model, mv.version)))

    async def pin(self, mv: ModelVersion, holder: str) -> Resident:
        """Load ``mv`` and keep it loaded while ``holder`` (or any other holder, or its settings) needs it."""
        key = (mv.model, mv.version)
        holders = self._holders.setdefault(key, set())
        added = holder not in holders
        holders.add(holder)
        try:
            resident = await self.load(mv)
        except BaseException:
            if added:
                self.unpin(mv, holder)
            raise
        resident.pinned = True
        return resident

    def unpin(self, mv: ModelVersion, holder: str) -> None:
        """``holder`` no longer needs ``mv`` loaded; it may be evicted once nobody else pins it."""
        key = (mv.model, mv.version)
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(holder)
            if not holders:
                del self._holders[key]
        resident = self._resident.get(key)
        if resident is not None:
            resident.pinned = self._is_pinned(mv)

    def holders(self, mv: ModelVersion) -> frozenset[str]:
        return frozenset(self._holders.get((mv.model, mv.version), ()))

    async def load(self, mv: ModelVersion) -> Resident:
        """The resident model for ``mv``, loading it if needed; concurrent callers share one load.

        The load runs in a task of its own: a caller that goes away (a client disconnecting) stops waiting for it
        but never cancels it, so the others waiting for the same model still get it."""
        key = (mv.model, mv.version)
        resident = self._resident.get(key)
        if resident is not None:
            return resident
        pending = self._loading.get(key)
        if pending is None:
            self.refuse_while_preparing(mv)
            pending = asyncio.get_running_loop().create_task(self._load_new(mv), name=f"load {mv.model}:{mv.version}")
            self._loading[key] = pending
            pending.add_done_callback(lambda t: None if t.cancelled() else t.exception())  # retrieved: no warning
        return await asyncio.shield(pending)

    def preparing(self, mv: ModelVersion) -> Preparation | None:
        """The one-time preparation of ``mv``'s artifact running now in this process, else None."""
        cls = runtime_class(mv.format)
        if cls.preparing.__func__ is Runtime.preparing.__func__:  # type: ignore[attr-defined]
            return None  # the format never needs preparing: no path lookup
        return cls.preparing(self._artifact_path(mv))

    def refuse_while_preparing(self, mv: ModelVersion) -> None:
        """A version whose one-time preparation (a conversion) runs in the background cannot load yet: say so at
        once, with how far it is, instead of holding the call for the minute it takes."""
        prep = self.preparing(mv)
        if prep is None:
            return
        left = prep.elapsed_s * (1 - prep.progress) / prep.progress if prep.progress > 0.05 else 30.0
        raise ModelNotReady(
            f"model '{mv.model}' is being prepared ({prep.step}, {prep.progress:.0%} after {prep.elapsed_s:.0f} s); "
            f"it serves once that is done: retry in about {max(5, round(left))} s",
            retry_after=min(60.0, max(5.0, left)),
        )

    async def _load_new(self, mv: ModelVersion) -> Resident:
        key = (mv.model, mv.version)
        try:
            async with self._load_lock:
                await self._admit(mv)
                instances, footprint, seconds = await self._load_instances(mv, self._instances(mv))
                if not can_settle_rss():
                    # Freed memory the allocator kept is reused by a reload, which then measures less: keep the
                    # largest. (Where it can be given back first, each load measures what the model takes now.)
                    footprint = max(footprint, self._footprints.get(key, 0))
                self._footprints[key] = footprint
                resident = Resident(
                    version=mv,
                    instances=instances,
                    batcher=Batcher(
                        f"{mv.model}:{mv.version}",
                        [i.infer for i in instances],
                        self._batch_config(mv),
                        self._metrics,
                        self._stats.setdefault(key, InferenceCounters()),
                    ),
                    memory_bytes=footprint,
                    pinned=self._is_pinned(mv),
                )
                resident.batcher.start()
                self._resident[key] = resident
                for waiter in self._waiting.get(key, ()):  # see _acquire_loading
                    waiter.granted = resident
                    resident.in_flight += 1
                # The estimate may have been low: evict idle models until the measured footprint fits.
                await self._fit_after_load(resident)
                self._update_gauges()
            self._metrics.loads.labels(mv.model).inc()
            self._metrics.load_seconds.labels(mv.model, str(mv.version)).observe(seconds)
            log.info(
                "model loaded",
                extra={"model": mv.model, "version": mv.version, "seconds": round(seconds, 3), "bytes": footprint},
            )
            return resident
        finally:
            del self._loading[key]

    async def _admit(self, mv: ModelVersion) -> None:
        """Make room for ``mv`` before loading it (evicting least-recently-used models).

        Its expected footprint is the one measured at a previous load, else twice the artifact size (runtimes
        commonly hold the file's bytes and a working copy); only the artifact size itself is held against the
        whole budget, so a model that would fit is never refused on a guess.
        """
        budget = self.budget_bytes
        if budget is None:
            return
        key = (mv.model, mv.version)
        if mv.size_bytes > budget:
            raise Overloaded(
                f"model {mv.model} version {mv.version} needs about {mv.size_bytes >> 20} MiB, more than the "
                f"whole memory budget ({budget >> 20} MiB, OPENMAAS_MODEL_MEMORY_MB)",
                retry_after=60,
            )
        needed = self._footprints.get(key, 2 * mv.size_bytes)
        await self._make_room(key, min(needed, budget), others=list(self._resident.values()))

    async def _fit_after_load(self, loaded: Resident) -> None:
        """The measured footprint may exceed the estimate: evict more until the budget holds again."""
        budget = self.budget_bytes
        if budget is None or self.used_bytes <= budget:
            return
        others = [r for r in self._resident.values() if r is not loaded]
        try:
            await self._make_room(loaded.key, loaded.memory_bytes, others=others)
        except Overloaded:
            await self._drop([loaded])  # give the new model back rather than exceed the budget
            raise

    async def _make_room(self, key: Key, needed: int, others: list[Resident]) -> None:
        budget = self.budget_bytes
        assert budget is not None
        used = sum(r.memory_bytes for r in others)
        victims = choose_victims(others, needed, used, budget)
        if victims is None:
            # Every candidate is busy: stop giving the least recently used ones new requests, and evict them as soon
            # as their in-flight requests finish (so a steady stream of requests cannot starve this load).
            victims = choose_victims(others, needed, used, budget, include_busy=True)
            if victims is None and needed > budget:
                raise Overloaded(
                    f"model {key[0]} takes {needed >> 20} MiB loaded, more than the whole memory budget "
                    f"({budget >> 20} MiB): raise OPENMAAS_MODEL_MEMORY_MB (in cluster mode "
                    "OPENMAAS_RAY_SHARED_MEMORY_MB, or give the model replica settings of its own)",
                    retry_after=60,
                )
            if victims is None:
                raise Overloaded(
                    f"no memory for model {key[0]}: pinned models fill the memory budget ({budget >> 20} MiB); "
                    "unpin one or raise OPENMAAS_MODEL_MEMORY_MB",
                    retry_after=30,
                )
            for v in victims:
                v.draining = True
            try:
                async with self._released:
                    await asyncio.wait_for(
                        self._released.wait_for(lambda: all(v.in_flight == 0 for v in victims)), _ADMISSION_WAIT_S
                    )
            except TimeoutError:
                for v in victims:
                    v.draining = False
                raise Overloaded(
                    f"no memory for model {key[0]}: the models in memory stayed busy; retry later", retry_after=5
                ) from None
        await self._evict(victims)

    async def _evict(self, victims: list[Resident]) -> None:
        for r in victims:
            log.info("evicting model", extra={"model": r.version.model, "version": r.version.version})
            self._metrics.evictions.labels(r.version.model).inc()
        await self._drop(victims)

    async def _drop(self, residents: list[Resident]) -> None:
        # First take them all out of service without yielding to the event loop, so no request can acquire one
        # of them in between; then release their resources.
        for r in residents:
            r.unloaded = True
            if self._resident.get(r.key) is r:
                del self._resident[r.key]
        self._update_gauges()
        for r in residents:
            r.gone.set()
        for r in residents:
            await r.batcher.stop()
            await self._release_instances(r.instances)

    async def _load_instances(self, mv: ModelVersion, count: int) -> tuple[list[Instance], int, float]:
        """Load ``count`` copies, each on its own new thread; the footprint is the process's memory growth, read with
        freed memory given back to the system on both sides (else memory freed or reused meanwhile, by other models'
        requests, an eviction or the load's own temporary buffers, counted: one load of two 16 MiB copies measured
        71 MiB beside other work, and 2.0-3.0 files once settled)."""
        started = time.perf_counter()
        instances: list[Instance] = []
        try:
            for i in range(max(1, count)):
                executor = ThreadPoolExecutor(1, thread_name_prefix=f"openmaas-{mv.model}-{i}")
                runtime = create_runtime(mv.format, self._artifact_path(mv), self._options)
                instances.append(Instance(runtime, executor, self._cores))
            # The format's one-time set-up in this process is not the model's memory: done before measuring.
            await asyncio.to_thread(type(instances[0].runtime).set_up_process)
            rss_before = await asyncio.to_thread(settled_rss)
            for instance in instances:  # copies in processes of their own start side by side
                await instance.call(instance.runtime.begin_load)
            for instance in instances:
                await instance.call(instance.runtime.load)
        except Exception as e:
            await self._release_instances(instances)
            log.exception("model load failed", extra={"model": mv.model, "version": mv.version})
            raise ModelLoadFailed(f"model '{mv.model}' version {mv.version} failed to load: {e}") from e
        grown = max(0, await asyncio.to_thread(settled_rss) - rss_before)
        footprint = max(grown, sum(i.runtime.memory_bytes() for i in instances))
        return instances, footprint, time.perf_counter() - started

    async def _release_instances(self, instances: list[Instance]) -> None:
        for instance in instances:
            with contextlib.suppress(Exception):
                await instance.call(instance.runtime.unload)
            instance.executor.shutdown(wait=False)  # its thread ends: no idle thread keeps a thread pool

    def _update_gauges(self) -> None:
        self._metrics.resident_models.set(len(self._resident))
        self._metrics.resident_bytes.set(self.used_bytes)

    async def unload(self, name: str, version: int | None = None) -> list[Key]:
        """Unload versions of ``name`` (all when None) once their in-flight requests finish."""
        keys = [k for k in self._resident if k[0] == name and (version is None or k[1] == version)]
        for key in keys:
            resident = self._resident.get(key)
            if resident is None:
                continue
            async with self._released:
                await self._released.wait_for(lambda r=resident: r.in_flight == 0)  # type: ignore[misc]
            if not resident.unloaded:
                await self._drop([resident])
        return keys

    async def close(self) -> None:
        loads = list(self._loading.values())
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        await self._drop(list(self._resident.values()))
        self._cores.close()
