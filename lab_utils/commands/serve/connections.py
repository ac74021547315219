"""What stands between a socket and the app: which Host headers the server answers, and how long it waits on a
client (``serve.allowed_hosts`` and ``serve.connections`` in ``conf/serve.yaml``).

    HostCheck             ASGI: a request whose Host header names no host this server answers to is 400 (a web page
                          that rebinds its own DNS name to 127.0.0.1 cannot drive a server on this machine)
    BodyTimeout           ASGI: a request body must arrive within ``body_timeout_s`` of its headers, else 408
    HeaderTimeoutProtocol uvicorn's h11 protocol with a deadline on a request's headers (uvicorn has none: a client
                          that sends half its headers holds its connection for ever), else 408
    server_config         the uvicorn.Config of ``genlab serve``: the three above and the keep-alive timeout

``create_app`` adds ``BodyTimeout``; ``server_config`` wraps the app in ``HostCheck`` (the tests that drive the app
through FastAPI's test client, whose Host is ``testserver``, wrap it themselves with :func:`check_hosts`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
import uvicorn
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from .models import ServeConfig

Scope = Message = MutableMapping[str, Any]  # ASGI's (as starlette.types names them)
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # as a Host header writes them
ANY_INTERFACE = ("0.0.0.0", "::", "")


# ------------------------------------------------------------------------------------ the Host header
def accepted_hosts(host: str, allowed: list[str]) -> list[str] | None:
    """The Host names (without port; IPv6 in brackets) a server bound to ``host`` answers to; None: any.

    Bound to loopback: its own names and ``allowed``. Bound to one address: that address and ``allowed``. Bound to
    every interface (0.0.0.0, ::): any name, unless ``allowed`` lists some (then those and loopback's)."""
    if "*" in allowed or (host in ANY_INTERFACE and not allowed):
        return None
    if host in LOOPBACK or host in ANY_INTERFACE:
        names = list(LOOPBACK_NAMES)
    else:
        names = [f"[{host}]" if ":" in host else host]
    return list(dict.fromkeys(name.lower() for name in [*names, *allowed]))


def host_name(header: str) -> str:
    """The host of a Host header, without its port: ``[::1]:8000`` -> ``[::1]``, ``Example:80`` -> ``example``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """Answers 400 to an HTTP request whose Host header is not one of ``hosts`` (None: every request passes)."""

    def __init__(self, app: ASGIApp, hosts: list[str] | None):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.hosts is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), "")
        if host_name(header) in self.hosts:
            await self.app(scope, receive, send)
            return
        detail = (f"Host {header!r} is not a name of this server (it answers to {', '.join(self.hosts)}): open it "
                  "by one of those, or start it with allowed_hosts=[<name>]")
        await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)


def check_hosts(app: ASGIApp, config: ServeConfig) -> HostCheck:
    return HostCheck(app, accepted_hosts(config.host, config.allowed_hosts))


# ------------------------------------------------------------------------------------ the body
class BodyTimeout:
    """A request's body must arrive within ``seconds`` of its headers: a client that stops half-way is answered 408
    (FastAPI's handler of an HTTPException raised while it reads the body) and its connection closed."""

    def __init__(self, app: ASGIApp, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        state = {"body_done": False, "responding": False}

        async def timed_receive() -> Message:
            if state["body_done"] or state["responding"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.seconds:g} s; send it "
                                         "whole, with a Content-Length that matches it",
                                    headers={"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def watched_send(message: Message) -> None:
            state["responding"] = True
            await send(message)

        await self.app(scope, timed_receive, watched_send)


# ------------------------------------------------------------------------------------ the headers
class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, and a request's headers must all arrive within ``header_timeout_s`` of the first byte
    of the request (or of the connection): else a 408 if part of them came, and the connection is closed. (h11 keeps
    the client ``IDLE`` until a whole request head has arrived; uvicorn's keep-alive timer covers the idle time
    between two requests only until the next byte.)"""

    header_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait_for_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._wait_for_head()  # (part of) the next request's head: the clock runs from its first byte
        else:
            self._stop_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _wait_for_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        partial, _ = self.conn.trailing_data
        if partial:  # nothing at all: close quietly (a browser's preconnected socket)
            body = json.dumps({"detail": f"the request headers did not arrive within {self.header_timeout_s:g} s; "
                                         "send the whole request at once"}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def server_config(config: ServeConfig, app: ASGIApp, **uvicorn_options: Any) -> uvicorn.Config:
    """How ``genlab serve`` runs ``app`` (from ``create_app(config, ...)``): behind :class:`HostCheck`, with h11 and
    the header deadline, and ``connections.keep_alive_s``."""
    protocol = type("GenlabH11Protocol", (HeaderTimeoutProtocol,),
                    {"header_timeout_s": config.connections.header_timeout_s})
    return uvicorn.Config(check_hosts(app, config), host=config.host, port=config.port, http=protocol,
                          timeout_keep_alive=config.connections.keep_alive_s,  # type: ignore[arg-type] (a float)
                          **{"log_level": "warning", **uvicorn_options})
