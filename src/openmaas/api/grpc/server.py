"""The Open Inference Protocol v2 over gRPC (KServe/Triton's ``GRPCInferenceService``), on its own port.

A protocol adapter like ``api/v2``: it authenticates from the ``authorization`` metadata and calls the same gateway
(visibility, limits, metering, billing), the same views (metadata, configuration, statistics, repository) and the
same codec for tensor bytes. Errors map to gRPC status codes through ``api.errors.GRPC_STATUS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from openmaas import __version__
from openmaas.api import v2_views as views
from openmaas.api.deps import bearer_of
from openmaas.api.errors import GRPC_STATUS, log_server_error
from openmaas.api.grpc import inference_pb2 as pb
from openmaas.api.grpc.codec import decode_infer, encode_infer
from openmaas.audit import Actor
from openmaas.errors import ErrorCode, InvalidRequest, OpenMaaSError
from openmaas.gateway.admission import CallContext
from openmaas.gateway.auth import Principal
from openmaas.gateway.service import Gateway
from openmaas.telemetry import Metrics, request_id_var

log = logging.getLogger("openmaas.access")
SERVICE = "inference.GRPCInferenceService"

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Any]]


def _version(raw: str) -> int | None:
    return views.version_number(raw or None)


class InferenceService:
    """The calls of ``GRPCInferenceService`` OpenMaaS serves, each ``async (request, context) -> response``."""

    def __init__(self, gateway: Gateway, ready: Callable[[], bool]) -> None:
        self.gw = gateway
        self.ready = ready

    async def principal(self, context: Context) -> Principal:
        """The caller, from ``authorization: Bearer <key>`` metadata, exactly as HTTP reads its header."""
        token = bearer_of(_metadata(context, "authorization"))
        cached = self.gw.auth.cached(token)
        return cached if cached is not None else await self.gw.auth.authenticate_async(token)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.ready())

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        await self.principal(context)
        return pb.ServerMetadataResponse(name="openmaas", version=__version__, extensions=views.EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        mv = self.gw.model_version(await self.principal(context), request.name, _version(request.version))
        return pb.ModelReadyResponse(ready=self.gw.preparing(mv) is None)

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        mv = self.gw.model_version(await self.principal(context), request.name, _version(request.version))
        return json_format.ParseDict(views.model_metadata(self.gw, mv), pb.ModelMetadataResponse())

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        mv = self.gw.model_version(await self.principal(context), request.name, _version(request.version))
        config = json_format.ParseDict(views.model_config(self.gw, mv), pb.ModelConfig(), ignore_unknown_fields=True)
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        who = await self.principal(context)
        entries = views.stats_entries(self.gw, who, request.name or None, _version(request.version))
        return pb.ModelStatisticsResponse(
            model_stats=[json_format.ParseDict(e, pb.ModelStatistics(), ignore_unknown_fields=True) for e in entries]
        )

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        entries = views.repository_index_entries(self.gw, await self.principal(context))
        if request.ready:
            entries = [e for e in entries if e["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    async def RepositoryModelLoad(  # noqa: N802
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        who = await self.principal(context)
        name = views.require_manage(self.gw, who, request.model_name)
        pin: bool | None = None
        if "pin" in request.parameters:
            pin = bool(request.parameters["pin"].bool_param)
        await self.gw.load(self.gw.model_version(who, name), pin=pin)
        await self.gw.audit_async(_actor(who, context), "model.load", name, org_id=who.org_id, after={"pin": pin})
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(  # noqa: N802
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        who = await self.principal(context)
        name = views.require_manage(self.gw, who, request.model_name)
        await self.gw.unload(name)
        await self.gw.audit_async(_actor(who, context), "model.unload", name, org_id=who.org_id)
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        return await self._infer(await self.principal(context), request, context)

    async def ModelStreamInfer(  # noqa: N802
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request in the stream is answered in the stream; an error is an ``error_message`` there (as in
        Triton), and the stream goes on."""
        who = await self.principal(context)
        async for request in requests:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(who, request, context))
            except OpenMaaSError as e:
                yield pb.ModelStreamInferResponse(error_message=e.message)

    async def _infer(self, who: Principal, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        mv = self.gw.model_version(who, request.model_name, _version(request.model_version))
        inference = decode_infer(request)
        limits = [t for t in (context.time_remaining(), views.timeout_parameter(inference.parameters)) if t is not None]
        inference.deadline = time.monotonic() + min(limits) if limits else None
        key = _metadata(context, "idempotency-key")
        ctx = CallContext(
            # Always minted here (usage records are keyed by it); the id echoed may be the client's x-request-id.
            request_id=secrets.token_hex(16),
            idempotency_key=key,
            fingerprint=CallContext.fingerprint_of(b"grpc:ModelInfer", request.SerializeToString()) if key else None,
        )
        response = encode_infer(await self.gw.infer(who, mv, inference, "grpc", ctx))
        # What HTTP sends as headers (idempotent-replayed, x-ratelimit-*) and the request id: trailing metadata,
        # one message with the status (sending initial metadata of its own cost each call a round of its own).
        trailing = [(k.lower(), v) for k, v in ctx.response_headers.items()]
        context.set_trailing_metadata((("x-request-id", request_id_var.get() or ctx.request_id), *trailing))
        return response


def _metadata(context: Any, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name and isinstance(value, str):
            return value
    return None


def _actor(who: Principal, context: Any) -> Actor:
    peer = context.peer() or ""
    host = peer.split(":", 1)[1].rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else None
    return Actor(kind=who.kind, key_id=who.key_id, user_id=who.user_id, client_ip=host)


def _status(code: ErrorCode) -> grpc.StatusCode:
    return grpc.StatusCode[GRPC_STATUS.get(code, "INTERNAL")]


class GrpcSurface:
    """The gRPC server: started and stopped with the HTTP server, on the same event loop."""

    def __init__(
        self, gateway: Gateway, metrics: Metrics, ready: Callable[[], bool], *, host: str, port: int, max_bytes: int
    ) -> None:
        self.service = InferenceService(gateway, ready)
        self.metrics = metrics
        self.address = f"{host}:{port}"
        self.max_bytes = max_bytes
        self._server: grpc.aio.Server | None = None
        self.port = port

    @contextlib.asynccontextmanager
    async def _call(self, name: str, context: Context) -> AsyncIterator[str]:
        """One call: its request id, one access-log line and metric, and errors as status codes (never a
        traceback for what the client sent)."""
        started = time.perf_counter()
        rid = _metadata(context, "x-request-id") or secrets.token_hex(16)
        token = request_id_var.set(rid)
        status = "OK"
        try:
            yield rid
        except OpenMaaSError as e:
            status = _status(e.code).name
            log_server_error(e)
            trailing = tuple((k.lower(), v) for k, v in (e.headers or {}).items())
            await context.abort(_status(e.code), e.message, trailing_metadata=trailing)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            log.exception("unhandled error", extra={"path": name})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal server error; request id {rid}")
        finally:
            self.metrics.http_requests_of("grpc", status).inc()
            log.info(
                "request",
                extra={
                    "method": "GRPC",
                    "path": f"/{SERVICE}/{name}",
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
            request_id_var.reset(token)

    def _unary(self, name: str, fn: Handler) -> Handler:
        async def handler(request: Any, context: Context) -> Any:
            async with self._call(name, context):
                return await fn(request, context)

        return handler

    def _stream(self, name: str, fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def handler(requests: Any, context: Context) -> AsyncIterator[Any]:
            async with self._call(name, context):
                async for item in fn(requests, context):
                    yield item

        return handler

    def handlers(self) -> grpc.GenericRpcHandler:
        s = self.service
        unary: dict[str, tuple[Handler, type[Message]]] = {
            "ServerLive": (s.ServerLive, pb.ServerLiveRequest),
            "ServerReady": (s.ServerReady, pb.ServerReadyRequest),
            "ServerMetadata": (s.ServerMetadata, pb.ServerMetadataRequest),
            "ModelReady": (s.ModelReady, pb.ModelReadyRequest),
            "ModelMetadata": (s.ModelMetadata, pb.ModelMetadataRequest),
            "ModelConfig": (s.ModelConfig, pb.ModelConfigRequest),
            "ModelStatistics": (s.ModelStatistics, pb.ModelStatisticsRequest),
            "ModelInfer": (s.ModelInfer, pb.ModelInferRequest),
            "RepositoryIndex": (s.RepositoryIndex, pb.RepositoryIndexRequest),
            "RepositoryModelLoad": (s.RepositoryModelLoad, pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": (s.RepositoryModelUnload, pb.RepositoryModelUnloadRequest),
        }
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            name: grpc.unary_unary_rpc_method_handler(
                self._unary(name, fn),
                request_deserializer=message.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )
            for name, (fn, message) in unary.items()
        }
        methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self._stream("ModelStreamInfer", s.ModelStreamInfer),
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_bytes),
                ("grpc.max_send_message_length", max(self.max_bytes, 64 << 20)),
                ("grpc.so_reuseport", 0),
            ]
        )
        server.add_generic_rpc_handlers((self.handlers(),))
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as e:
            raise InvalidRequest(f"cannot listen for gRPC on {self.address}: {e}") from None
        await server.start()
        self._server = server
        log.info("grpc listening", extra={"address": self.address})

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=5)
            self._server = None
