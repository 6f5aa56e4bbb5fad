"""Cumulative inference statistics per model version, in the terms of Triton's statistics extension.

Only the event loop updates them (the batcher's loop and its batch tasks), so plain integers need no lock.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class Duration:
    """How many times something happened and the nanoseconds it took in all."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, times: int = 1) -> None:
        self.count += times
        self.ns += int(seconds * 1e9) * times

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchDurations:
    """One batch size's executions: gathering the inputs, the model, splitting the outputs."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class InferenceCounters:
    """Triton's ``model_stats`` entry for one version: requests (``success``/``fail``, from arrival to answer),
    their ``queue`` wait and compute (each request counted with its batch's durations), and per batch size."""

    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # batches run
    last_inference_ms: int = 0  # wall clock, milliseconds since the epoch
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)

    def executed(self, rows: int, requests: int, gather_s: float, infer_s: float, split_s: float) -> None:
        """A batch of ``rows`` rows from ``requests`` requests ran."""
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        self.compute_input.add(gather_s, requests)
        self.compute_infer.add(infer_s, requests)
        self.compute_output.add(split_s, requests)
        size = self.batches.setdefault(rows, BatchDurations())
        size.compute_input.add(gather_s)
        size.compute_infer.add(infer_s)
        size.compute_output.add(split_s)

    def state(self) -> dict[str, object]:
        """Plain JSON-able fields (a cluster replica reports its counters as this)."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, object]) -> InferenceCounters:
        def duration(d: object) -> Duration:
            return Duration(**d) if isinstance(d, dict) else Duration()

        out = cls(
            inference_count=int(state.get("inference_count", 0)),  # type: ignore[call-overload]
            execution_count=int(state.get("execution_count", 0)),  # type: ignore[call-overload]
            last_inference_ms=int(state.get("last_inference_ms", 0)),  # type: ignore[call-overload]
        )
        for name in _DURATIONS:
            setattr(out, name, duration(state.get(name)))
        batches = state.get("batches")
        if isinstance(batches, dict):
            for size, d in batches.items():
                out.batches[int(size)] = BatchDurations(
                    *(duration(d.get(n)) for n in ("compute_input", "compute_infer", "compute_output"))
                )
        return out

    def add(self, other: InferenceCounters) -> None:
        """Add another replica's counters to these (one model served by several replicas)."""
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        for name in _DURATIONS:
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.count += theirs.count
            mine.ns += theirs.ns
        for size, d in other.batches.items():
            into = self.batches.setdefault(size, BatchDurations())
            for n in ("compute_input", "compute_infer", "compute_output"):
                getattr(into, n).count += getattr(d, n).count
                getattr(into, n).ns += getattr(d, n).ns

    def to_json(self, name: str, version: int) -> dict[str, object]:
        """The entry as Triton's ``GET /v2/models/{m}/stats`` writes it."""
        return {
            "name": name,
            "version": str(version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_json(),
                "fail": self.fail.to_json(),
                "queue": self.queue.to_json(),
                "compute_input": self.compute_input.to_json(),
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": self.compute_output.to_json(),
                "cache_hit": Duration().to_json(),
                "cache_miss": Duration().to_json(),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": d.compute_input.to_json(),
                    "compute_infer": d.compute_infer.to_json(),
                    "compute_output": d.compute_output.to_json(),
                }
                for size, d in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
