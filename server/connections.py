"""How the HTTP process holds connections: uvicorn's settings from ours (the proxies whose
X-Forwarded-For is trusted, concurrency and header-size limits, keep-alive), and a deadline for each
request's head and body, which uvicorn does not have: a connection that trickles its head or its
body is closed instead of held for ever."""

from __future__ import annotations

import asyncio

import h11
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from uvicorn import Config
from uvicorn.protocols.http.h11_impl import H11Protocol

from config.settings import Settings


def uvicorn_config(app: FastAPI, settings: Settings) -> Config:
    proxies = settings.trusted_proxies
    return Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                  timeout_graceful_shutdown=settings.shutdown_grace_s + 1, http=timed_protocol(settings.header_timeout_s),
                  proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None,
                  limit_concurrency=settings.limit_concurrency or None, timeout_keep_alive=settings.keep_alive_s,
                  h11_max_incomplete_event_size=settings.max_header_bytes)


def timed_protocol(header_timeout_s: float) -> type[H11Protocol]:
    class HeadDeadline(H11Protocol):
        """uvicorn's h11 protocol; a request head that has not arrived within header_timeout_s of the
        connection (or of its last response) closes it, and so does a response sent before the body
        that it answers has fully arrived (the body deadline's 408). uvicorn alone times out only
        idle keep-alive connections, and a request's first byte stops that timer."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_overdue)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.SEND_BODY:  # answered before its body came: the rest is not read
                self.transport.close()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_overdue)

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _head_overdue(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


def body_deadline(receive, seconds: float):
    """`receive` for an ASGI app, raising a 408 once the request body has taken `seconds` to arrive
    (after the body, receive waits as it is: a stream waits there for the client to go away)."""
    deadline, complete = None, False

    async def timed():
        nonlocal deadline, complete
        if complete:
            return await receive()
        deadline = deadline or asyncio.get_running_loop().time() + seconds
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise HTTPException(408, f"the request body did not arrive within {seconds:g} s") from None
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return timed
