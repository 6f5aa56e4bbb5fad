"""OpenAI-compatible text generation and speech: /v1/completions, /v1/chat/completions (with streaming) and
/v1/audio/transcriptions.

A streamed answer counts the tokens of each chunk once the chunk has been handed to the server for sending; however
the stream ends (finished, length, stop sequence, client gone, runtime error) the call is settled exactly once with
that count, and the usage record's ``outcome`` says how it ended.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from openmaas.api.deps import GatewayDep, PrincipalDep, call_context, principal
from openmaas.api.openai import parse_body
from openmaas.api.responses import JSONResponse, dumps
from openmaas.entities.speech import Transcript
from openmaas.errors import ErrorCode, InvalidRequest, OpenMaaSError
from openmaas.gateway.auth import Principal
from openmaas.gateway.service import Gateway, GenerationCall
from openmaas.serving.backend import GenerationSpec

MAX_STOP = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generate(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def checked(self) -> tuple[int | None, dict[str, Any]]:
        """max_tokens and the sampling parameters; what cannot be honoured is refused by name."""
        if self.n != 1:
            raise InvalidRequest(f"n={self.n} is not supported: one choice per request (n=1)", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise InvalidRequest(f"'stop' takes 1 to {MAX_STOP} non-empty strings", param="stop")
        for name in ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "response_format"):
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, {}, []):
                raise InvalidRequest(f"'{name}' is not supported by this server", param=name)
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "stop": stop}
        return self.max_tokens, sampling


class CompletionRequest(_Generate):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Generate):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"messages[{index}]: only text content parts are supported", param=f"messages.{index}.content"
            )
        parts.append(part["text"])
    return "".join(parts)


def router(audio_max_seconds: float) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(principal)])

    @r.post("/completions", openapi_extra=_schema(CompletionRequest))
    async def completions(request: Request, gw: GatewayDep, who: PrincipalDep) -> Response:
        body = await parse_body(request, CompletionRequest)
        if body.echo or body.suffix:
            raise InvalidRequest("'echo' and 'suffix' are not supported", param="echo" if body.echo else "suffix")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise InvalidRequest("send one prompt per request (a list of prompts is not supported)", param="prompt")
        shape = _Shape("cmpl", "text_completion", body.model, chat=False)
        return await _answer(request, gw, who, body, shape, prompt=prompts[0])

    @r.post("/chat/completions", openapi_extra=_schema(ChatRequest))
    async def chat_completions(request: Request, gw: GatewayDep, who: PrincipalDep) -> Response:
        body = await parse_body(request, ChatRequest)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m, i)}
            for i, m in enumerate(body.messages)
        ]
        shape = _Shape("chatcmpl", "chat.completion", body.model, chat=True)
        return await _answer(request, gw, who, body, shape, messages=messages, max_tokens=body.max_completion_tokens)

    @r.post("/audio/transcriptions")
    async def transcriptions(request: Request, gw: GatewayDep, who: PrincipalDep) -> Response:
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("send the audio as a multipart file field named 'file'", param="file")
        model = form.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required", param="model")
        response_format = str(form.get("response_format") or "json")
        if response_format not in ("json", "text", "verbose_json", "srt", "vtt"):
            raise InvalidRequest(
                "response_format must be json, text, verbose_json, srt or vtt", param="response_format"
            )
        try:
            temperature = float(str(form.get("temperature") or 0))
        except ValueError:
            raise InvalidRequest("temperature must be a number", param="temperature") from None
        if not 0 <= temperature <= 1:
            raise InvalidRequest("temperature must be between 0 and 1", param="temperature")
        language = str(form.get("language") or "") or None
        prompt = str(form.get("prompt") or "") or None
        audio = await upload.read()
        ctx = call_context(request, audio, model.encode(), response_format.encode(), str(language).encode())
        transcript = await gw.transcribe(
            who,
            gw.model_version(who, model),
            audio,
            language=language,
            prompt=prompt,
            temperature=temperature,
            max_seconds=audio_max_seconds,
            protocol="openai",
            ctx=ctx,
        )
        return _transcript_response(transcript, response_format, ctx.response_headers)

    return r


async def _answer(
    request: Request,
    gw: Gateway,
    who: Principal,
    body: _Generate,
    shape: _Shape,
    *,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    max_tokens: int | None = None,
) -> Response:
    """Admit the generation, then stream it or wait for all of it (``max_tokens`` overrides the body's)."""
    body_max_tokens, sampling = body.checked()
    if max_tokens is None:
        max_tokens = body_max_tokens
    ctx = call_context(request, await request.body())
    spec = GenerationSpec(prompt=prompt, messages=messages, max_tokens=max_tokens, sampling=sampling)
    call = await gw.generate(who, gw.model_version(who, body.model), spec, "openai", ctx)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(call, shape, usage, ctx.response_headers)
    return await _whole(call, shape, ctx.response_headers)


class _Shape:
    """The envelope of one answer: ids, object names and how a piece of text is wrapped."""

    def __init__(self, prefix: str, kind: str, model: str, *, chat: bool) -> None:
        self.id = ""
        self.prefix, self.kind, self.model, self.chat = prefix, kind, model, chat
        self.created = int(time.time())

    def envelope(self, call: GenerationCall, chunk: bool) -> dict[str, Any]:
        return {
            "id": f"{self.prefix}-{call.ctx.request_id}",
            "object": f"{self.kind}.chunk" if chunk and self.chat else self.kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": f"{call.mv.model}-v{call.mv.version}",
        }

    def choice(self, text: str | None, finish: str | None, *, chunk: bool, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }


def _usage(call: GenerationCall) -> dict[str, int]:
    return {
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.delivered,
        "total_tokens": call.prompt_tokens + call.delivered,
    }


async def _whole(call: GenerationCall, shape: _Shape, headers: dict[str, str]) -> Response:
    """Wait for the whole answer; settled (metered) before it is sent, so a metering failure withholds it."""
    parts: list[str] = []
    outcome, tokens = "disconnected", 0
    try:
        async for event in call.events():
            parts.append(event.text)
            tokens += event.tokens
            if event.finish_reason is not None:
                outcome = event.finish_reason
                if event.finish_reason == "error":  # the client gets an error, not the partial text
                    raise OpenMaaSError(f"the model failed while generating: {event.error}", code=ErrorCode.INTERNAL)
                call.delivered = tokens
    finally:
        with anyio.CancelScope(shield=True):
            await call.finish(outcome)
    body = shape.envelope(call, chunk=False) | {
        "choices": [shape.choice("".join(parts), outcome, chunk=False)],
        "usage": _usage(call),
    }
    return JSONResponse(body, headers=headers)


def _stream(call: GenerationCall, shape: _Shape, include_usage: bool, headers: dict[str, str]) -> Response:
    def sse(payload: dict[str, Any]) -> bytes:
        return b"data: " + dumps(payload) + b"\n\n"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        payload = shape.envelope(call, chunk=True) | {"choices": choices}
        if include_usage:
            payload["usage"] = usage
        return sse(payload)

    async def body() -> AsyncIterator[bytes]:
        outcome = "disconnected"
        try:
            if shape.chat:
                yield chunk([shape.choice(None, None, chunk=True, first=True)])
            async for event in call.events():
                if event.finish_reason == "error":
                    outcome = "error"
                    yield sse({"error": {"message": event.error or "generation failed", "type": "server_error"}})
                    return
                if event.text:
                    yield chunk([shape.choice(event.text, None, chunk=True)])
                call.delivered += event.tokens  # handed to the server: the client has it (or is gone)
                if event.finish_reason is not None:
                    outcome = event.finish_reason
                    yield chunk([shape.choice(None, event.finish_reason, chunk=True)])
            if include_usage:
                yield chunk([], _usage(call))
            yield b"data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):
                await call.finish(outcome)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _timestamp(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def _transcript_response(t: Transcript, fmt: str, headers: dict[str, str]) -> Response:
    usage = {"type": "duration", "seconds": math.ceil(t.duration)}  # what is metered
    if fmt == "json":
        return JSONResponse({"text": t.text, "usage": usage}, headers=headers)
    if fmt == "text":
        return PlainTextResponse(t.text + "\n", headers=headers)
    if fmt == "verbose_json":
        return JSONResponse(
            {
                "task": "transcribe",
                "language": t.language,
                "duration": round(t.duration, 3),
                "text": t.text,
                "segments": [
                    {"id": i, "start": s.start, "end": s.end, "text": s.text} for i, s in enumerate(t.segments)
                ],
                "usage": usage,
            },
            headers=headers,
        )
    if fmt == "srt":
        blocks = [
            f"{i + 1}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n"
            for i, s in enumerate(t.segments)
        ]
        return PlainTextResponse("\n".join(blocks), headers=headers, media_type="application/x-subrip")
    blocks = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in t.segments]
    return PlainTextResponse("WEBVTT\n\n" + "\n".join(blocks), headers=headers, media_type="text/vtt")
