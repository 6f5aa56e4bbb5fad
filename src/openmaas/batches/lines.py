"""A batch's input file, checked the way OpenAI checks one: pure functions, no I/O.

A file is JSON Lines, one request a line: ``{"custom_id", "method": "POST", "url", "body"}``. Every problem is
collected (up to ``MAX_ERRORS``) with its 1-based line number, so a user fixes the whole file in one go; a batch
with any problem fails before anything runs or is charged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

MAX_LINES = 50_000
MAX_BYTES = 200 * 1024 * 1024
MAX_ERRORS = 100
MAX_CUSTOM_ID = 512
#: The endpoints a batch may target; /v2 takes a model's Open Inference Protocol infer URL.
OPENAI_ENDPOINTS = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions")
V2_ENDPOINT = re.compile(
    r"^/v2/models/(?P<model>[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)?)(?:/versions/(?P<version>\d+))?/infer$"
)
_WINDOW = re.compile(r"^(?P<n>[1-9]\d*)(?P<unit>[smh])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_S = 24 * 3600


@dataclass(frozen=True)
class Line:
    """One request of a batch: its 1-based line number, the caller's id for it, and the body to send."""

    number: int
    custom_id: str
    body: bytes


@dataclass(frozen=True)
class Checked:
    lines: list[Line]
    model: str


@dataclass(frozen=True)
class LineError:
    code: str
    message: str
    line: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": None, "line": self.line}


class InvalidBatch(Exception):
    """The input file cannot run: every problem found, each with its line."""

    def __init__(self, errors: list[LineError]) -> None:
        super().__init__("; ".join(e.message for e in errors[:3]))
        self.errors = errors


def endpoint_error(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be a batch's endpoint (None when it can)."""
    if endpoint in OPENAI_ENDPOINTS or V2_ENDPOINT.match(endpoint):
        return None
    return (
        f"endpoint '{endpoint}' cannot run as a batch; use one of {', '.join(OPENAI_ENDPOINTS)} "
        "or /v2/models/{model}/infer"
    )


def window_seconds(window: str) -> int:
    """Seconds a completion window allows ("24h" as OpenAI, or a shorter "90m", "30s"); ValueError if invalid."""
    m = _WINDOW.match(window)
    if m is None:
        raise ValueError(f"completion_window '{window}' is not a duration like 24h, 90m or 30s")
    seconds = int(m["n"]) * _SECONDS[m["unit"]]
    if seconds > MAX_WINDOW_S:
        raise ValueError(f"completion_window '{window}' is longer than 24h")
    return seconds


def check(data: bytes, endpoint: str) -> Checked:
    """The lines of an input file for ``endpoint``, or ``InvalidBatch`` with every problem found."""
    errors: list[LineError] = []

    def fail(code: str, message: str, line: int | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append(LineError(code, message, line))

    if len(data) > MAX_BYTES:
        raise InvalidBatch(
            [
                LineError(
                    "file_too_large", f"the input file has {len(data):,} bytes; a batch takes at most {MAX_BYTES:,}"
                )
            ]
        )
    raw_lines = data.split(b"\n")
    numbered = [(i + 1, raw) for i, raw in enumerate(raw_lines) if raw.strip()]
    if not numbered:
        raise InvalidBatch([LineError("empty_file", "the input file has no requests")])
    if len(numbered) > MAX_LINES:
        raise InvalidBatch(
            [
                LineError(
                    "too_many_requests",
                    f"the input file has {len(numbered):,} requests; a batch takes at most {MAX_LINES:,}",
                )
            ]
        )
    v2 = V2_ENDPOINT.match(endpoint)
    models: dict[str, int] = {}
    seen: dict[str, int] = {}
    lines: list[Line] = []
    for number, raw in numbered:
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            fail("invalid_json_line", f"line {number} is not valid JSON: {e}", number)
            continue
        if not isinstance(item, dict):
            fail("invalid_request", f"line {number} must be a JSON object", number)
            continue
        missing = [k for k in ("custom_id", "method", "url", "body") if k not in item]
        if missing:
            fail("missing_required_parameter", f"line {number} has no {', '.join(missing)}", number)
            continue
        unknown = sorted(set(item) - {"custom_id", "method", "url", "body"})
        if unknown:
            fail("invalid_request", f"line {number} has unknown fields: {', '.join(unknown)}", number)
            continue
        custom_id, method, url, body = item["custom_id"], item["method"], item["url"], item["body"]
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            fail(
                "invalid_custom_id",
                f"line {number}: custom_id must be a string of 1-{MAX_CUSTOM_ID} characters",
                number,
            )
            continue
        if custom_id in seen:
            fail(
                "duplicate_custom_id",
                f"line {number}: custom_id '{custom_id}' is also on line {seen[custom_id]}; each must be unique",
                number,
            )
            continue
        seen[custom_id] = number
        if method != "POST":
            fail("invalid_method", f"line {number}: method must be POST, not {method!r}", number)
            continue
        if url != endpoint:
            fail(
                "mismatched_endpoint",
                f"line {number}: url '{url}' differs from the batch's endpoint '{endpoint}'",
                number,
            )
            continue
        if not isinstance(body, dict):
            fail("invalid_body", f"line {number}: body must be a JSON object", number)
            continue
        if v2 is None:
            model = body.get("model")
            if not isinstance(model, str) or not model:
                fail("missing_model", f"line {number}: body has no 'model'", number)
                continue
            if body.get("stream"):
                fail("invalid_body", f"line {number}: a batch line cannot stream ('stream': true)", number)
                continue
            models.setdefault(model, number)
        lines.append(Line(number, custom_id, orjson.dumps(body)))
    if len(models) > 1:
        names = sorted(models, key=models.__getitem__)
        fail(
            "mismatched_model",
            f"a batch runs one model; the file names {len(names)}: {', '.join(names[:5])} "
            f"('{names[1]}' first on line {models[names[1]]})",
            models[names[1]],
        )
    if errors:
        raise InvalidBatch(errors)
    model = v2["model"] if v2 is not None else next(iter(models))
    return Checked(lines, model)
