"""``eslmatch serve``: the JSON API, its refusals, and a burst against a real uvicorn server."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


def _need(name: str):
    """Skip without the optional web stack, except in CI (``CI`` set), where it must be installed."""
    return importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)


fastapi = _need("fastapi")
httpx = _need("httpx")
uvicorn = _need("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from _models import tiny_gru_model  # noqa: E402
from _wait import HUNG  # noqa: E402
from eslmatch.cli import main  # noqa: E402
from eslmatch.errors import EslmatchError  # noqa: E402
from eslmatch.retrieval import BuildOptions, build_gallery, open_gallery, regions  # noqa: E402
from eslmatch.serve import ServeConfig, create_app, load_app, runner  # noqa: E402
from eslmatch.serve.app import check_unicode, image_url  # noqa: E402
from eslmatch.serve.middleware import HostRules, normalize_host  # noqa: E402

COLOURS = {"red": (214, 48, 49), "blue": (9, 132, 227), "green": (0, 148, 50)}
SHAPES = ("circle", "square")
ODD_ID = "set a/red circle #0"  # slash, space and '#' must survive URLs
QUERIES = ["a red circle", "the blue square", "green circle left of a big square", "small red square", "a blue circle"]


@dataclass
class Gallery:
    root: Path
    index_dir: Path
    model_dir: Path
    ids: list[str]
    paths: list[str]


def draw_scene(path: Path, colour: str, shape: str, i: int, size: int = 96) -> None:
    """A coloured shape on a light background, placed differently for each ``i``."""
    img = Image.new("RGB", (size, size), (238, 236, 228))
    d = ImageDraw.Draw(img)
    x0, y0 = 10 + (i * 17) % 40, 12 + (i * 23) % 36
    box = (x0, y0, x0 + 40, y0 + 40)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    else:
        d.rectangle(box, fill=COLOURS[colour])
    img.save(path)


def make_gallery(root: Path, n: int = 12, odd_id: bool = False, broken: bool = False) -> Gallery:
    """A tiny GRU model saved to disk, ``n`` PNG images and an image index over random
    region features ``(n, 9, 16)`` on a 3x3 grid. ``broken`` adds two ids whose recorded
    files cannot be served (a text file, a missing file)."""
    model = tiny_gru_model()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    images = root / "images"
    images.mkdir(parents=True)
    ids, paths = [], []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 3], SHAPES[(i // 3) % 2]
        path = images / f"{colour}-{shape}-{i}.png"
        draw_scene(path, colour, shape, i)
        ids.append(ODD_ID if odd_id and i == 0 else f"{colour}-{shape}-{i}")
        paths.append(str(path))
    if broken:
        (images / "notes.txt").write_text("not an image\n")
        ids += ["text-file", "gone"]
        paths += [str(images / "notes.txt"), str(images / "gone.png")]
    feats = np.random.default_rng(0).standard_normal((len(ids), 9, 16)).astype(np.float32)
    src = regions(feats, img_dim=16, ids=ids, paths=paths, grid=(3, 3))
    build_gallery(model, src, root / "index", options=BuildOptions(progress=False), model_path=model_dir).close()
    return Gallery(root, root / "index", model_dir, ids, paths)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running_server(app, timeout: float = 20.0) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free port of 127.0.0.1 in a thread; yields the base URL."""
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", server_header=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def local_client(app, host: str = "127.0.0.1") -> TestClient:
    """A test client whose requests carry ``Host: {host}`` (TestClient's own "testserver" is
    no name a server answers to by default)."""
    return TestClient(app, base_url=f"http://{host}")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Gallery:
    return make_gallery(tmp_path_factory.mktemp("serve"), odd_id=True, broken=True)


@pytest.fixture(scope="module")
def app(gallery):
    return load_app(gallery.index_dir)


@pytest.fixture(scope="module")
def client(app) -> Iterator[TestClient]:
    with local_client(app) as c:
        yield c


@pytest.fixture(scope="module")
def library(gallery):
    """The gallery and its model opened directly, for the answers the server must give."""
    return open_gallery(gallery.index_dir)


def assert_error(resp, status: int | tuple[int, ...]) -> str:
    statuses = (status,) if isinstance(status, int) else status
    assert resp.status_code in statuses, (resp.status_code, resp.text[:200])
    assert resp.headers["content-type"].startswith("application/json")
    message = resp.json()["error"]
    assert isinstance(message, str) and message and "\n" not in message
    return message


# --------------------------------------------------------------------------- happy paths


def test_healthz(client, gallery):
    body = client.get("/healthz").json()
    assert body == {"status": "ok", "items": len(gallery.ids), "model": gallery.model_dir.name}


def test_search_matches_the_library(client, library):
    for text, k, rerank_k in [("a red circle", 5, 100), ("blue square above green", 3, 0), ("small circle", 14, 4)]:
        resp = client.post("/search", json={"text": f"  {text} ", "k": k, "rerank_k": rerank_k})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        hits = library.search(text, k=k, rerank_k=rerank_k)
        assert body["query"] == text
        assert body["took_ms"] >= 0
        assert [r["rank"] for r in body["results"]] == list(range(1, len(hits) + 1))
        assert [r["id"] for r in body["results"]] == [h.id for h in hits]
        np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in hits], rtol=1e-6)
        np.testing.assert_allclose(
            [r["first_stage_score"] for r in body["results"]], [h.first_stage_score for h in hits], rtol=1e-6
        )


def test_search_defaults_and_small_gallery(client, gallery):
    body = client.post("/search", json={"text": "a red circle"}).json()
    assert len(body["results"]) == ServeConfig().default_k
    body = client.post("/search", json={"text": "a red circle", "k": 1000}).json()
    assert sorted(r["id"] for r in body["results"]) == sorted(gallery.ids)  # k > N gives all N


def test_image_urls_serve_the_recorded_files(client, gallery):
    body = client.post("/search", json={"text": "red circle", "k": len(gallery.ids)}).json()
    by_id = {r["id"]: r["image_url"] for r in body["results"]}
    assert by_id["text-file"] is None and by_id["gone"] is None  # nothing servable recorded
    assert by_id[ODD_ID] == image_url(ODD_ID) and "%2F" in by_id[ODD_ID] and "%23" in by_id[ODD_ID]
    for item_id, path in zip(gallery.ids[:-2], gallery.paths[:-2]):
        resp = client.get(by_id[item_id])
        assert resp.status_code == 200, (item_id, resp.text)
        assert resp.headers["content-type"] == "image/png"
        assert resp.content == Path(path).read_bytes()


def test_attention_get_and_post(client, library, gallery):
    item = gallery.ids[4]
    words, weights, grid = library.attention("a big red circle", item)
    for resp in (
        client.get("/attention", params={"text": "a big red circle", "id": item}),
        client.post("/attention", json={"text": "a big red circle", "id": item}),
    ):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["words"] == words
        assert body["grid"] == [3, 3] == list(grid)
        w = np.asarray(body["weights"])
        assert w.shape == (len(words), 9)
        np.testing.assert_allclose(w, weights, rtol=1e-6)
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
        assert body["image_url"] == image_url(item)
    assert_error(client.get("/attention", params={"text": "red", "id": "no-such-id"}), 404)
    assert_error(client.get("/attention", params={"text": " ", "id": item}), 422)
    assert_error(client.get("/attention", params={"text": "red"}), 422)


def test_page_and_static_files_are_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="search-form"' in page.text and '<label for="query"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.head("/").status_code == 200 and client.head("/healthz").status_code == 200
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")]:
        resp = client.get(f"/static/{name}")
        assert resp.status_code == 200 and kind in resp.headers["content-type"]
    static = Path(__file__).resolve().parents[1] / "src" / "eslmatch" / "serve" / "static"
    for f in static.iterdir():  # offline: nothing fetched from other hosts, no inline code
        text = f.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name
        assert "@import" not in text and "@font-face" not in text, f.name
    assert "<script>" not in page.text and " onclick=" not in page.text and "style=" not in page.text


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"text": ""}, "empty"),
        ({"text": " \n\t "}, "empty"),
        ({"text": "x" * 1001}, "too long"),
        ({"text": "red", "k": 0}, "k must be"),
        ({"text": "red", "k": 10**6}, "k must be"),
        ({"text": "red", "k": -3}, "k must be"),
        ({"text": "red", "rerank_k": -1}, "rerank_k must be"),
        ({"text": "red", "rerank_k": 2001}, "rerank_k must be"),
        ({"text": "red", "k": "ten"}, "k:"),
        ({"text": "red", "k": 1.5}, "k:"),
        ({"text": "red", "k": True}, "k:"),  # strict integers: no booleans, strings or floats
        ({"text": "red", "k": "5"}, "k:"),
        ({"text": "red", "k": 2.0}, "k:"),
        ({"text": "red", "rerank_k": False}, "rerank_k:"),
        ({"text": "\x00\x00"}, "empty"),  # NUL or zero-width only: no text at all
        ({"text": "\u200b\u200c\ufeff"}, "empty"),
        ({"text": "red", "where": "folder ==="}, "filter"),
        ({"text": "red", "where": "nosuch == 1"}, "unknown field 'nosuch'"),
        ({"text": ["red"]}, "text:"),
        ({"k": 3}, "text: Field required"),
        ({"text": "red", "topk": 3}, "topk"),
    ],
)
def test_bad_search_requests(client, body, fragment):
    message = assert_error(client.post("/search", json=body), 422)
    assert fragment in message


def test_not_json_and_wrong_method(client):
    assert "not valid JSON" in assert_error(
        client.post("/search", content=b"{text: red", headers={"content-type": "application/json"}), 422
    )
    assert_error(client.get("/search"), 405)
    assert_error(client.get("/no/such/page"), 404)


def test_huge_bodies_are_refused_before_parsing(client, monkeypatch):
    from eslmatch.serve import app as app_module

    def boom(*a, **k):  # the text check must never see a refused body
        raise AssertionError("the endpoint ran")

    monkeypatch.setattr(app_module, "check_text", boom)
    big = b'{"text": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    start = time.perf_counter()
    resp = client.post("/search", content=big, headers={"content-type": "application/json"})
    took = time.perf_counter() - start
    assert "too large" in assert_error(resp, 413)
    print(f"10 MB body refused with 413 in {took * 1000:.1f} ms")

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(4):
            yield b"x" * 30_000

    assert "too large" in assert_error(
        client.post("/search", content=chunks(), headers={"content-type": "application/json"}), 413
    )


def test_body_just_under_the_limit_is_parsed(client):
    body = json.dumps({"text": "a" * 60_000}).encode()
    assert len(body) < ServeConfig().max_body_bytes
    assert "too long" in assert_error(
        client.post("/search", content=body, headers={"content-type": "application/json"}), 422
    )


def test_limits_are_configurable(gallery):
    app = load_app(gallery.index_dir, config=ServeConfig(max_text_chars=5, max_k=2, max_rerank_k=3, max_body_bytes=200))
    with local_client(app) as c:
        assert c.post("/search", json={"text": "red", "k": 2, "rerank_k": 3}).status_code == 200
        assert "too long" in assert_error(c.post("/search", json={"text": "a red circle"}), 422)
        assert_error(c.post("/search", json={"text": "red", "k": 3}), 422)
        assert_error(c.post("/search", json={"text": "red", "k": 1, "rerank_k": 4}), 422)
        assert_error(c.post("/search", json={"text": "red", "k": 1, "pad": "x" * 300}), 413)


TRICKS = [
    "/image/../../etc/passwd",
    "/image/..%2F..%2Fetc%2Fpasswd",
    "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/image/%2E%2E/%2E%2E/etc/passwd",
    "/image/%252e%252e%252fetc%252fpasswd",
    "/image/..%5c..%5cetc%5cpasswd",
    "/image//etc/passwd",
    "/image/%2Fetc%2Fpasswd",
    "/image/....//....//etc/passwd",
    "/image/%c0%ae%c0%ae/etc/passwd",
    "/image/red-circle-0%00.png",
    "/image/" + "a" * 5000,
]


@pytest.mark.parametrize("url", TRICKS)
def test_image_path_tricks_never_leave_the_index(client, gallery, url):
    # A real file beside the index, reachable by a traversal if ids were ever joined to paths.
    (gallery.root / "secret.png").write_bytes(b"SECRET")
    resp = client.get(url)
    assert_error(resp, (400, 404))
    assert b"root:" not in resp.content and b"SECRET" not in resp.content
    for rel in ("../secret.png", "..%2Fsecret.png", "%2E%2E%2Fsecret.png", "images/../../secret.png"):
        r = client.get(f"/image/{rel}")
        assert r.status_code in (400, 404) and b"SECRET" not in r.content


def test_image_unknown_unservable_ids(client, gallery):
    assert_error(client.get("/image/no-such-id"), 404)
    assert_error(client.get("/image/text-file"), 404)  # recorded, but not an image type
    assert_error(client.get("/image/gone"), 404)  # recorded, but missing on disk
    assert client.get(image_url(gallery.ids[1])).status_code == 200


@pytest.mark.parametrize(
    "text, status",
    [
        ("!!!", 422),
        ("\u00e9t\u00e9 \u2603 \U0001f600", 200),
        ("<script>alert(1)</script>", 200),
        ("RED circle", 200),
    ],
)
def test_odd_texts_are_answered_not_crashed(client, gallery, text, status):
    for resp in (
        client.post("/search", json={"text": text, "k": 3}),
        client.get("/attention", params={"text": text, "id": gallery.ids[1]}),
    ):
        if status == 200:
            assert resp.status_code == 200, resp.text
        else:
            assert "no words" in assert_error(resp, status)


# --------------------------------------------------------------------------- lone surrogates

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("text", [r"\ud800 circle", r"red \udc00", r"a red circle\ud83d", r"\udfff"])
def test_lone_surrogates_in_text_are_422(client, gallery, monkeypatch, text):
    """A JSON escape of a lone UTF-16 surrogate decodes to a str no tokenizer or response can
    encode: it is refused as invalid Unicode, never a 500, and never reaches the model."""
    from eslmatch.serve import app as app_module

    monkeypatch.setattr(app_module.Served, "run", lambda *a, **k: pytest.fail("the model ran"))
    quoted = '"' + text + '"'  # the JSON escape as sent: ASCII bytes, backslash and all
    bodies = [
        ("/search", f'{{"text": {quoted}}}'),
        ("/search", f'{{"text": {quoted}, "k": 3, "rerank_k": 0}}'),
        ("/attention", f'{{"text": {quoted}, "id": "{gallery.ids[1]}"}}'),
    ]
    for url, body in bodies:
        resp = client.post(url, content=body.encode("ascii"), headers=JSON)
        assert assert_error(resp, 422) == "text is not valid Unicode (lone surrogate)", (url, body)


def test_lone_surrogates_in_other_fields(client, gallery):
    resp = client.post("/attention", content=b'{"text": "red", "id": "\\ud800"}', headers=JSON)
    assert assert_error(resp, 422) == "id is not valid Unicode (lone surrogate)"
    # In a number field or an unknown field's name: a validation error, answered as valid JSON.
    assert "k:" in assert_error(client.post("/search", content=b'{"text": "red", "k": "\\ud800"}', headers=JSON), 422)
    assert_error(client.post("/search", content=b'{"text": "red", "\\ud800x": 1}', headers=JSON), 422)
    # Query strings and paths are percent-decoded with replacement characters: no surrogates there.
    resp = client.get(f"/attention?text=%ED%A0%80%20circle&id={gallery.ids[1]}")
    assert resp.status_code == 200 and resp.json()["query"] == "\ufffd\ufffd\ufffd circle"
    assert_error(client.get("/image/%ED%A0%80"), 404)


def test_surrogate_pairs_are_fine(client, gallery):
    """A proper pair (here U+1F600, escaped as two surrogates) is valid text."""
    resp = client.post("/search", content=b'{"text": "red circle \\ud83d\\ude00", "k": 2}', headers=JSON)
    assert resp.status_code == 200, resp.text
    assert resp.json()["query"] == "red circle \U0001f600"


def test_check_unicode():
    assert check_unicode("caf\u00e9 \U0001f600", "text") == "caf\u00e9 \U0001f600"
    with pytest.raises(Exception, match=r"^id is not valid Unicode \(lone surrogate\)$") as info:
        check_unicode("x\udc80", "id", status=400)
    assert info.value.status == 400


# --------------------------------------------------------------------------- Host header (DNS rebinding)

LOCAL_HOSTS = ["127.0.0.1", "127.0.0.1:8000", "localhost", "LocalHost:1", "[::1]", "[::1]:8000", "[0:0:0:0:0:0:0:1]:80"]
FOREIGN_HOSTS = [
    "testserver",
    "evil.example",
    "evil.example:8000",
    "127.0.0.1.evil.example",
    "localhost.evil",
    "evil.example#127.0.0.1",
    "127.0.0.1:80@evil.example",
    "localhost:abc",
    "[::1",
    "[::1]x",
    "0.0.0.0",
    "0.0.0.0:8000",
    "192.168.1.5",
    "127.0.0.2",
    "[fe80::1]",
    "",
    " ",
]


def get_with_host(client: TestClient, url: str, host: str):
    return client.get(url, headers={"host": host})


@pytest.mark.parametrize("host", LOCAL_HOSTS)
def test_local_host_names_are_answered(client, host):
    resp = get_with_host(client, "/healthz", host)
    assert resp.status_code == 200, (host, resp.text)


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_other_host_names_are_421(client, host, monkeypatch):
    from eslmatch.serve import app as app_module

    monkeypatch.setattr(app_module, "check_text", lambda *a, **k: pytest.fail("the endpoint ran"))
    for resp in (
        get_with_host(client, "/healthz", host),
        get_with_host(client, "/", host),
        client.post("/search", json={"text": "red"}, headers={"host": host}),
    ):
        message = assert_error(resp, 421)
        assert "Host not allowed" in message and "--allowed-host" in message
        assert host.strip() == "" or host not in message  # the header is not echoed


def test_host_rules():
    rules = HostRules(["127.0.0.1", "localhost", "::1", "Search.Example.org", "[2001:db8::7]:443", "10.0.0.7"])
    for ok in [b"search.example.org", b"SEARCH.example.org:8443", b"[2001:DB8:0::7]", b"10.0.0.7:80", b"[::1]:1"]:
        assert rules.allows(ok), ok
    for bad in [
        None,
        b"",
        b"example.org",
        b"www.search.example.org",
        b"10.0.0.8",
        b"search.example.org.",
        b"search.example.org:",
        b"search.example.org:8x",
    ]:
        assert not rules.allows(bad), bad
    everywhere = HostRules(["127.0.0.1", "0.0.0.0"])  # bound to every interface: address literals pass
    assert everywhere.allows(b"192.168.1.5:8000") and everywhere.allows(b"[fe80::1]") and everywhere.allows(b"0.0.0.0")
    assert not everywhere.allows(b"evil.example") and not everywhere.allows(b"rebind.127.0.0.1.nip.io")
    assert HostRules(["::"]).allows(b"10.1.2.3")
    star = HostRules(["localhost", "*"])
    assert star.allows(b"anything.example") and star.allows(None)
    for entry in ["a/b", "", "bad host", "user@evil", "[::1", "host:port", "[nope]", "*.example.org", "a,b", "x#y"]:
        with pytest.raises(EslmatchError, match="is not a host name or IP address"):
            HostRules([entry])
    assert [normalize_host(h) for h in ("LOCALHOST:8000", "[0:0::1]:80", "::1", "10.0.0.7:80", "a b")] == [
        "localhost",
        "::1",
        "::1",
        "10.0.0.7",
        None,
    ]


def test_allowed_hosts_option(library):
    app = create_app(library, allowed_hosts=["search.example.org", "10.0.0.7"])
    with local_client(app, "search.example.org") as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/search", json={"text": "red", "k": 2}).status_code == 200
        for host in ("search.example.org:443", "10.0.0.7:8000", "localhost:8000"):
            assert get_with_host(c, "/healthz", host).status_code == 200, host
        assert_error(get_with_host(c, "/healthz", "evil.example"), 421)
    with pytest.raises(EslmatchError, match="'a/b' is not a host name"):
        create_app(library, allowed_hosts=["a/b"])  # refused when built, not on the first request


def test_real_server_checks_the_host_header(library):
    with running_server(create_app(library)) as base:  # its own app: the server's exit closes it
        port = base.rsplit(":", 1)[1]
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200  # Host: 127.0.0.1:PORT
        assert httpx.get(f"{base}/healthz", headers={"host": f"localhost:{port}"}, timeout=30).status_code == 200
        resp = httpx.get(f"{base}/healthz", headers={"host": f"rebind.example:{port}"}, timeout=30)
        assert "Host not allowed" in assert_error(resp, 421)
        resp = httpx.post(f"{base}/search", json={"text": "red"}, headers={"host": "rebind.example"}, timeout=30)
        assert_error(resp, 421)
        status, body = raw_request(base, b"GET /healthz HTTP/1.0\r\n\r\n")  # no Host header at all
        assert status == 421 and "missing Host header" in json.loads(body)["error"]
        payload = b'{"text": "\\ud800 circle"}'  # the bytes an outside probe sent
        status, body = raw_request(
            base,
            b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload),
        )
        assert status == 422 and json.loads(body) == {"error": "text is not valid Unicode (lone surrogate)"}
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200


def raw_request(base: str, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as is to the server at ``base``; its status and body."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class GatedGallery:
    """Delegates to a real gallery; ``search`` waits until the test opens the gate."""

    def __init__(self, gallery) -> None:
        self.inner = gallery
        self.entered = threading.Event()
        self.gate = threading.Event()

    def search(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(HUNG)
        return self.inner.search(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_inference_queue_is_bounded(library):
    gated = GatedGallery(library)
    app = create_app(gated, ServeConfig(max_pending=1))
    with running_server(app) as base, ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(httpx.post, f"{base}/search", json={"text": "red"}, timeout=30)
        assert gated.entered.wait(HUNG)
        # The one slot is taken: a second search is refused at once; other endpoints still answer.
        assert "busy" in assert_error(httpx.post(f"{base}/search", json={"text": "blue"}, timeout=30), 503)
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
        gated.gate.set()
        assert first.result().status_code == 200
        assert httpx.post(f"{base}/search", json={"text": "blue"}, timeout=30).status_code == 200


# --------------------------------------------------------------------------- burst


@pytest.mark.slow
def test_burst_against_a_real_server(app, gallery, library):
    """1,000 requests, 8 at a time, on 127.0.0.1: no errors, answers equal to sequential ones."""
    expected = {q: [(h.id, h.score) for h in library.search(q, k=5, rerank_k=100)] for q in QUERIES}
    image = image_url(gallery.ids[2])
    local = threading.local()

    def one(i: int) -> tuple[bool, float, str]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=base, timeout=30.0)
        start = time.perf_counter()
        try:
            if i % 10 == 0:
                r = client.get("/healthz")
                ok = r.status_code == 200 and r.json()["items"] == len(gallery.ids)
            elif i % 10 == 1:
                r = client.get(image)
                ok = r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
            else:
                q = QUERIES[i % len(QUERIES)]
                r = client.post("/search", json={"text": q, "k": 5})
                got = [(x["id"], x["score"]) for x in r.json()["results"]] if r.status_code == 200 else None
                ok = (
                    got is not None
                    and [g[0] for g in got] == [e[0] for e in expected[q]]
                    and np.allclose([g[1] for g in got], [e[1] for e in expected[q]], rtol=1e-6)
                )
            return ok, time.perf_counter() - start, "" if ok else f"{r.status_code} {r.text[:120]}"
        except httpx.HTTPError as exc:
            return False, time.perf_counter() - start, repr(exc)

    with running_server(app) as base:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = list(pool.map(one, range(1000)))
        wall = time.perf_counter() - start
        assert httpx.get(f"{base}/healthz").status_code == 200  # still serving after the burst
    errors = [o[2] for o in outcomes if not o[0]]
    lat = sorted(o[1] for o in outcomes)
    p95 = lat[int(0.95 * len(lat)) - 1]
    print(
        f"burst: 1000 requests, concurrency 8, {wall:.2f} s, {1000 / wall:.0f} req/s, "
        f"median {statistics.median(lat) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, errors {len(errors)}"
    )
    assert errors == [], errors[:5]


def test_real_server_refuses_a_10mb_body(app):
    with running_server(app) as base:
        big = b'{"text": "' + b"a" * (10 * 1024 * 1024) + b'"}'
        try:
            resp = httpx.post(f"{base}/search", content=big, headers={"content-type": "application/json"}, timeout=30)
        except httpx.TransportError:  # the server may close before the client finishes sending
            resp = None
        if resp is not None:
            assert_error(resp, 413)
        assert httpx.get(f"{base}/healthz").status_code == 200


# --------------------------------------------------------------------------- command line


def test_cli_serve_wiring(gallery, monkeypatch, capsys):
    calls = {}

    def fake_run(app, sock, limits, log_level):
        host, port = sock.getsockname()[:2]
        calls.update(app=app, host=host, port=port, limits=limits)

    monkeypatch.setattr(runner, "run_server", fake_run)
    assert main(["serve", "--index", str(gallery.index_dir), "--port", "0", "--header-timeout", "3"]) == 0
    assert calls["host"] == "127.0.0.1" and calls["port"] > 0 and calls["limits"].header_timeout == 3
    err = capsys.readouterr().err
    assert f"on http://127.0.0.1:{calls['port']}/" in err and "warning" not in err  # the port it got, not 0
    with local_client(calls["app"]) as c:
        assert c.get("/healthz").json()["items"] == len(gallery.ids)

    assert (
        main(["serve", "--index", str(gallery.index_dir), "--host", "0.0.0.0", "--port", "0", "--max-text", "7"]) == 0
    )
    err = capsys.readouterr().err
    assert "warning: binding to 0.0.0.0" in err
    with local_client(calls["app"]) as c:
        assert "at most 7" in c.post("/search", json={"text": "a red circle"}).json()["error"]
        # Bound to every interface: reachable by any address of the machine, never by a foreign name.
        assert get_with_host(c, "/healthz", "192.168.1.5:8000").status_code == 200
        assert_error(get_with_host(c, "/healthz", "search.example.org"), 421)


def test_cli_serve_allowed_hosts(gallery, monkeypatch, capsys):
    calls = {}
    monkeypatch.setattr(runner, "run_server", lambda app, sock, limits, log_level: calls.update(app=app))
    monkeypatch.setattr(runner, "bind_socket", lambda host, port: free_socket())  # --host names no real address
    assert main(["serve", "--index", str(gallery.index_dir), "--port", "0"]) == 0
    with local_client(calls["app"]) as c:
        assert_error(get_with_host(c, "/healthz", "search.example.org"), 421)
        assert_error(get_with_host(c, "/healthz", "myhost.lan"), 421)
    assert (
        main(
            [
                "serve",
                "--index",
                str(gallery.index_dir),
                "--host",
                "myhost.lan",
                "--allowed-host",
                "search.example.org",
                "--allowed-host",
                "10.0.0.7",
            ]
        )
        == 0
    )
    with local_client(calls["app"], "search.example.org") as c:
        for host in ("search.example.org", "search.example.org:443", "myhost.lan:8000", "10.0.0.7", "localhost"):
            assert get_with_host(c, "/healthz", host).status_code == 200, host
        assert_error(get_with_host(c, "/healthz", "evil.example"), 421)
    assert main(["serve", "--index", str(gallery.index_dir), "--allowed-host", "*"]) == 0
    with local_client(calls["app"], "anything.example") as c:
        assert c.get("/healthz").status_code == 200


def test_cli_serve_errors_are_one_line(gallery, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_server", lambda *a, **kw: pytest.fail("must not start"))
    monkeypatch.setattr(runner, "bind_socket", lambda host, port: free_socket())  # port 8000 may be taken here
    other = tmp_path / "other"
    tiny_gru_model(seed=1, embed_size=64).save_pretrained(other)
    cases = [
        (["--index", str(tmp_path / "missing")], "missing"),
        (["--index", str(gallery.index_dir), "--model", str(other)], "model"),
        (["--index", str(gallery.index_dir), "--max-k", "0"], "max_k"),
        (["--index", str(gallery.index_dir), "--port", "70000"], "--port"),
        (["--index", str(gallery.index_dir), "--allowed-host", "evil.example/x"], "not a host name"),
    ]
    for args, fragment in cases:
        assert main(["serve", *args]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("eslmatch: error:") and len(err.splitlines()) == 1 and fragment in err, err


def test_create_app_with_an_open_index(library):
    with local_client(create_app(library, model_name="m")) as c:
        assert c.get("/healthz").json()["model"] == "m"
        assert c.post("/search", json={"text": "red", "k": 2}).status_code == 200


def test_a_library_error_is_answered_by_its_kind_never_by_its_wording():
    """Issue 32: the status came from the message text ("no item with id" -> 404) and from an
    ``http_status`` attribute. Now one table maps each error kind (its type) to a status."""
    from eslmatch import errors
    from eslmatch.retrieval.filters import FilterError
    from eslmatch.retrieval.metadata import MetadataError
    from eslmatch.retrieval.milvus.conn import MilvusError
    from eslmatch.serve.app import status_of

    wording = "no item with id 'x'"  # the text that used to decide
    assert status_of(errors.NotFound(wording)) == 404
    assert status_of(errors.NotFound("gone")) == 404
    assert status_of(errors.InvalidInput(wording)) == 422
    assert status_of(errors.EslmatchError(wording)) == 422
    assert status_of(errors.Conflict("id 'a' is in the gallery already")) == 409
    assert status_of(errors.Unavailable("later")) == 503
    # the library's own errors answer as their kind
    assert status_of(errors.BusyError("another process is writing")) == 503
    assert status_of(MilvusError("cannot reach Milvus")) == 503
    assert status_of(MetadataError("field 'year' is an int")) == 422
    assert status_of(FilterError("unknown field")) == 422
    assert status_of(errors.InputError("bad lengths")) == 422

    from fastapi import FastAPI

    from eslmatch.serve.app import _errors

    app = FastAPI()
    _errors(app)
    for kind, status in [(errors.NotFound, 404), (errors.Conflict, 409), (errors.Unavailable, 503)]:

        @app.get(f"/{kind.__name__}")
        async def fail(kind: type[errors.EslmatchError] = kind) -> None:
            raise kind("first line\nsecond line")

        r = TestClient(app).get(f"/{kind.__name__}")
        assert r.status_code == status and r.json() == {"error": "first line"}
        assert (r.headers.get("Retry-After") == "5") == (status == 503)


def test_a_missing_item_is_not_found_by_type(tmp_path):
    """The library raises :class:`~eslmatch.errors.NotFound` for an id it does not hold, and
    :class:`~eslmatch.errors.Conflict` for an id it holds when told to refuse duplicates."""
    from eslmatch.errors import Conflict, NotFound

    made = make_gallery(tmp_path, n=3)
    g = open_gallery(made.index_dir)
    feats = np.zeros((1, 9, 16), np.float32)
    with pytest.raises(NotFound, match="no item with id 'c'"):
        g.delete(ids=["c"])
    with pytest.raises(NotFound):
        g.metadata("c")
    with pytest.raises(NotFound):
        g.update({"c": {"year": 1}})
    with pytest.raises(Conflict):
        g.add(regions(feats, img_dim=16, ids=[made.ids[0]], grid=(3, 3)), on_duplicate="error")
    assert len(g) == 3
    g.close()


def test_the_limit_options_are_the_limits_fields():
    """Each limit's default lived twice, in the server's dataclasses and in the command's
    options; the options are now made from the fields, so ``serve`` with no limit given runs
    with exactly the library's defaults."""
    from dataclasses import asdict

    from eslmatch.cli import build_parser
    from eslmatch.serve.limits import ConnectionLimits, ServeConfig, options_of

    args = build_parser("serve").parse_args(["serve", "--index", "x"])
    for cls in (ServeConfig, ConnectionLimits):
        given = {o.name: getattr(args, o.name) for o in options_of(cls)}
        assert given and given == {k: v for k, v in asdict(cls()).items() if k in given}
    assert build_parser("serve").parse_args(["serve", "--max-text", "7"]).max_text_chars == 7
