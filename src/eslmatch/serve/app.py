"""The FastAPI application behind ``eslmatch serve`` (see ``docs/serve.md``).

Reads (all errors are JSON ``{"error": "one line"}`` with a 4xx/5xx status):

- ``POST /search`` ``{"text", "k", "rerank_k", "where"}``; ``POST /search/image`` (a photo as
  multipart field ``image``, with form fields ``k``, ``where``; models that take pixels);
  ``GET /similar/{id}?k=&where=``: ranked items with scores and metadata;
- ``GET|POST /attention`` (``text``, ``id``): word-by-region attention (two-stage galleries);
- ``GET /items/{id}``: an item's fields; ``GET /image/{id}``: the image file it records;
- ``GET /info``, ``GET /healthz``, ``GET /metrics`` (Prometheus), ``GET /`` (the page).

Writes, only with a write token (``Authorization: Bearer TOKEN``, compared in constant time;
a server started without one is read-only and answers 403): ``POST /items`` (photos as
multipart field ``photos``, optional ``metadata`` JSON ``{name or id: {field: value}}`` and
``on_duplicate``), ``DELETE /items/{id}``, ``POST /items/delete`` ``{"where"}``.

Searches run on one worker thread, writes on another (a write waiting for another process's
writer lock never holds up a search; one that gives up is a 503 with ``Retry-After``); at most
``ServeConfig.max_pending`` jobs wait on each, beyond that 503 at once. A write's token is
checked before its body is read; uploads are decoded off the event loop. Changes made by other
processes are seen by the next request (the gallery checks its generation on every call).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import mimetypes
import os
import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar
from urllib.parse import quote

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, StrictInt
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Conflict, EslmatchError, InvalidInput, NotFound, Unavailable
from ..retrieval import Gallery, open_gallery, parse_filter
from ..retrieval.layout import UPLOADS
from ..retrieval.policy import ON_DUPLICATE, item_record
from .limits import ServeConfig
from .metrics import Metrics, MetricsMiddleware
from .middleware import (
    DEFAULT_ALLOWED_HOSTS,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    HostRules,
    SecurityHeadersMiddleware,
    WriteAuthMiddleware,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..retrieval import Filter, Hit, PhotoSource
    from ..retrieval.metadata import Metadata

T = TypeVar("T")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_ID_CHARS = 1024
# Only files with these types are served from /image (defence in depth on top of the id lookup).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"}
UPLOAD_ROUTES = ("/search/image", "/items")
_INVISIBLE = re.compile(r"[\s\u200b-\u200f\u2028-\u202f\u2060-\u2064\ufeff\x00-\x1f\x7f]+")


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    k: StrictInt | None = None
    rerank_k: StrictInt | None = None
    where: str | None = None


class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    id: str


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    where: str


class _HitFields(TypedDict):
    rank: int
    id: str
    score: float | None
    first_stage_score: float | None
    path: str | None
    metadata: Metadata
    image_url: str | None


class HitJSON(_HitFields, total=False):
    """One search result as answered (``caption`` only for caption hits)."""

    caption: str


# ---------------------------------------------------------------------------------------------
# Pure checks (unit-testable without a server)


def check_unicode(value: str, name: str, status: int = 422) -> str:
    """``value`` unchanged; :class:`ApiError` when it holds a lone surrogate (JSON can spell
    ``"\\ud800"``, which Python decodes into a ``str`` that cannot be encoded as UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(status, f"{name} is not valid Unicode (lone surrogate)") from None
    return value


def check_text(text: str, config: ServeConfig) -> str:
    """The query stripped; 422 when empty (or only NUL, control or zero-width characters),
    longer than the limit or not valid Unicode."""
    if len(text) > config.max_text_chars:
        raise ApiError(422, f"text is too long ({len(text)} characters, at most {config.max_text_chars})")
    check_unicode(text, "text")
    if not _INVISIBLE.sub("", text) or all(unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in text):
        raise ApiError(422, "text must not be empty (it holds no visible character)")
    return text.strip()


def check_counts(k: int | None, rerank_k: int | None, config: ServeConfig) -> tuple[int, int]:
    """``(k, rerank_k)`` with defaults filled in; :class:`ApiError` 422 when out of range."""
    k = config.default_k if k is None else k
    rerank_k = config.default_rerank_k if rerank_k is None else rerank_k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.max_k:
        raise ApiError(422, f"k must be an integer between 1 and {config.max_k} (got {k!r})")
    if isinstance(rerank_k, bool) or not isinstance(rerank_k, int) or not 0 <= rerank_k <= config.max_rerank_k:
        raise ApiError(422, f"rerank_k must be an integer between 0 and {config.max_rerank_k} (got {rerank_k!r})")
    return k, rerank_k


def check_id(item_id: str, status: int = 400) -> str:
    """An id from a path (400 when unusable) or a body (``status`` 422)."""
    check_unicode(item_id, "id", status=status)
    if len(item_id) > MAX_ID_CHARS or "\x00" in item_id:
        raise ApiError(status, "invalid id")
    return item_id


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
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def read_token(path: str | Path) -> str:
    """The write token in a file (stripped; at least 16 characters)."""
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise EslmatchError(f"{p}: cannot read the write token ({exc})") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise EslmatchError(f"{p}: a write token is one word of at least 16 characters")
    return token


# ---------------------------------------------------------------------------------------------
# The gallery behind the server


class Served:
    """The gallery and its model behind the server, with model work confined to one thread."""

    def __init__(
        self, gallery: Gallery, config: ServeConfig, model_name: str, token: str | None, upload_dir: Path | None
    ) -> None:
        self.gallery, self.config, self.model_name = gallery, config, model_name
        self.token, self.upload_dir = token, upload_dir
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eslmatch-infer")
        # writes wait for the gallery's writer lock on a thread of their own: searches go on meanwhile
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eslmatch-write")
        self._pending = {"infer": 0, "write": 0}  # touched only from the event loop thread

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)

    async def run(self, fn: Callable[[], T], write: bool = False) -> T:
        """Run ``fn`` on the worker thread (``write``: the writer thread); 503 when too many
        jobs already wait there."""
        lane = "write" if write else "infer"
        if self._pending[lane] >= self.config.max_pending:
            raise ApiError(503, "server busy, try again shortly", {"Retry-After": "5"})
        self._pending[lane] += 1
        try:
            pool = self._writer if write else self._worker
            return await asyncio.get_running_loop().run_in_executor(pool, _no_grad(fn))
        finally:
            self._pending[lane] -= 1

    def refusal(self, given: str) -> tuple[int, str, dict[str, str]] | None:
        """Why a write with the ``Authorization`` header ``given`` is refused (403 on a
        read-only server, 401 without the right bearer token), or ``None``. Checked before the
        body is read (:class:`~.middleware.WriteAuthMiddleware`) and again by each write route."""
        if self.token is None:
            return 403, "this server is read-only: start it with --write-token-file FILE to allow writes", {}
        scheme, _, value = given.partition(" ")
        # header values arrive as latin-1 text: compare the raw bytes with the token's UTF-8
        raw = value.strip().encode("latin-1", "replace")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(raw, self.token.encode("utf-8"))
        if not ok:
            return 401, "a write needs 'Authorization: Bearer TOKEN'", {"WWW-Authenticate": "Bearer"}
        return None

    def authorize(self, request: Request) -> None:
        refused = self.refusal(request.headers.get("authorization", ""))
        if refused is not None:
            raise ApiError(*refused)

    def image_file(self, item_id: str) -> Path | None:
        """The recorded image file of a known id, when it exists and is an image."""
        try:
            recorded = item_record(self.gallery.store, item_id, ()).path or None
        except EslmatchError:
            return None
        return servable(recorded)

    def where(self, text: str | None) -> Filter | None:
        if text is None or not text.strip():
            return None
        check_unicode(text, "where")
        return self.gallery.check_filter(parse_filter(text))

    def hits(self, hits: list[Hit]) -> list[HitJSON]:
        out = []
        for h in hits:
            record: HitJSON = {
                "rank": int(h.rank),
                "id": str(h.id),
                "score": _finite(h.score),
                "first_stage_score": _finite(h.first_stage_score),
                "path": h.path,
                "metadata": h.metadata,
                "image_url": image_url(str(h.id)) if servable(h.path) else None,  # the hit's path: no lookup
            }
            if h.caption is not None:
                record["caption"] = h.caption
            out.append(record)
        return out


def servable(recorded: str | None) -> Path | None:
    """The image file a recorded path names, when it exists and is an image."""
    if not recorded:
        return None
    path = Path(recorded).resolve()
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        return None
    return path


def _no_grad(fn: Callable[[], T]) -> Callable[[], T]:
    def run() -> T:
        with torch.no_grad():
            return fn()

    return run


# ---------------------------------------------------------------------------------------------
# Uploads


async def _read_upload(upload: UploadFile, config: ServeConfig) -> bytes:
    data = await upload.read(config.max_upload_bytes + 1)
    if len(data) > config.max_upload_bytes:
        raise ApiError(413, f"upload too large (at most {config.max_upload_bytes} bytes)")
    if not data:
        raise ApiError(422, "the upload is empty")
    return data


def open_upload(data: bytes, config: ServeConfig) -> Image:
    """An uploaded photo as an RGB PIL image; 413 beyond ``max_pixels``, 422 when not an image."""
    import io

    from PIL import Image, UnidentifiedImageError

    from ..data.files import to_rgb

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL refuses to open it: far past max_pixels (a "bomb")
        raise ApiError(413, f"image too large (more pixels than PIL opens, at most {config.max_pixels})") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ApiError(422, "the upload is not an image (JPEG, PNG, WebP, ...)") from None
    w, h = image.size
    if w * h > config.max_pixels:
        raise ApiError(413, f"image too large ({w} x {h} pixels, at most {config.max_pixels})")
    try:
        image.load()
        rgb = to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError):
        raise ApiError(422, "the upload is a damaged or truncated image") from None
    rgb.info["format"] = image.format  # what the upload is stored as (not the client's file name)
    return rgb


# the suffix an upload is stored under: from its decoded format, never from the client's file name
FORMAT_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def _stage_photo(data: bytes, fmt: str | None, folder: Path) -> tuple[Path, Path]:
    """Write an uploaded photo to a temporary file in ``folder``; returns it and the name it
    takes once accepted: derived from its content and image format (never from the request)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{hashlib.sha256(data).hexdigest()[:32]}{FORMAT_SUFFIXES.get(str(fmt), '.img')}"
    tmp = folder / f".{target.name}.{os.getpid()}-{id(data)}.tmp"
    tmp.write_bytes(data)
    return tmp, target


def _upload_id(name: str) -> str:
    stem = Path(name.replace("\\", "/")).name
    stem = stem.rsplit(".", 1)[0] if "." in stem[1:] else stem
    clean = "".join(c for c in stem if c.isprintable() and c not in "\r\n\0")[:200]
    if not clean:
        raise ApiError(422, "an uploaded photo needs a file name (its id)")
    return clean


# ---------------------------------------------------------------------------------------------
# The application


def upload_body_limit(path: str, config: ServeConfig) -> int | None:
    """The largest multipart body of an upload route (``None``: not one): one photo and its
    form fields for ``/search/image``, ``max_photos`` of them for ``POST /items``."""
    if path not in UPLOAD_ROUTES:
        return None
    photos = 1 if path == "/search/image" else config.max_photos
    return photos * config.max_upload_bytes + config.max_body_bytes


def create_app(
    gallery: Gallery,
    config: ServeConfig | None = None,
    model_name: str = "",
    allowed_hosts: Iterable[str] = (),
    write_token: str | None = None,
    upload_dir: str | Path | None = None,
) -> FastAPI:
    """The FastAPI app serving ``gallery`` (an opened :class:`~eslmatch.retrieval.Gallery`).

    Requests must carry a ``Host`` header naming ``127.0.0.1``, ``localhost``, ``[::1]`` or one
    of ``allowed_hosts`` (``"*"``: every host), else 421. ``write_token``: allow writes with it
    (uploaded photos are kept in ``upload_dir``)."""
    config = config or ServeConfig()
    host_rules = HostRules([*DEFAULT_ALLOWED_HOSTS, *allowed_hosts])  # bad entries fail here, not on a request
    served = Served(gallery, config, model_name, write_token, Path(upload_dir) if upload_dir else None)
    metrics = Metrics(lambda: float(len(gallery)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        yield
        served.close()

    app = FastAPI(title="eslmatch", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.served = served
    _errors(app)
    _read_routes(app, served)
    _write_routes(app, served)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=config.max_body_bytes,
        limit_for=lambda path: upload_body_limit(path, config),
    )
    app.add_middleware(WriteAuthMiddleware, is_write=is_write, refusal=served.refusal)  # before any body is read
    app.add_middleware(HostCheckMiddleware, rules=host_rules)  # outermost: refused before the body is read
    return app


# A library error's status, by its kind (its type, never its wording); the first match along
# the exception's classes wins, so a subclass answers as its kind.
STATUS_OF_KIND: dict[type[EslmatchError], int] = {
    NotFound: 404,
    Conflict: 409,
    Unavailable: 503,
    InvalidInput: 422,
    EslmatchError: 422,
}


def status_of(exc: EslmatchError) -> int:
    """The HTTP status answering ``exc``: :data:`STATUS_OF_KIND` of its nearest kind."""
    return next(STATUS_OF_KIND[k] for k in type(exc).__mro__ if k in STATUS_OF_KIND)


def is_write(method: str, path: str) -> bool:
    """Whether a request is one of the write routes (``POST /items``, ``POST /items/delete``,
    ``DELETE /items/{id}``)."""
    return (method == "POST" and path in ("/items", "/items/delete")) or (
        method == "DELETE" and path.startswith("/items/")
    )


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code != 400:
            return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
        # One rule: a body the parser rejects is 422 like one the schema rejects. FastAPI raises 400
        # for what json.loads fails on other than syntax (not UTF-8, nested too deeply), Starlette for
        # a malformed multipart body.
        detail = str(exc.detail)
        if detail == "There was an error parsing the body":
            detail = "the body cannot be parsed (not UTF-8 JSON, or nested too deeply)"
        return JSONResponse({"error": f"invalid request: {detail}"}, status_code=422, headers=exc.headers)

    @app.exception_handler(EslmatchError)
    async def _library_error(request: Request, exc: EslmatchError) -> JSONResponse:
        lines = str(exc).strip().splitlines()
        status = status_of(exc)
        headers = {"Retry-After": "5"} if status == 503 else None
        return JSONResponse({"error": lines[0] if lines else type(exc).__name__}, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


def _read_routes(app: FastAPI, served: Served) -> None:
    config, gallery = served.config, served.gallery

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "items": len(gallery), "model": served.model_name}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        store = gallery.store
        return {
            "kind": store.kind,
            "stages": store.stages,
            "items": len(gallery),
            "fields": gallery.fields(),
            "writable": served.token is not None,
            "takes_images": gallery.model.inputs == "pixels",
            "model": served.model_name,
        }

    @app.post("/search")
    async def search(req: SearchRequest) -> dict[str, Any]:
        text = check_text(req.text, config)
        k, rerank_k = check_counts(req.k, req.rerank_k, config)
        where = served.where(req.where)
        start = time.perf_counter()
        results = await served.run(lambda: served.hits(gallery.search(text, k=k, where=where, rerank_k=rerank_k)))
        return {"query": text, "results": results, "took_ms": round((time.perf_counter() - start) * 1000, 3)}

    @app.post("/search/image")
    async def search_image(request: Request) -> dict[str, Any]:
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):  # form values are text or uploads
            raise ApiError(422, "send the photo as the multipart field 'image'")
        k, rerank_k = check_counts(_form_int(form, "k"), _form_int(form, "rerank_k"), config)
        where = served.where(_form_text(form, "where"))
        if gallery.model.inputs != "pixels":
            raise ApiError(
                422, "this gallery's model reads region features, not photos: search it with text or /similar/{id}"
            )
        data = await _read_upload(upload, config)
        image = await asyncio.to_thread(open_upload, data, config)  # decoding is CPU work: off the event loop
        start = time.perf_counter()
        results = await served.run(lambda: served.hits(gallery.search(image, k=k, where=where, rerank_k=rerank_k)))
        return {"results": results, "took_ms": round((time.perf_counter() - start) * 1000, 3)}

    @app.get("/similar/{item_id:path}")
    async def similar(item_id: str, k: str | None = None, where: str | None = None) -> dict[str, Any]:
        check_id(item_id)
        kk, _ = check_counts(_strict_int(k, "k"), None, config)  # "2.0" or "true" is no count
        flt = served.where(where)
        results = await served.run(lambda: served.hits(gallery.similar(item_id, k=kk, where=flt)))
        return {"id": item_id, "results": results}

    async def attention(text: str, item_id: str) -> dict[str, Any]:
        text = check_text(text, config)
        check_id(item_id, 422)
        if gallery.stages == 1:
            raise ApiError(422, "this gallery is one-stage (one vector per image): it has no word-by-region attention")
        start = time.perf_counter()
        words, weights, grid = await served.run(lambda: gallery.attention(text, item_id))
        rows = [[_finite(v) or 0.0 for v in row] for row in weights.tolist()]
        return {
            "query": text,
            "id": item_id,
            "words": [str(w) for w in words],
            "weights": rows,
            "grid": [int(grid[0]), int(grid[1])] if grid is not None else None,
            "image_url": image_url(item_id) if served.image_file(item_id) else None,
            "took_ms": round((time.perf_counter() - start) * 1000, 3),
        }

    @app.get("/attention")
    async def attention_get(text: str, id: str) -> dict[str, Any]:  # noqa: A002 - the API's name
        return await attention(text, id)

    @app.post("/attention")
    async def attention_post(req: AttentionRequest) -> dict[str, Any]:
        return await attention(req.text, req.id)

    @app.get("/items/{item_id:path}")
    async def item(item_id: str) -> dict[str, Any]:
        check_id(item_id)
        fields = gallery.metadata(item_id)
        return {
            "id": item_id,
            "fields": fields,
            "image_url": image_url(item_id) if served.image_file(item_id) else None,
        }

    @app.api_route("/image/{item_id:path}", methods=["GET", "HEAD"])
    async def image(item_id: str) -> Response:
        check_id(item_id)
        path = served.image_file(item_id)
        if path is None:
            raise ApiError(404, "no image for this id")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=60"})


def _form_int(form: FormData, name: str) -> int | None:
    return _strict_int(form.get(name), name)


def _strict_int(value: str | UploadFile | None, name: str) -> int | None:
    """A count given as text (a form field, a query parameter): digits only, else 422."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,7}", value):
        raise ApiError(422, f"{name} must be an integer")
    return int(value)


def _form_text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(422, f"{name} must be text")
    return value


def _write_routes(app: FastAPI, served: Served) -> None:
    gallery, config = served.gallery, served.config

    @app.post("/items")
    async def add_items(request: Request) -> dict[str, Any]:
        served.authorize(request)
        if served.upload_dir is None:
            raise ApiError(403, "this server keeps no uploads: start it with --upload-dir DIR to add photos")
        if gallery.model.inputs != "pixels":
            raise ApiError(
                422,
                "this gallery's model reads region features: add photos with 'eslmatch extract' and 'eslmatch index add'",
            )
        form = await request.form(max_files=config.max_photos, max_fields=8)
        uploads = [u for u in form.getlist("photos") if not isinstance(u, str)]
        if not uploads:
            raise ApiError(422, "send the photos as multipart fields 'photos'")
        meta = _form_metadata(_form_text(form, "metadata"))
        on_duplicate = _form_text(form, "on_duplicate") or "skip"
        if on_duplicate not in ON_DUPLICATE:
            raise ApiError(422, f"on_duplicate must be one of {', '.join(ON_DUPLICATE)}")
        ids = [_upload_id(str(getattr(up, "filename", "") or "")) for up in uploads]
        if len(set(ids)) != len(ids):
            raise ApiError(422, "two uploaded photos have the same name (their ids)")
        unknown = [k for k in meta if k not in ids]
        if unknown:
            raise ApiError(422, f"metadata names {unknown[0]!r}, not one of the uploaded photos")
        staged: list[tuple[Path, Path]] = []  # (temporary file, its name once every photo is accepted)
        saved: list[Path] = []
        try:
            for up in uploads:  # one photo in memory at a time
                data = await _read_upload(up, config)
                image = await asyncio.to_thread(open_upload, data, config)  # refused here, not while adding
                staged.append(_stage_photo(data, image.info.get("format"), served.upload_dir))
                del data, image
            for tmp, target in staged:
                if target.exists():
                    tmp.unlink()
                else:
                    tmp.replace(target)
                    saved.append(target)
            src = _upload_source([target for _, target in staged], ids)
            rep = await served.run(lambda: gallery.add(src, meta or None, on_duplicate), True)
        except BaseException:
            for tmp, _ in staged:  # a refused upload leaves no file behind
                tmp.unlink(missing_ok=True)
            for target in saved:
                target.unlink(missing_ok=True)
            raise
        return {"added": rep.added, "duplicates": rep.duplicates, "replaced": rep.replaced, "items": rep.count}

    @app.delete("/items/{item_id:path}")
    async def delete_item(item_id: str, request: Request) -> dict[str, Any]:
        served.authorize(request)
        check_id(item_id)
        n = await served.run(lambda: gallery.delete(ids=[item_id]), True)
        return {"deleted": n, "items": len(gallery)}

    @app.post("/items/delete")
    async def delete_where(req: DeleteRequest, request: Request) -> dict[str, Any]:
        served.authorize(request)
        where = served.where(req.where)
        if where is None:
            raise ApiError(422, "where must not be empty")
        n = await served.run(lambda: gallery.delete(where=where), True)
        return {"deleted": n, "items": len(gallery)}


def _form_metadata(text: str | None) -> dict[str, Metadata]:
    """An upload's ``metadata`` field, checked as ``index update --metadata`` checks a file."""
    from ..retrieval.metadata import MetadataError, metadata_records, parse_json

    if not text:
        return {}
    try:
        meta = parse_json(text, "metadata")
        if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
            raise ApiError(422, "metadata must be a JSON object {id: {field: value}}")
        return metadata_records((f"metadata of {k!r}", {**v, "id": k}) for k, v in meta.items())
    except MetadataError as exc:
        raise ApiError(422, str(exc)) from None


def _upload_source(files: list[Path], ids: list[str]) -> PhotoSource:
    from ..retrieval import PhotoSource

    desc = {"uploads": str(files[0].parent)}
    return PhotoSource("image", ids, [str(f) for f in files], desc, True, None, files=files, names=ids, refused=[])


# ---------------------------------------------------------------------------------------------
# Opening


def load_app(
    index_path: str | Path,
    model_path: str | Path | None = None,
    config: ServeConfig | None = None,
    device: str = "cpu",
    allowed_hosts: Iterable[str] = (),
    collection: str | None = None,
    timeout: float = 30.0,
    write_token: str | None = None,
    upload_dir: str | Path | None = None,
    precision: str | None = None,
    runtime: str = "torch",
    onnx: str | Path | None = None,
) -> FastAPI:
    """Open the gallery (a folder, or with ``collection`` a Milvus URI) and its model (the
    recorded one, or ``model_path``) and build the app; the model is checked against the
    gallery here, not on the first query. ``precision`` / ``runtime`` / ``onnx``: how queries
    are encoded (:func:`~eslmatch.retrieval.open_gallery`)."""
    gallery = open_gallery(
        index_path,
        collection,
        model=model_path,
        device=device,
        timeout=timeout,
        precision=precision,
        runtime=runtime,
        onnx=onnx,
    )
    if gallery.kind != "image":
        raise EslmatchError(f"{gallery.store.where}: a {gallery.kind} index; eslmatch serve searches image galleries")
    check_image_files(gallery)
    _ = gallery.searcher  # loads the model (and an ONNX export); a model other than the gallery's fails here
    name = Path(str(model_path or gallery.store.manifest["model"].get("path") or "")).name
    if upload_dir is None and write_token is not None and collection is None:
        upload_dir = Path(index_path) / UPLOADS
    if upload_dir is not None:  # recorded as absolute paths: served from any working directory
        upload_dir = Path(upload_dir).resolve()
    return create_app(gallery, config, name, allowed_hosts, write_token, upload_dir)


def check_image_files(gallery: Gallery, sample: int = 200) -> None:
    """Refuse a gallery whose recorded image files are all gone (moved?), naming one (a few
    missing files are served as missing pictures)."""
    rows = int(gallery.store.info()["rows"])
    paths = [r.path for r in gallery.store.select(fields=(), rows=range(0, rows, max(1, rows // sample))) if r.path]
    missing = [p for p in paths if not Path(p).is_file()]
    if paths and len(missing) == len(paths):
        raise EslmatchError(
            f"{gallery.store.where}: the gallery's image files are missing, e.g. {missing[0]} (moved or deleted? "
            "rebuild the gallery where the images are now)"
        )
