"""``eslmatch serve`` over a living collection: writes need the token, photo uploads are bounded,
``/metrics`` is Prometheus text, filters and ``/similar`` answer as the library does, and a
running server sees another process's adds and deletes within 5 seconds (both stores)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from _models import ToyPixelModel, randomize, tiny_gru_model  # noqa: E402
from _wait import HUNG, wait_for_server, wait_until  # noqa: E402
from eslmatch import VSEModel  # noqa: E402
from eslmatch.factory import FAMILIES  # noqa: E402
from eslmatch.retrieval import BuildOptions, build_gallery, open_gallery, regions  # noqa: E402
from eslmatch.serve import ServeConfig, create_app  # noqa: E402
from milvus_server import MilvusServer, free_port, has_grpc_server  # noqa: E402

TOKEN = "s3cret-token-0123456789"
SRC = str(Path(__file__).resolve().parents[1] / "src")
NO_BAR = BuildOptions(progress=False)


def photo_bytes(seed: int, size: tuple[int, int] = (24, 24), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def photos(tmp_path, monkeypatch):
    """A gallery of 10 photos of a model that takes pixels, with metadata."""
    monkeypatch.setitem(FAMILIES, "toy-pixels", ToyPixelModel)
    folder = tmp_path / "photos"
    for i in range(10):
        (folder / ("trips" if i < 4 else "home")).mkdir(parents=True, exist_ok=True)
        (folder / ("trips" if i < 4 else "home") / f"p{i}.png").write_bytes(photo_bytes(i))
    model = ToyPixelModel(seed=1).eval()
    model.save_pretrained(tmp_path / "model")
    meta = {f"{'trips' if i < 4 else 'home'}/p{i}": {"starred": i % 2 == 0} for i in range(10)}
    g = build_gallery(model, folder, tmp_path / "idx", metadata=meta, options=NO_BAR, model_path=tmp_path / "model")
    return g, tmp_path


def client_of(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


def test_writes_need_the_token(photos):
    g, root = photos
    read_only = client_of(create_app(g))
    r = read_only.post("/items", files={"photos": ("a.png", photo_bytes(50))})
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    assert read_only.delete("/items/home/p5").status_code == 403
    assert read_only.post("/items/delete", json={"where": "starred"}).status_code == 403
    app = create_app(g, write_token=TOKEN, upload_dir=root / "uploads")
    c = client_of(app)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        r = c.post("/items", files={"photos": ("a.png", photo_bytes(50))}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert c.delete("/items/home/p5", headers=headers).status_code == 401
        assert c.post("/items/delete", json={"where": "starred"}, headers=headers).status_code == 401
    assert len(g) == 10  # nothing changed
    auth = {"Authorization": f"Bearer {TOKEN}"}
    meta = json.dumps({"new-a": {"starred": True, "tag": "upload"}})
    r = c.post(
        "/items",
        files=[("photos", ("new-a.png", photo_bytes(60))), ("photos", ("new-b.jpg", photo_bytes(61, fmt="JPEG")))],
        data={"metadata": meta},
        headers=auth,
    )
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 2 and r.json()["items"] == 12 and len(g) == 12
    assert g.metadata("new-a")["tag"] == "upload" and Path(g.metadata("new-b")["path"]).parent == root / "uploads"
    again = c.post("/items", files={"photos": ("new-a.png", photo_bytes(60))}, headers=auth).json()
    assert again["added"] == 0 and again["duplicates"] == 1  # skipped, said
    hits = c.post("/search/image", files={"image": ("q.png", photo_bytes(60))}, data={"k": "1"}).json()["results"]
    assert hits[0]["id"] == "new-a"
    assert c.delete("/items/new-b", headers=auth).json() == {"deleted": 1, "items": 11}
    assert c.delete("/items/new-b", headers=auth).status_code == 404
    assert c.post("/items/delete", json={"where": "folder == 'trips'"}, headers=auth).json()["deleted"] == 4
    assert len(g) == 7 and c.get("/healthz").json()["items"] == 7


def test_uploads_live_in_the_gallery_and_go_with_their_item(photos, monkeypatch):
    """Defect 8 of issue 30: ``POST /items`` recorded ``galleries/photos/uploads/<hash>.jpg``
    relative to the server's working directory (404 from elsewhere), and uploads of deleted
    items stayed after ``compact``."""
    from eslmatch.serve.app import load_app

    g, root = photos
    monkeypatch.chdir(root)
    c = client_of(load_app("idx", write_token=TOKEN))  # a relative gallery path, as typed
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = c.post(
        "/items",
        files=[("photos", ("up.png", photo_bytes(70))), ("photos", ("keep.png", photo_bytes(71)))],
        headers=auth,
    )
    assert r.status_code == 200, r.text
    monkeypatch.chdir(root.parent)  # served from another directory
    other = open_gallery(root / "idx")
    recorded = Path(other.metadata("up")["path"])
    assert recorded.is_absolute() and recorded.parent == (root / "idx" / "uploads").resolve() and recorded.is_file()
    assert client_of(create_app(other)).get("/image/up").status_code == 200
    other.delete(["up"])
    other.compact()
    assert not recorded.exists()  # went with its item
    assert Path(other.metadata("keep")["path"]).is_file()  # the other upload stays


@pytest.mark.parametrize(
    "meta, message",
    [
        ('{"u": {"n": 1180591620717411303424}}', "does not fit a 64-bit integer"),  # was a 500 (OverflowError)
        ('{"u": {"s": "\\ud800"}}', "lone surrogate"),  # was a 500 (UnicodeEncodeError)
        ('{"u": {"x": ' + "[" * 100000 + "]" * 100000 + "}}", "nested too deeply"),  # was a 500 (RecursionError)
        ('{"u": {"rating": Infinity}}', "not a finite number"),  # was stored, shown as null, matched by > 100
        ('{"u": {"rating": NaN}}', "not a finite number"),  # was dropped silently
        ('{"u": {"bad name": 1}}', "not valid"),
    ],
)
def test_upload_metadata_is_checked_as_a_metadata_file_is(photos, meta, message):
    """Issue 34 D3: the metadata of ``POST /items`` skipped the checks of ``index update --metadata``."""
    g, root = photos
    c = client_of(create_app(g, write_token=TOKEN, upload_dir=root / "uploads"))
    r = c.post(
        "/items",
        files={"photos": ("u.png", photo_bytes(80))},
        data={"metadata": meta},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 422 and message in r.json()["error"], r.text
    assert len(g) == 10  # nothing added


@pytest.mark.parametrize(("method", "path"), [("POST", "/items"), ("POST", "/items/delete"), ("DELETE", "/items/x")])
@pytest.mark.parametrize("token", [None, TOKEN])
def test_a_write_without_the_token_is_refused_before_its_body_is_read(photos, method, path, token):
    """Issue 34 D1: ``POST /items`` without a token was buffered whole (up to 1.28 GB) before
    its 401 / 403. Now the token is checked first: the body is never read."""
    import asyncio

    g, root = photos
    app = create_app(g, write_token=token, upload_dir=root / "uploads")
    sent: list[dict] = []

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"127.0.0.1"), (b"content-length", b"1310720000"), (b"authorization", b"Bearer nope")],
        "http_version": "1.1",
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == (401 if token else 403)


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_is_streamed_not_joined(declared):
    """Issue 34 D1: the body-limit layer joined every body in memory before the app saw it (a
    body without a declared length, chunked, still was after the first fix); a body within the
    limit now reaches the app chunk by chunk."""
    seen, sent = run_body_limit(
        [b"x" * 1000] * 3, {b"content-length": b"3000"} if declared else {b"transfer-encoding": b"chunked"}
    )
    assert seen == [1000, 1000, 1000, 0] and sent == [200]


def test_a_chunked_body_past_its_limit_is_cut_off_with_413():
    """A chunked body is counted as it streams: past the limit the app's read fails, whatever
    it answers is dropped, and the client gets 413."""
    seen, sent = run_body_limit([b"x" * 4000] * 5, {b"transfer-encoding": b"chunked"}, limit=10_000)
    assert seen == [4000, 4000] and sent == [413]


def run_body_limit(bodies: list[bytes], headers: dict[bytes, bytes], limit: int = 10_000) -> tuple[list[int], list]:
    """Stream ``bodies`` through :class:`BodyLimitMiddleware` to an app that reads them all
    (answering 500 when a read fails, as FastAPI does, then re-raising); what the app read, and
    the statuses the client got."""
    import asyncio

    from eslmatch.serve.middleware import BodyLimitMiddleware

    seen: list[int] = []

    async def inner(scope, receive, send):
        try:
            while True:
                message = await receive()
                seen.append(len(message.get("body", b"")))
                if not message.get("more_body"):
                    break
        except Exception:
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"internal error"})
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = [{"type": "http.request", "body": b, "more_body": True} for b in bodies]
    chunks.append({"type": "http.request", "body": b"", "more_body": False})

    async def receive():
        return chunks.pop(0)

    sent: list[int] = []

    async def send(message):
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    scope = {"type": "http", "path": "/items", "headers": list(headers.items())}
    asyncio.run(BodyLimitMiddleware(inner, limit=limit)(scope, receive, send))
    return seen, sent


def test_a_non_ascii_token_matches(photos):
    g, root = photos
    token = "sésame-ouvre-toi-0123456789"
    c = client_of(create_app(g, write_token=token, upload_dir=root / "uploads"))
    r = c.post("/items/delete", json={"where": "starred"}, headers={"Authorization": b"Bearer " + token.encode()})
    assert r.status_code == 200, r.text


def test_cpu_work_stays_off_the_event_loop(photos, monkeypatch):
    """Issue 34 D9: an upload was decoded, and each hit looked up, on the event loop (4 clients
    posting large photos pushed /healthz to 2.4 s). Both now run on other threads."""
    import asyncio

    import eslmatch.serve.app as app_module

    g, _ = photos
    on_loop: dict[str, bool] = {}

    def running_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    real_open, real_hits = app_module.open_upload, app_module.Served.hits

    def open_upload(data, config):
        on_loop["decode"] = running_loop()
        return real_open(data, config)

    def hits(self, found):
        on_loop["hits"] = running_loop()
        return real_hits(self, found)

    monkeypatch.setattr(app_module, "open_upload", open_upload)
    monkeypatch.setattr(app_module.Served, "hits", hits)
    c = client_of(create_app(g))
    assert c.post("/search/image", files={"image": ("q.png", photo_bytes(60))}, data={"k": "3"}).status_code == 200
    assert on_loop == {"decode": False, "hits": False}
    assert c.post("/search", json={"text": "a photo", "k": 2}).json()["results"][0]["image_url"]


def test_a_waiting_write_does_not_stall_searches(photos):
    """Issue 34 D7: while another process held the gallery's writer lock, one HTTP write waited
    on the server's only worker and every /search queued behind it (18.6 s for a 20 s hold).
    Writes now wait on a thread of their own; a write that gives up is a 503 with Retry-After."""
    import threading

    from eslmatch.retrieval.files.commit import write_lock

    g, root = photos
    app = create_app(g, write_token=TOKEN, upload_dir=root / "uploads")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    answers: dict[str, int] = {}
    with write_lock(root / "idx"):  # "another process" holds the gallery
        writer = threading.Thread(
            target=lambda: answers.update(delete=client_of(app).delete("/items/home/p5", headers=auth).status_code)
        )
        writer.start()
        wait_until(lambda: app.state.served._pending["write"] == 1, "the write to be queued")
        r = client_of(app).post("/search", json={"text": "a photo", "k": 2})  # answers while the write waits
        assert r.status_code == 200 and writer.is_alive()
    writer.join(HUNG)
    assert answers == {"delete": 200} and len(g) == 9
    from eslmatch.errors import BusyError
    from eslmatch.serve.app import status_of

    with write_lock(root / "idx"), pytest.raises(BusyError) as busy:  # what a write that gives up raises
        with write_lock(root / "idx", timeout=0):
            pass
    assert status_of(busy.value) == 503


def test_an_upload_is_stored_by_its_format_and_a_refused_one_leaves_no_file(photos):
    """Issue 34 (minor): an extension-less or ``.tif``-named upload was stored as ``.img`` and
    never served; files of refused uploads stayed in ``uploads/``."""
    g, root = photos
    uploads = root / "uploads"
    c = client_of(create_app(g, write_token=TOKEN, upload_dir=uploads))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = c.post("/items", files={"photos": ("noext", photo_bytes(90))}, headers=auth)  # a PNG without a suffix
    assert r.status_code == 200, r.text
    assert Path(g.metadata("noext")["path"]).suffix == ".png" and c.get("/image/noext").status_code == 200
    before = sorted(p.name for p in uploads.iterdir())
    r = c.post(  # refused as a whole: the id is in the gallery already
        "/items",
        files=[("photos", ("fresh.png", photo_bytes(91))), ("photos", ("noext.png", photo_bytes(92)))],
        data={"on_duplicate": "error"},
        headers=auth,
    )
    assert r.status_code == 409 and sorted(p.name for p in uploads.iterdir()) == before  # a Conflict


def test_uploads_are_one_source_of_the_gallery(photos, capsys):
    """Issue 34 (minor): every ``POST /items`` appended a record to the gallery's sources, so
    ``index info`` printed a line per upload (``source None``) and the manifest grew without
    end. Uploads to one folder are now one source, counted."""
    from eslmatch.cli import main

    g, root = photos
    c = client_of(create_app(g, write_token=TOKEN, upload_dir=root / "uploads"))
    for i in range(3):
        r = c.post(
            "/items",
            files={"photos": (f"u{i}.png", photo_bytes(100 + i))},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status_code == 200, r.text
    capsys.readouterr()
    assert main(["index", "info", str(root / "idx")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("source")]
    assert len(lines) == 2 and "(3 items)" in lines[1] and "uploads" in lines[1], lines
    assert "None" not in "".join(lines)


def test_uploads_are_bounded(photos):
    g, root = photos
    c = client_of(create_app(g, ServeConfig(max_upload_bytes=20_000, max_pixels=100 * 100)))
    big = photo_bytes(1, size=(200, 200))
    assert len(big) > 20_000
    r = c.post("/search/image", files={"image": ("big.png", big)})
    assert r.status_code == 413 and "upload too large" in r.json()["error"]
    wide = Image.new("RGB", (400, 400))
    buf = io.BytesIO()
    wide.save(buf, format="PNG")  # few bytes, many pixels
    r = c.post("/search/image", files={"image": ("wide.png", buf.getvalue())})
    assert r.status_code == 413 and "400 x 400 pixels" in r.json()["error"]
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 48 KB, past PIL's bomb limit (issue 34 D2: a 500)
    roomy = client_of(create_app(g, ServeConfig(max_pixels=100 * 100)))  # the bytes are allowed, the pixels not
    r = roomy.post("/search/image", files={"image": ("bomb.png", bomb.getvalue())})
    assert r.status_code == 413 and "image too large" in r.json()["error"], r.text
    r = c.post("/search/image", files={"image": ("x.png", b"not an image at all")})
    assert r.status_code == 422 and "not an image" in r.json()["error"]
    r = c.post("/search/image", files={"image": ("x.png", photo_bytes(3)[:60])})
    assert r.status_code == 422
    r = c.post("/search/image", files={"other": ("x.png", photo_bytes(3))})
    assert r.status_code == 422 and "'image'" in r.json()["error"]
    r = c.post("/search/image", files={"image": ("x.png", photo_bytes(3))}, data={"k": "true"})
    assert r.status_code == 422 and "k must be an integer" in r.json()["error"]


def test_filters_similar_and_items_answer_as_the_library(photos):
    g, _ = photos
    c = client_of(create_app(g))
    body = c.post("/search", json={"text": "a red circle", "k": 10, "where": "not starred"}).json()
    want = g.search("a red circle", k=10, where="not starred")
    assert [r["id"] for r in body["results"]] == [h.id for h in want] and len(want) == 5
    assert all(r["metadata"]["starred"] is False for r in body["results"])
    like = c.get("/similar/trips/p1", params={"k": 3, "where": 'folder == "home"'}).json()["results"]
    assert [r["id"] for r in like] == [h.id for h in g.similar("trips/p1", k=3, where='folder == "home"')]
    item = c.get("/items/home/p7").json()
    assert item["fields"]["folder"] == "home" and item["fields"]["starred"] is False and item["image_url"]
    assert c.get("/items/nope").status_code == 404
    bad = c.post("/search", json={"text": "a", "where": "folder = 'x'"})
    assert bad.status_code == 422 and "column 8" in bad.json()["error"]
    info = c.get("/info").json()
    assert info["stages"] == 1 and info["takes_images"] and info["fields"]["starred"] == "bool"


def test_metrics_are_prometheus_text(photos):
    g, _ = photos
    c = client_of(create_app(g))
    for _ in range(3):
        assert c.post("/search", json={"text": "a red circle", "k": 2}).status_code == 200
    assert c.post("/search", json={"text": ""}).status_code == 422
    assert c.get("/no/such/page").status_code == 404
    text = c.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text.text)}
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["eslmatch_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("/search", "200")] == 3 and requests[("/search", "422")] == 1 and requests[("other", "404")] == 1
    latency = [
        s
        for s in families["eslmatch_request_seconds"].samples
        if s.name.endswith("_count") and s.labels["route"] == "/search"
    ]
    assert latency[0].value == 4
    assert [s.value for s in families["eslmatch_items"].samples] == [10]


# ---------------------------------------------------------------------- live: another process changes the gallery
def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eslmatch.cli", *argv], capture_output=True, text=True, env=_env(), timeout=HUNG
    )


def _ids(base: str) -> set[str]:
    body = httpx.post(base + "/search", json={"text": "a red circle", "k": 1000, "rerank_k": 0}, timeout=30).json()
    return {r["id"] for r in body["results"]}


def _seconds_until(base: str, test) -> float:
    """Seconds until the running server's answers pass ``test`` (printed; a server that never
    sees the change fails after a minute: its refresh interval is seconds)."""
    start = time.monotonic()
    wait_until(lambda: test(_ids(base)), "the server seeing the change", limit=60, every=0.1)
    return time.monotonic() - start


@pytest.mark.parametrize("store", ["files", pytest.param("milvus", marks=pytest.mark.slow)])
def test_a_running_server_sees_adds_and_deletes_of_another_process(store, tmp_path, capsys):
    if store == "milvus" and not has_grpc_server():
        pytest.skip("pymilvus / milvus-lite not installed")
    esl = tiny_gru_model(seed=5)
    model = VSEModel(esl.config.replace(model_type="vse"), tokenizer=esl.tokenizer)
    randomize(model)
    model_dir = model.eval().save_pretrained(tmp_path / "model")
    feats = np.random.default_rng(0).random((30, 6, 16), dtype=np.float32)
    np.save(tmp_path / "more.npy", np.random.default_rng(1).random((2, 6, 16), dtype=np.float32))
    server = None
    if store == "milvus":
        server = MilvusServer(tmp_path / "milvus").start()
        place = ["--milvus", server.uri, "--collection", "live"]
        build_gallery(model, regions(feats, img_dim=16), server.uri, "live", options=NO_BAR, model_path=model_dir)
    else:
        place = ["--index", str(tmp_path / "idx")]
        build_gallery(model, regions(feats, img_dim=16), tmp_path / "idx", options=NO_BAR, model_path=model_dir)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "eslmatch.cli", "serve", *place, "--port", str(port), "--log-level", "warning"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, proc, log)
        assert _ids(base) == {str(i) for i in range(30)}
        added = _cli("index", "add", *place, "--features", str(tmp_path / "more.npy"))
        assert added.returncode == 0, added.stderr
        seen = _seconds_until(base, lambda ids: {"30", "31"} <= ids)
        deleted = _cli("index", "delete", *place, "--ids", "30", "7")
        assert deleted.returncode == 0 and "deleted 2 items" in deleted.stdout, deleted.stderr
        gone = _seconds_until(base, lambda ids: "30" not in ids and "7" not in ids and "31" in ids)
        with capsys.disabled():
            print(f"\n{store}: a running server saw an add after {seen:.2f} s and a delete after {gone:.2f} s")
        assert open_gallery(*(place[1::2])).__len__() == 30
    finally:
        proc.terminate()
        proc.wait(HUNG)
        if server is not None:
            server.stop()
