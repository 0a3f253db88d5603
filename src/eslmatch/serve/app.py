"""The FastAPI application behind ``eslmatch serve``.

Endpoints (all errors are JSON ``{"error": "one line"}`` with a 4xx/5xx status):

- ``POST /search`` ``{"text", "k", "rerank_k"}`` -> ranked gallery items with scores.
- ``GET|POST /attention`` (``text``, ``id``) -> the word-by-region attention of one item,
  ``weights (W, R)`` and the region ``grid (h, w)`` for drawing a heat-map.
- ``GET /image/{id}`` -> the image file the index records for that id (looked up, never
  joined from the request).
- ``GET /healthz``, ``GET /`` (the search page) and ``/static/*``.

Model inference runs on one dedicated worker thread, so requests never run the model
concurrently; at most ``ServeConfig.max_pending`` inference jobs wait, beyond that the
server answers 503 at once instead of piling up work.

Every request must name an allowed host in its ``Host`` header (421 otherwise), so that a
web page on another site cannot reach a local server by DNS rebinding: by default
``127.0.0.1``, ``localhost`` and ``[::1]``, plus the names given to
:func:`create_app` as ``allowed_hosts`` (``eslmatch serve`` adds its ``--host`` and every
``--allowed-host``). Text fields must be valid Unicode: a JSON lone surrogate
(``"\\ud800"``) is answered 422.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import mimetypes
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import EslmatchError
from ..factory import load_model
from ..retrieval import GalleryIndex

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_ID_CHARS = 1024
# Only files with these types are served from /image (defence in depth on top of the id lookup).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"}
# Host names every server answers to; ``create_app(allowed_hosts=...)`` adds more.
DEFAULT_ALLOWED_HOSTS = ("127.0.0.1", "localhost", "::1")
_HOST_NAME = re.compile(r"[a-z0-9_.-]+")  # what an allowed-host entry may spell (after normalize_host)
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


@dataclass(frozen=True)
class ServeConfig:
    """Limits on what one request may ask for."""

    max_text_chars: int = 1000
    max_body_bytes: int = 64 * 1024
    max_k: int = 1000
    max_rerank_k: int = 2000
    default_k: int = 10
    default_rerank_k: int = 100
    max_pending: int = 256  # queued inference jobs before answering 503

    def __post_init__(self) -> None:
        for name in ("max_text_chars", "max_body_bytes", "max_k", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_rerank_k < 0:
            raise ValueError(f"ServeConfig.max_rerank_k must be >= 0 (got {self.max_rerank_k})")


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    k: int | None = None
    rerank_k: int | None = None


class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    id: str


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-testable without a server)


def check_unicode(value: str, name: str, status: int = 422) -> str:
    """``value`` unchanged; :class:`ApiError` when it holds a lone surrogate.

    JSON can spell a lone UTF-16 surrogate (``"\\ud800"``), and Python decodes it into a
    ``str`` that cannot be encoded as UTF-8, which the tokenizer and the JSON response would
    later fail on. Such a string is refused up front, without echoing it.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(status, f"{name} is not valid Unicode (lone surrogate)") from None
    return value


def check_text(text: str, config: ServeConfig) -> str:
    """The query stripped; :class:`ApiError` 422 when empty, longer than the limit or not
    valid Unicode (a lone surrogate)."""
    if len(text) > config.max_text_chars:
        raise ApiError(422, f"text is too long ({len(text)} characters, at most {config.max_text_chars})")
    check_unicode(text, "text")
    stripped = text.strip()
    if not stripped:
        raise ApiError(422, "text must not be empty")
    return stripped


def check_counts(k: int | None, rerank_k: int | None, config: ServeConfig) -> tuple[int, int]:
    """``(k, rerank_k)`` with defaults filled in; :class:`ApiError` 422 when out of range."""
    k = config.default_k if k is None else k
    rerank_k = config.default_rerank_k if rerank_k is None else rerank_k
    if not 1 <= k <= config.max_k:
        raise ApiError(422, f"k must be between 1 and {config.max_k} (got {k})")
    if not 0 <= rerank_k <= config.max_rerank_k:
        raise ApiError(422, f"rerank_k must be between 0 and {config.max_rerank_k} (got {rerank_k})")
    return k, rerank_k


def image_url(item_id: str) -> str:
    """The URL of ``GET /image/{id}``; the id is percent-encoded whole (slashes included)."""
    return "/image/" + quote(item_id, safe="")


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line, without echoing the input."""
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return "invalid request: the body is not valid JSON"
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(parts[:5]) if parts else "invalid request"
    # A field name from the request may hold a lone surrogate; keep the answer encodable.
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


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


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# ASGI middleware


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413 before anything parses them.

    A declared ``Content-Length`` over the limit is refused without reading the body; a
    body without one (chunked) is read only up to the limit, then replayed to the app.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "invalid Content-Length header")
                    return
                if declared > self.limit:
                    await _send_error(send, 413, f"request body too large (at most {self.limit} bytes)")
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await _send_error(send, 413, f"request body too large (at most {self.limit} bytes)")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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
            await _send_error(send, 421, f"{message}; start the server with --allowed-host NAME to accept a name")
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


async def _send_error(send: Send, status: int, message: str) -> None:
    body = JSONResponse({"error": message}).body
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# The application


class Gallery:
    """The index and model behind the server, with inference confined to one thread."""

    def __init__(self, index: Any, model: Any, model_name: str, config: ServeConfig) -> None:
        self.index = index
        self.model = model
        self.model_name = model_name
        self.config = config
        # A remote gallery (Milvus) answers membership itself; a file index lists its ids here.
        self._contains: Callable[[str], bool] | None = getattr(index, "contains", None)
        self.ids: list[str] = [] if self._contains else [str(i) for i in index.ids]
        self._known = set(self.ids)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eslmatch-infer")
        self._pending = 0  # touched only from the event loop thread

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    @property
    def count(self) -> int:
        """Items in the gallery (a remote one's current count)."""
        return int(self.index.count) if self._contains else len(self.ids)

    def known(self, item_id: str) -> bool:
        return self._contains(item_id) if self._contains else item_id in self._known

    async def infer(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the inference thread; 503 when too many jobs already wait."""
        if self._pending >= self.config.max_pending:
            raise ApiError(503, "server busy, try again shortly")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, _no_grad(fn))
        finally:
            self._pending -= 1

    def image_file(self, item_id: str) -> Path | None:
        """The recorded image file of a known id, when it exists and is an image."""
        if not self.known(item_id):
            return None
        recorded = self.index.image_path(item_id)
        if not recorded:
            return None
        path = Path(recorded).resolve()
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            return None
        return path


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def create_app(
    index: Any,
    model: Any,
    config: ServeConfig | None = None,
    model_name: str = "",
    allowed_hosts: Iterable[str] = (),
) -> FastAPI:
    """The FastAPI app serving ``index`` (an opened gallery index) with ``model``.

    ``index`` needs ``ids``, ``search_text(model, text, k, rerank_k) -> list[Hit]``,
    ``attention(model, text, id) -> (words, weights (W, R), grid (h, w) | None)`` and
    ``image_path(id) -> str | None`` (the :class:`eslmatch.retrieval.GalleryIndex` API); an
    index with ``contains(id) -> bool`` and ``count`` (a Milvus gallery) is not asked for ``ids``.

    Requests must carry a ``Host`` header naming ``127.0.0.1``, ``localhost``, ``[::1]`` or
    one of ``allowed_hosts`` (names or IP addresses, any port; ``"*"``: every host;
    ``0.0.0.0`` or ``::``: any IP address literal), else they are answered 421. Raises
    :class:`EslmatchError` for an entry that is not a host name.
    """
    config = config or ServeConfig()
    host_rules = HostRules([*DEFAULT_ALLOWED_HOSTS, *allowed_hosts])  # bad entries fail here, not on a request
    gallery = Gallery(index, model, model_name, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        yield
        gallery.close()

    app = FastAPI(title="eslmatch", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.gallery = gallery

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(EslmatchError)
    async def _library_error(request: Request, exc: EslmatchError) -> JSONResponse:
        # The library refuses this query (e.g. a text the tokenizer cannot encode).
        lines = str(exc).strip().splitlines()
        status = int(getattr(exc, "http_status", 422))  # 503: a backing store (Milvus) is unreachable
        return JSONResponse({"error": lines[0] if lines else type(exc).__name__}, status_code=status)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "items": gallery.count, "model": gallery.model_name}

    @app.post("/search")
    async def search(req: SearchRequest) -> dict[str, Any]:
        text = check_text(req.text, config)
        k, rerank_k = check_counts(req.k, req.rerank_k, config)
        start = time.perf_counter()
        hits = await gallery.infer(lambda: gallery.index.search_text(gallery.model, text, k=k, rerank_k=rerank_k))
        took_ms = (time.perf_counter() - start) * 1000.0
        results = [
            {
                "rank": int(h.rank),
                "id": str(h.id),
                "score": _finite(h.score),
                "first_stage_score": _finite(getattr(h, "first_stage_score", None)),
                "image_url": image_url(str(h.id)) if gallery.image_file(str(h.id)) else None,
            }
            for h in hits
        ]
        return {"query": text, "results": results, "took_ms": round(took_ms, 3)}

    async def attention(text: str, item_id: str) -> dict[str, Any]:
        text = check_text(text, config)
        check_unicode(item_id, "id")
        if len(item_id) > MAX_ID_CHARS or not gallery.known(item_id):
            raise ApiError(404, "unknown id")
        start = time.perf_counter()
        words, weights, grid = await gallery.infer(lambda: gallery.index.attention(gallery.model, text, item_id))
        took_ms = (time.perf_counter() - start) * 1000.0
        rows = [[_finite(v) or 0.0 for v in row] for row in _as_rows(weights)]
        return {
            "query": text,
            "id": item_id,
            "words": [str(w) for w in words],
            "weights": rows,
            "grid": [int(grid[0]), int(grid[1])] if grid is not None else None,
            "image_url": image_url(item_id) if gallery.image_file(item_id) else None,
            "took_ms": round(took_ms, 3),
        }

    @app.get("/attention")
    async def attention_get(text: str, id: str) -> dict[str, Any]:  # noqa: A002 - the API's name
        return await attention(text, id)

    @app.post("/attention")
    async def attention_post(req: AttentionRequest) -> dict[str, Any]:
        return await attention(req.text, req.id)

    @app.api_route("/image/{item_id:path}", methods=["GET", "HEAD"])
    async def image(item_id: str) -> Response:
        if len(item_id) > MAX_ID_CHARS or "\x00" in item_id:
            raise ApiError(400, "invalid id")
        check_unicode(item_id, "id", status=400)
        path = gallery.image_file(item_id)
        if path is None:
            raise ApiError(404, "no image for this id")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    app.add_middleware(HostCheckMiddleware, rules=host_rules)  # outermost: refused before the body is read
    return app


def _as_rows(weights: Any) -> list[list[float]]:
    if hasattr(weights, "tolist"):
        weights = weights.tolist()
    return [list(r) for r in weights]


def load_app(
    index_path: str | Path,
    model_path: str | Path | None = None,
    config: ServeConfig | None = None,
    device: str = "cpu",
    allowed_hosts: Iterable[str] = (),
) -> FastAPI:
    """Open the index at ``index_path`` and its model (or ``model_path``) and build the app
    (``allowed_hosts``: as for :func:`create_app`).

    Raises :class:`eslmatch.errors.EslmatchError` when the index records no model and none
    is given.
    """
    index = GalleryIndex.open(index_path)
    if getattr(index, "kind", "image") != "image":
        raise EslmatchError(f"{index_path}: a {index.kind} index; eslmatch serve searches image indexes")
    if model_path is None:
        model_path = recorded_model(index)
        if not model_path:
            raise EslmatchError(f"{index_path}: the index records no model; pass --model")
    check_image_files(index, Path(index_path))
    model = load_model(model_path, map_location=device)
    model.eval()
    index.check_model(model)  # a model other than the index's fails here, not on the first query
    return create_app(index, model, config, model_name=Path(str(model_path)).name, allowed_hosts=allowed_hosts)


def load_milvus_app(
    uri: str,
    collection: str,
    model_path: str | Path | None = None,
    config: ServeConfig | None = None,
    device: str = "cpu",
    allowed_hosts: Iterable[str] = (),
    timeout: float = 30.0,
) -> FastAPI:
    """:func:`load_app` for an image gallery in Milvus (``collection`` at ``uri``; see
    ``docs/milvus.md``): the server keeps no gallery data, so any number can serve it."""
    from ..retrieval.milvus import MilvusGallery

    index = MilvusGallery.open(uri, collection, timeout=timeout)
    model_path = model_path or recorded_model(index)
    if not model_path:
        raise EslmatchError(f"{index.path}: the collection records no model; pass --model")
    check_image_files(index, Path(collection), paths=index.sample_paths())
    model = load_model(model_path, map_location=device)
    model.eval()
    index.check_model(model)
    return create_app(index, model, config, model_name=Path(str(model_path)).name, allowed_hosts=allowed_hosts)


def check_image_files(index: Any, where: Path, sample: int = 200, paths: list[str] | None = None) -> None:
    """Refuse an index whose recorded image files are all gone (moved?), naming one (a few
    missing files are served as missing pictures). Up to ``sample`` evenly spaced paths are
    looked at."""
    paths = [p for p in (getattr(index, "paths", []) if paths is None else paths) if p]
    if not paths:
        return
    step = max(1, len(paths) // sample)
    checked = paths[::step][:sample]
    missing = [p for p in checked if not Path(p).is_file()]
    if missing and len(missing) == len(checked):
        raise EslmatchError(
            f"{where}: the index's image files are missing, e.g. {missing[0]} (moved or deleted? rebuild the "
            "index where the images are now)"
        )


def recorded_model(index: Any) -> str | None:
    """The model path an index records (``manifest["model"]`` as a path or ``{"path": ...}``)."""
    path = getattr(index, "model_path", None)
    if path:
        return str(path)
    recorded = (getattr(index, "manifest", None) or {}).get("model")
    if isinstance(recorded, dict):
        recorded = recorded.get("path")
    return str(recorded) if recorded else None
