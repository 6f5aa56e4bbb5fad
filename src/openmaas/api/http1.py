"""uvicorn's HTTP/1.1 protocol with a response's writes sent together.

uvicorn writes a response's status line and headers when the app sends ``http.response.start`` and the body when
it sends ``http.response.body``: two ``send`` system calls and two TCP segments for every response, and the client
wakes up twice to read them. Under many small requests (an embedding, a v2 tensor) that second send is a measurable
part of the server's and the client's CPU per request. ``CoalescingTransport`` holds what is written during one
turn of the event loop and sends it at the end of the turn in one call; nothing else about the protocol changes
(flow control, keep-alive, upgrades and closing are uvicorn's own).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

#: Writes of a turn are joined into one only up to this many bytes in all.
JOIN_LIMIT = 64 * 1024


class CoalescingTransport:
    """A transport whose writes made in one turn of the event loop leave in one ``write`` of the real transport
    (scheduled with ``call_soon`` at the first write of the turn); ``close`` sends what is held first. Everything
    else is the real transport's."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = [data]
            self._loop.call_soon(self._flush)
        else:
            self._held.append(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if not held or self._transport.is_closing():
            return
        if len(held) == 1:
            self._transport.write(held[0])
        elif sum(len(part) for part in held) <= JOIN_LIMIT:
            self._transport.write(b"".join(held))
        else:  # a large body: a copy of it would cost more than the system calls saved
            for part in held:
                self._transport.write(part)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def protocol_class() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol (its h11 one where httptools is missing) on a ``CoalescingTransport``."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - httptools ships with uvicorn[standard], a dependency
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class CoalescingProtocol(Base):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            # Not a subclass of asyncio.Transport: its base methods would shadow the delegation to the real one.
            super().connection_made(cast(asyncio.Transport, CoalescingTransport(transport, self.loop)))

    return CoalescingProtocol
