"""The gateway in process: no HTTP, a temporary SQLite database, a small ONNX model served by the local backend.

What admission and settlement promise, tested where that logic lives: one usage record per call, a billing hold
given back when the call fails, 409 for a concurrent duplicate Idempotency-Key, 402 without money, 429 past a
key's limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from openmaas.app import Platform, build_platform
from openmaas.billing.plans import PlanSpec
from openmaas.config import Settings
from openmaas.entities.models import ModelVersion
from openmaas.errors import ErrorCode, OpenMaaSError
from openmaas.gateway.admission import CallContext
from openmaas.gateway.auth import Principal
from openmaas.serving.types import InferenceRequest
from openmaas.store import db
from openmaas.store.tables import UsageRecordRow
from openmaas.tenancy.models import KeyLimits
from tests.helpers import matmul_chain_model


def _run(tmp_path: Path, body: Callable[[Platform], Awaitable[None]]) -> None:
    """Build the platform on a fresh SQLite database, run ``body`` in an event loop, always close it all."""
    built = build_platform(Settings(data_dir=tmp_path / "data", bundled_models=False, model_instances=1))
    db.upgrade(built.engine)

    async def main() -> None:
        try:
            await body(built)
        finally:
            await built.backend.close()
            await built.gateway.close()

    try:
        asyncio.run(main())
    finally:
        built.engine.dispose()


def _register(platform: Platform, tmp_path: Path, name: str, owner: str | None) -> ModelVersion:
    path = tmp_path / f"{name.replace('/', '-')}.onnx"
    matmul_chain_model(path, 4)
    return platform.services.registry.register(path, name, owner_org_id=owner, visibility="public")


def _principal(platform: Platform, org_id: str, limits: KeyLimits | None = None) -> Principal:
    secret, _ = platform.services.tenancy.create_key(org_id, "k", ["inference"], role="member", limits=limits)
    return platform.gateway.auth.authenticate(secret)


def _request(deadline: float | None = None) -> InferenceRequest:
    return InferenceRequest(inputs={"x": np.ones((1, 4), dtype=np.float32)}, deadline=deadline)


def _records(platform: Platform) -> int:
    with platform.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(UsageRecordRow)).scalar_one())


def test_each_call_leaves_one_usage_record(tmp_path: Path) -> None:
    async def body(platform: Platform) -> None:
        org = platform.services.tenancy.create_org("consumer")
        mv = _register(platform, tmp_path, "m", None)
        who = _principal(platform, org.id)
        for i in range(5):
            out = await platform.gateway.infer(who, mv, _request(), "v2", CallContext(request_id=f"r{i}"))
            assert out.outputs["y"].shape == (1, 4)
        assert _records(platform) == 5
        # A retry with the same Idempotency-Key is answered again but not metered again.
        ctx = CallContext(request_id="first", idempotency_key="k1", fingerprint="same")
        await platform.gateway.infer(who, mv, _request(), "v2", ctx)
        retry = CallContext(request_id="retry", idempotency_key="k1", fingerprint="same")
        await platform.gateway.infer(who, mv, _request(), "v2", retry)
        assert retry.replayed and retry.response_headers["Idempotent-Replayed"] == "true"
        assert _records(platform) == 6
        # What serving reports of the model now: loaded, idle, its measured memory, one copy, not pinned.
        [stats] = platform.backend.stats()
        assert (stats.model, stats.version, stats.state, stats.in_flight) == ("m", 1, "READY", 0)
        assert stats.memory_bytes > 0 and stats.copies == 1 and not stats.pinned
        assert platform.gateway.state(mv) == "READY"
        await platform.gateway.unload("m")
        assert platform.gateway.state(mv) == "UNAVAILABLE" and platform.backend.stats() == []

    _run(tmp_path, body)


def test_a_failed_call_gives_its_hold_back_and_is_not_metered(tmp_path: Path) -> None:
    async def body(platform: Platform) -> None:
        tenancy, billing = platform.services.tenancy, platform.services.billing
        provider, consumer = tenancy.create_org("provider"), tenancy.create_org("consumer")
        mv = _register(platform, tmp_path, "provider/sold", provider.id)
        billing.create_plan(
            "provider/sold", PlanSpec(name="per-call", kind="usage", unit="requests", price_micros=10_000)
        )
        billing.credit(consumer.id, 10_000, "t")
        who = _principal(platform, consumer.id)
        # Admitted (the hold takes the whole wallet), then the deadline has passed before it runs: 504.
        with pytest.raises(OpenMaaSError) as failed:
            await platform.gateway.infer(who, mv, _request(time.monotonic() - 1), "v2", CallContext(request_id="late"))
        assert failed.value.status == 504
        assert billing.wallet(consumer.id) == {"balance_micros": 10_000, "held_micros": 0, "available_micros": 10_000}
        # The money is there again: the next call is served and charged; then the wallet is empty: 402.
        await platform.gateway.infer(who, mv, _request(), "v2", CallContext(request_id="paid"))
        assert billing.wallet(consumer.id)["balance_micros"] == 0
        with pytest.raises(OpenMaaSError) as refused:
            await platform.gateway.infer(who, mv, _request(), "v2", CallContext(request_id="broke"))
        assert refused.value.status == 402 and "add credit" in str(refused.value)
        assert _records(platform) == 1  # only the call that was served

    _run(tmp_path, body)


def test_a_concurrent_duplicate_idempotency_key_is_409(tmp_path: Path) -> None:
    async def body(platform: Platform) -> None:
        org = platform.services.tenancy.create_org("consumer")
        mv = _register(platform, tmp_path, "m", None)
        who = _principal(platform, org.id)

        async def call(request_id: str) -> str:
            ctx = CallContext(request_id=request_id, idempotency_key="same-key", fingerprint="f")
            try:
                await platform.gateway.infer(who, mv, _request(), "v2", ctx)
            except OpenMaaSError as e:
                return e.code.value
            return "ok"

        outcomes = await asyncio.gather(call("a"), call("b"))
        assert sorted(outcomes) == sorted(["ok", ErrorCode.IDEMPOTENCY_IN_PROGRESS.value]), outcomes
        assert _records(platform) == 1

    _run(tmp_path, body)


def test_a_key_past_its_request_limit_gets_429_with_retry_after(tmp_path: Path) -> None:
    async def body(platform: Platform) -> None:
        org = platform.services.tenancy.create_org("consumer")
        mv = _register(platform, tmp_path, "m", None)
        who = _principal(platform, org.id, KeyLimits(rpm=2))
        for i in range(2):
            await platform.gateway.infer(who, mv, _request(), "v2", CallContext(request_id=f"ok{i}"))
        ctx = CallContext(request_id="third")
        with pytest.raises(OpenMaaSError) as refused:
            await platform.gateway.infer(who, mv, _request(), "v2", ctx)
        assert refused.value.status == 429 and refused.value.code == ErrorCode.RATE_LIMITED
        assert refused.value.headers.get("Retry-After")
        assert _records(platform) == 2

    _run(tmp_path, body)
