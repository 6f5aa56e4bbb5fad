"""The ``{name:model}`` path parameter: a model's full name, ``org/name`` or a bare name, in one URL segment pair.

A model name holds at most one slash, and its own part is never a word that follows it in URLs (``ready``,
``versions``, ``infer`` ...: ``entities.models.RESERVED_NAMES``), so ``/v2/models/acme/wine/ready`` is the
readiness of ``acme/wine`` and ``/v2/models/wine/ready`` that of ``wine``, whatever the order of the routes."""

from __future__ import annotations

import re

from starlette.convertors import Convertor, register_url_convertor

from openmaas.entities.models import RESERVED_NAMES

_SEGMENT = r"[^/]+"
_NOT_RESERVED = "(?!(?:" + "|".join(sorted(RESERVED_NAMES)) + ")(?:/|$))"


class ModelNameConvertor(Convertor[str]):
    regex = f"{_SEGMENT}(?:/{_NOT_RESERVED}{_SEGMENT})?"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model", ModelNameConvertor())

#: POST /v2/models/{model}[/versions/{version}]/infer, for the hot path (``api/hot.py``).
V2_INFER_PATH = re.compile(
    rf"^/v2/models/(?P<model>{ModelNameConvertor.regex})(?:/versions/(?P<version>[^/]+))?/infer$"
)
