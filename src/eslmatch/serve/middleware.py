"""ASGI middleware of ``eslmatch serve``: body limits, the Host check, security headers.

Every request must name an allowed host in its ``Host`` header (421 otherwise), so that a
web page on another site cannot reach a local server by DNS rebinding: by default
``127.0.0.1``, ``localhost`` and ``[::1]``, plus the names given as ``allowed_hosts``.
Request bodies over their route's limit are refused (413) before anything parses them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import EslmatchError

DEFAULT_ALLOWED_HOSTS = ("127.0.0.1", "localhost", "::1")
_HOST_NAME = re.compile(r"[a-z0-9_.-]+")  # what an allowed-host entry may spell (after normalize_host)
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def normalize_host(host: str) -> str | None:
    """The host name of a ``Host`` header value or an allowed-host entry, in one canonical
    form (lowercase; an IP address as :mod:`ipaddress` writes it, IPv6 without brackets);
    ``None`` when it is not a plain ``name``, ``name:port``, ``[v6]`` or ``[v6]:port``.

    ``"LOCALHOST:8000"`` -> ``"localhost"``, ``"[0:0::1]:80"`` -> ``"::1"``, ``"::1"`` -> ``"::1"``.
    """
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[1:end], host[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            return None
    if host.count(":") > 1:  # a bare IPv6 address (allowed-host entries only; headers bracket it)
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    name, colon, port = host.partition(":")
    if not name or (colon and not port.isdigit()) or any(c in name for c in "/\\@ \t"):
        return None
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


class _BodyTooLarge(Exception):
    """Raised to the app, from ``receive``, by a body that passes its limit as it streams."""


class BodyLimitMiddleware:
    """Refuse request bodies over their limit with 413, never holding one in memory.

    ``limit``: bytes of a body; ``limit_for(path)`` may give a route its own (the uploads). A
    declared ``Content-Length`` over the limit is refused without reading the body; any other
    body is streamed to the app (a form's files are spooled to disk by its parser) and counted,
    and one that passes the limit (chunked: no declared length) is cut off there, whatever the
    app was doing, with 413 in place of the app's answer.
    """

    def __init__(self, app: ASGIApp, limit: int, limit_for: Callable[[str], int | None] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        own = self.limit_for(scope.get("path", "")) if self.limit_for else None
        limit = own or self.limit
        too_large = f"{'upload' if own else 'request body'} too large (at most {limit} bytes)"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(send, 400, "invalid Content-Length header")
                    return
                if declared > limit:
                    await send_error(send, 413, too_large)
                    return
        size, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal size, over
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:
                over = True
                raise _BodyTooLarge(too_large)
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            if not over:  # once cut off, the app's answer (a 500 for the exception, say) is dropped
                started = True
                await send(message)

        try:
            await self.app(scope, counted, sending)
        except Exception:
            if not over:
                raise
        if over and not started:
            await send_error(send, 413, too_large)


class WriteAuthMiddleware:
    """Refuse a write request (``is_write(method, path)``) whose ``Authorization`` header
    ``refusal`` turns down, before its body is read: an unauthenticated upload costs the
    server no memory (issue 34 D1: two such uploads took 4 GB)."""

    def __init__(
        self,
        app: ASGIApp,
        is_write: Callable[[str, str], bool],
        refusal: Callable[[str], tuple[int, str, dict[str, str]] | None],
    ) -> None:
        self.app, self.is_write, self.refusal = app, is_write, refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.is_write(scope.get("method", ""), scope.get("path", "")):
            given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
            refused = self.refusal(given.decode("latin-1"))
            if refused is not None:
                status, message, headers = refused
                await send_error(send, status, message, headers)
                return
        await self.app(scope, receive, send)


class HostRules:
    """Which ``Host`` header values a server answers (see :class:`HostCheckMiddleware`).

    ``allowed``: host names or IP addresses (a port, brackets around IPv6, case: ignored);
    ``"*"`` admits every host; an unspecified address (``0.0.0.0``, ``::``: the server
    listens on every interface) admits any IP address literal. Raises
    :class:`EslmatchError` for an entry that is not a host name or address.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        names: set[str] = set()
        for entry in allowed:
            if entry.strip() == "*":
                names.add("*")
                continue
            name = normalize_host(entry)
            if name is None or not (_HOST_NAME.fullmatch(name) or _is_ip_literal(name)):
                raise EslmatchError(f"allowed host {entry!r} is not a host name or IP address")
            names.add(name)
        self.any_host = "*" in names
        self.any_address = bool(names & {"0.0.0.0", "::"})
        self.names = frozenset(names)
        self._seen: dict[bytes, bool] = {}  # raw Host value -> verdict, bounded below

    def allows(self, raw: bytes | None) -> bool:
        """Whether a raw ``Host`` header value (``None``: absent) names an allowed host."""
        if self.any_host:
            return True
        if raw is None:
            return False
        verdict = self._seen.get(raw)
        if verdict is None:
            name = normalize_host(raw.decode("latin-1"))
            verdict = name is not None and (name in self.names or (self.any_address and _is_ip_literal(name)))
            if len(self._seen) < 256:  # a handful of distinct values in practice; never grows unbounded
                self._seen[raw] = verdict
        return verdict


class HostCheckMiddleware:
    """Answer 421 to a request whose ``Host`` header names no allowed host (DNS rebinding).

    A page on another site that rebinds its own domain name to 127.0.0.1 can make the
    browser send requests to a local server, and read the answers; those requests carry the
    attacker's name in ``Host``, which a rebinding page cannot change. The check is a
    dictionary lookup per request.
    """

    def __init__(self, app: ASGIApp, rules: HostRules) -> None:
        self.app = app
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw = next((value for name, value in scope.get("headers", ()) if name == b"host"), None)
        if not self.rules.allows(raw):
            message = "missing Host header" if raw is None else "Host not allowed"
            await send_error(send, 421, f"{message}; start the server with --allowed-host NAME to accept a name")
            return
        await self.app(scope, receive, send)


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class SecurityHeadersMiddleware:
    """Headers that keep the page and API self-contained (no inline script, no sniffing)."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"content-security-policy", CSP.encode()),
    ]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = JSONResponse({"error": message}).body
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
