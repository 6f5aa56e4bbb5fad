"""The residency pool: hands out loaded runtimes, loading on first use, one load per version at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from openmaas.errors import ModelLoadFailed
from openmaas.registry.models import ModelVersion
from openmaas.runtimes import Runtime, RuntimeOptions, create_runtime
from openmaas.telemetry import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
Key = tuple[str, int]


@dataclass
class Resident:
    """A loaded model version and the requests using it now."""

    version: ModelVersion
    runtime: Runtime
    memory_bytes: int
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ResidencyPool:
    """Loaded model versions, keyed by (model, version)."""

    def __init__(
        self,
        artifact_path: Callable[[ModelVersion], Path],
        options: RuntimeOptions,
        metrics: Metrics,
        executor: Executor,
    ) -> None:
        self._artifact_path = artifact_path
        self._options = options
        self._metrics = metrics
        self._executor = executor
        self._resident: dict[Key, Resident] = {}
        self._loading: dict[Key, asyncio.Future[Resident]] = {}

    async def run(self, fn: Callable[[], T]) -> T:
        """Run blocking model work on the inference executor, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def get(self, name: str, version: int) -> Resident | None:
        return self._resident.get((name, version))

    def residents(self) -> list[Resident]:
        return list(self._resident.values())

    def is_loading(self, name: str, version: int) -> bool:
        return (name, version) in self._loading

    async def load(self, mv: ModelVersion) -> Resident:
        """The resident model for ``mv``, loading it if needed; concurrent callers share one load."""
        key = (mv.model, mv.version)
        resident = self._resident.get(key)
        if resident is not None:
            return resident
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Resident] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            resident = await self.run(lambda: self._load_blocking(mv))
            self._resident[key] = resident
            self._metrics.resident_models.set(len(self._resident))
            future.set_result(resident)
            return resident
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else has to
            raise
        finally:
            del self._loading[key]

    def _load_blocking(self, mv: ModelVersion) -> Resident:
        started = time.perf_counter()
        runtime = create_runtime(mv.format, self._artifact_path(mv), self._options)
        try:
            runtime.load()
        except Exception as e:
            log.exception("model load failed", extra={"model": mv.model, "version": mv.version})
            raise ModelLoadFailed(f"model '{mv.model}' version {mv.version} failed to load: {e}") from e
        elapsed = time.perf_counter() - started
        self._metrics.load_seconds.labels(mv.model, str(mv.version)).observe(elapsed)
        log.info("model loaded", extra={"model": mv.model, "version": mv.version, "seconds": round(elapsed, 3)})
        return Resident(version=mv, runtime=runtime, memory_bytes=runtime.memory_bytes())

    @asynccontextmanager
    async def use(self, mv: ModelVersion) -> AsyncIterator[Resident]:
        """Hold a loaded model for the duration of one request (it is never unloaded while held)."""
        resident = await self.load(mv)
        resident.in_flight += 1
        resident.last_used = time.monotonic()
        try:
            yield resident
        finally:
            resident.in_flight -= 1

    async def unload(self, name: str, version: int | None = None) -> list[Key]:
        """Unload versions of ``name`` (all when version is None) once their in-flight requests finish."""
        keys = [k for k in self._resident if k[0] == name and (version is None or k[1] == version)]
        for key in keys:
            resident = self._resident[key]
            while resident.in_flight:
                await asyncio.sleep(0.005)
            if self._resident.get(key) is resident:
                del self._resident[key]
                await self.run(resident.runtime.unload)
        self._metrics.resident_models.set(len(self._resident))
        return keys

    async def close(self) -> None:
        for name, version in list(self._resident):
            await self.unload(name, version)
