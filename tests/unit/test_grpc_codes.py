"""Every error code has a gRPC status (one table, api/errors.py), and client errors never map to INTERNAL."""

from __future__ import annotations

import grpc

from openmaas.api.errors import GRPC_STATUS
from openmaas.errors import STATUS, ErrorCode


def test_every_error_code_has_a_grpc_status() -> None:
    assert set(GRPC_STATUS) == set(ErrorCode)
    for code, name in GRPC_STATUS.items():
        status = grpc.StatusCode[name]
        if 400 <= STATUS[code] < 500:
            assert status not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), code
