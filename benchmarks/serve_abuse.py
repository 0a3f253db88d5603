"""``eslmatch serve`` under abuse, live: the figures issue 34 asks for, measured on this machine.

    python benchmarks/serve_abuse.py          # writes benchmarks/results/serve-abuse-cpu.{json,md}

A gallery of 100 small photos and one 12 MB photo, indexed with a tiny random ESL-CLIP, is served
by ``python -m eslmatch.cli serve`` in a new process per scenario (loopback only):

- **flood-1024**: ``ulimit -n 1024``; 3,000 connections sending half a request head and 3,000
  sending nothing, held 10 s; ``/healthz`` every 0.5 s (3 s timeout). Then **flood-20000**: the
  descriptor limit of this machine, 19,800 half-idle connections held 3 s, a probe every 50 ms.
- **d1**: two unauthenticated ``POST /items`` declaring 1.25 GB bodies, sent as fast as the server
  takes them, to a read-only and to a token server: the answer, when, and the RSS growth.
- **d6**: another process deletes an item and compacts, 80 times, while 4 threads read
  ``/items/{id}`` and ``/image/{id}``: answers of another item (wrong) counted.
- **d7**: another process holds the gallery's write lock 20 s: searches meanwhile against before,
  and a write sent meanwhile (503, or done once the lock is free).
- **d8**: ``index build --out SAME`` (other photos) under the server: every answer is the old
  gallery's, the new one's (as the CLI gives it), or 503; mixtures counted.
- **d9**: 4 clients posting a 39.7-Mpx PNG to ``/search/image``, then 4 clients searching with
  ``k=1000``: ``/healthz`` every 50 ms (p50, p95, max).
- **d10**: ``--max-connections 100``, 100 clients that ask for the 12 MB photo and read nothing:
  how long until ``/healthz`` answers (the send timeout, 30 s by default).

Every figure is printed and recorded with the CPU it was measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))

from _flood import flood, limit_descriptors, raise_own_fd_limit, rss_kib  # noqa: E402

TOKEN = "bench-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_photo(path: Path, seed: int, size: int = 48) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.read_bytes()


def token_flags(work: Path) -> tuple[str, str]:
    (work / "token").write_text(TOKEN + "\n")
    return "--write-token-file", str(work / "token")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(index: Path, work: Path, *flags: str, fd_limit: int | None = None) -> Iterator[tuple[str, Any, Path]]:
    """``eslmatch serve`` in a new process; (base URL, process, log). Stopped with SIGTERM."""
    port = free_port()
    log = work / f"serve-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "eslmatch.cli", "serve", "--index", str(index), "--port", str(port), *flags]
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            preexec_fn=limit_descriptors(fd_limit) if fd_limit else None,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                    break
            time.sleep(0.1)
        yield base, proc, log
    finally:
        proc.terminate()
        proc.wait(120)


def shutdown_clean(log: Path) -> bool:
    return "Traceback" not in log.read_text()


def quantiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}
    return {
        "n": len(v),
        "p50_ms": round(1000 * v[len(v) // 2], 1),
        "p95_ms": round(1000 * v[min(len(v) - 1, int(len(v) * 0.95))], 1),
        "max_ms": round(1000 * v[-1], 1),
    }


class Probe(threading.Thread):
    """Calls ``fn`` every ``every`` seconds until stopped; its latencies (inf: failed)."""

    def __init__(self, fn: Callable[[], bool], every: float) -> None:
        super().__init__(daemon=True)
        self.fn, self.every, self.stop, self.latencies = fn, every, threading.Event(), []

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                ok = self.fn()
            except (httpx.HTTPError, OSError):
                ok = False
            self.latencies.append(time.monotonic() - t if ok else float("inf"))
            self.stop.wait(max(0.0, t + self.every - time.monotonic()))

    def finish(self) -> list[float]:
        self.stop.set()
        self.join(60)
        return self.latencies


def healthz(base: str, timeout: float = 10) -> Callable[[], bool]:
    return lambda: httpx.get(base + "/healthz", timeout=timeout).status_code == 200


# ------------------------------------------------------------------------------------------ scenarios
def flood_1024(index: Path, work: Path) -> dict[str, Any]:
    with serving(index, work, fd_limit=1024) as (base, proc, log):
        seen = flood(base, proc.pid, log, {1: 3000, 0: 3000}, hold=10, every=0.5, timeout=3)
    answered = [p for p in seen.probes if p != float("inf")]
    text = log.read_text()
    return {
        "sockets": seen.sockets,
        "probes": len(seen.probes),
        "answered": len(answered),
        "within_1s": sum(p <= 1.0 for p in seen.probes),
        **quantiles(answered),
        "log_growth_bytes": seen.log_growth,
        "rss_before_mib": seen.rss_before // 1024,
        "rss_peak_mib": seen.rss_peak // 1024,
        "failed_accepts_logged": "out of system resource" in text,
        "clean_shutdown": shutdown_clean(log),
    }


def flood_20000(index: Path, work: Path) -> dict[str, Any]:
    n = min(19_800, raise_own_fd_limit() - 200)
    with serving(index, work) as (base, proc, log):
        seen = flood(base, proc.pid, log, {2: n}, hold=3, every=0.05, timeout=30)
    answered = [p for p in seen.probes if p != float("inf")]
    return {
        "sockets": seen.sockets,
        "probes": len(seen.probes),
        "answered": len(answered),
        **quantiles(answered),
        "log_growth_bytes": seen.log_growth,
        "rss_before_mib": seen.rss_before // 1024,
        "rss_peak_mib": seen.rss_peak // 1024,
        "clean_shutdown": shutdown_clean(log),
    }


def _huge_body(base: str, out: dict[str, Any], key: str, headers: str) -> None:
    """A ``POST /items`` declaring 1.25 GB, sent until the server answers or closes."""
    port = int(base.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port))
    size = 1_250_000_000
    s.sendall(
        f"POST /items HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
        f"Content-Length: {size}\r\n{headers}\r\n".encode()
    )
    start, sent, chunk = time.monotonic(), 0, b"x" * (1 << 20)
    s.setblocking(False)
    answer = b""
    while sent < size and time.monotonic() - start < 20:
        try:
            answer += s.recv(4096)
            if answer:
                break
        except BlockingIOError:
            pass
        except OSError:
            break
        try:
            sent += s.send(chunk)
        except BlockingIOError:
            time.sleep(0.001)
        except OSError:
            break
    s.setblocking(True)
    s.settimeout(5)
    with contextlib.suppress(OSError):
        answer += s.recv(4096)
    s.close()
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    out[key] = {"answer": status, "after_s": round(time.monotonic() - start, 3), "sent_mib": round(sent / 2**20, 1)}


def d1(index: Path, work: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, flags, headers in (
        ("read_only", (), ""),
        ("token_server", token_flags(work), "Authorization: Bearer wrong-token-0123456789\r\n"),
    ):
        with serving(index, work, *flags) as (base, proc, _log):
            before, peak, seen = rss_kib(proc.pid), 0, {}
            threads = [threading.Thread(target=_huge_body, args=(base, seen, f"client{i}", headers)) for i in range(2)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak = max(peak, rss_kib(proc.pid))
                time.sleep(0.05)
            result[name] = {**seen, "rss_growth_mib": round((max(peak, rss_kib(proc.pid)) - before) / 1024, 1)}
    return result


def d6(index: Path, work: Path, hashes: dict[str, str]) -> dict[str, Any]:
    ids = sorted(hashes)
    writer = (
        "import sys\nfrom eslmatch.retrieval import open_gallery\n"
        f"g = open_gallery({str(index)!r})\n"
        "for item in sys.argv[1:]:\n    g.delete([item])\n    g.compact()\n"
    )
    victims = [i for i in ids if i != "big"][:80]
    counts = {"items_ok": 0, "images_ok": 0, "gone": 0, "wrong": 0, "errors": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng, client = random.Random(seed), httpx.Client(timeout=30)
        while not stop.is_set():
            item = rng.choice(ids)
            if item == "big":
                continue
            try:
                r = client.get(f"{base}/items/{item}")
                if r.status_code == 200:
                    fields = r.json()["fields"]
                    got = "items_ok" if fields.get("id") == item and fields.get("tag") == item else "wrong"
                else:
                    got = "gone" if r.status_code == 404 else "errors"
                i = client.get(f"{base}/image/{item}")
                if i.status_code == 200:
                    img = "images_ok" if hashlib.sha256(i.content).hexdigest() == hashes[item] else "wrong"
                else:
                    img = "gone" if i.status_code == 404 else "errors"
            except httpx.HTTPError:
                got = img = "errors"
            with lock:
                counts[got] += 1
                counts[img] += 1

    with serving(index, work, *token_flags(work)) as (base, _proc, _log):
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        subprocess.run([sys.executable, "-c", writer, *victims], check=True, env=env)
        took = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join()
    return {"cycles": len(victims), "cycles_s": round(took, 1), **counts}


def _search(base: str, k: int = 5) -> tuple[int, list[tuple[str, float]]]:
    r = httpx.post(base + "/search", json={"text": "a photo", "k": k}, timeout=120)
    hits = [(h["id"], h["score"]) for h in r.json()["results"]] if r.status_code == 200 else []
    return r.status_code, hits


def d7(index: Path, work: Path) -> dict[str, Any]:
    holder = (
        "import sys, time\nfrom pathlib import Path\nfrom eslmatch.retrieval.files.commit import write_lock\n"
        "with write_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(20)\n"
    )
    with serving(index, work, *token_flags(work)) as (base, _proc, _log):
        timed = lambda: _search(base)[0] == 200  # noqa: E731
        before = Probe(timed, 0.1)
        before.start()
        time.sleep(5)
        baseline = before.finish()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        hold = subprocess.Popen([sys.executable, "-c", holder, str(index)], stdout=subprocess.PIPE, env=env, text=True)
        assert hold.stdout is not None and hold.stdout.readline().strip() == "held"
        held_at = time.monotonic()
        write: dict[str, Any] = {}

        def one_write() -> None:
            t = time.monotonic()
            r = httpx.delete(f"{base}/items/p099", headers=AUTH, timeout=120)
            write.update(
                status=r.status_code, after_s=round(time.monotonic() - t, 2), retry_after=r.headers.get("retry-after")
            )

        writer = threading.Thread(target=one_write)
        writer.start()
        during = Probe(timed, 0.1)
        during.start()
        hold.wait()
        held = during.finish()
        writer.join()
    return {
        "hold_s": round(time.monotonic() - held_at, 1),
        "search_before": quantiles(baseline),
        "search_during_hold": quantiles([x for x in held if x != float("inf")]),
        "search_failed_during_hold": sum(x == float("inf") for x in held),
        "write_sent_during_hold": write,
    }


def d8(index: Path, work: Path, model: Path, other_photos: Path) -> dict[str, Any]:
    from eslmatch.retrieval import open_gallery

    seen: list[tuple[float, int, list[tuple[str, float]]]] = []
    stop = threading.Event()
    with serving(index, work, *token_flags(work)) as (base, _proc, _log):
        old = _search(base)[1]

        def poll() -> None:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    seen.append((time.monotonic(), *_search(base)))
                time.sleep(0.05)

        t = threading.Thread(target=poll)
        t.start()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        cmd = ["index", "build", "--model", str(model), "--images", str(other_photos), "--out", str(index)]
        subprocess.run([sys.executable, "-m", "eslmatch.cli", *cmd], check=True, env=env, capture_output=True)
        built = time.monotonic()
        time.sleep(8)
        stop.set()
        t.join()
        g = open_gallery(index)
        new = [(h.id, h.score) for h in g.search("a photo", k=5)]

    def same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
        return [i for i, _ in a] == [i for i, _ in b] and np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5)

    kinds = {"old": 0, "new": 0, "busy_503": 0, "mixture": 0}
    first_new = None
    for at, status, hits in seen:
        kind = "busy_503" if status == 503 else "new" if same(hits, new) else "old" if same(hits, old) else "mixture"
        kinds[kind] += 1
        if kind == "new" and first_new is None:
            first_new = at
    old_after = sum(1 for at, status, hits in seen if at > built + 5 and status == 200 and not same(hits, new))
    return {
        "answers": len(seen),
        **kinds,
        "new_seen_s_after_build": None if first_new is None else round(first_new - built, 2),
        "not_new_5s_after_build": old_after,
    }


def d9(index: Path, work: Path) -> dict[str, Any]:
    from PIL import Image

    w, h = 7300, 5440  # 39.7 Mpx, under the default --max-pixels of 40 M; a gradient compresses to a small PNG
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))).convert("RGB").save(buf, format="PNG")
    big = buf.getvalue()
    out: dict[str, Any] = {"png_mib": round(len(big) / 2**20, 2)}
    with serving(index, work) as (base, _proc, _log):
        for name, call in (
            ("photo_search_39.7mpx", lambda c: c.post(base + "/search/image", files={"image": ("q.png", big)})),
            ("text_search_k1000", lambda c: c.post(base + "/search", json={"text": "a photo", "k": 1000})),
        ):
            stop, statuses = threading.Event(), []

            def load(call: Callable[[httpx.Client], httpx.Response] = call, stop=stop, statuses=statuses) -> None:
                client = httpx.Client(timeout=120)
                while not stop.is_set():
                    statuses.append(call(client).status_code)

            idle = Probe(healthz(base), 0.05)
            idle.start()
            time.sleep(2)
            quiet = idle.finish()
            loaders = [threading.Thread(target=load) for _ in range(4)]
            for t in loaders:
                t.start()
            probe = Probe(healthz(base), 0.05)
            probe.start()
            time.sleep(15)
            lat = probe.finish()
            stop.set()
            for t in loaders:
                t.join()
            out[name] = {
                "healthz_idle": quantiles(quiet),
                "healthz_under_load": quantiles([x for x in lat if x != float("inf")]),
                "healthz_failed": sum(x == float("inf") for x in lat),
                "load_requests": len(statuses),
                "load_statuses": sorted(set(statuses)),
            }
    return out


def d10(index: Path, work: Path) -> dict[str, Any]:
    with serving(index, work, "--max-connections", "100") as (base, _proc, log):
        port = int(base.rsplit(":", 1)[1])
        socks = []
        for _ in range(100):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /image/big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(s)
        start = time.monotonic()
        first = None
        tries = 0
        while time.monotonic() - start < 60:
            tries += 1
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    first = time.monotonic() - start
                    break
            time.sleep(0.5)
        for s in socks:
            s.close()
    text = log.read_text()  # the server's last counts are written as it stops
    return {
        "clients": 100,
        "healthz_answered_after_s": None if first is None else round(first, 1),
        "probes_before": tries,
        "send_timeout_s": 30,
        "logged": [line.split("eslmatch: ", 1)[1] for line in text.splitlines() if "read nothing" in line],
    }


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    import torch

    from _models import TINY_CLIP
    from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel
    from eslmatch.retrieval import BuildOptions, build_gallery
    from eslmatch.utils.precision import cpu_capabilities

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/eslmatch-serve-abuse")
    ap.add_argument("--out", default=str(RESULTS / "serve-abuse-cpu"))
    ap.add_argument("--only", nargs="*", help="scenarios to run (default: all)")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "photos").mkdir(parents=True)
    (work / "other").mkdir()
    hashes = {
        f"p{i:03d}": hashlib.sha256(write_photo(work / "photos" / f"p{i:03d}.png", i)).hexdigest() for i in range(100)
    }
    hashes["big"] = hashlib.sha256(write_photo(work / "photos" / "big.png", 7, size=2000)).hexdigest()  # 12 MB
    for i in range(30):
        write_photo(work / "other" / f"q{i:03d}.png", 1000 + i)
    torch.manual_seed(0)
    model = ESLClipModel(ESLClipConfig(num_levels=2, clip=TINY_CLIP)).eval()
    model.save_pretrained(work / "model")
    index = work / "G"
    meta = {i: {"tag": i} for i in hashes}
    build_gallery(
        model, work / "photos", index, metadata=meta, options=BuildOptions(progress=False), model_path=work / "model"
    )
    pristine = work / "G.pristine"
    shutil.copytree(index, pristine)

    def fresh() -> Path:
        shutil.rmtree(index)
        shutil.copytree(pristine, index)
        return index

    scenarios: dict[str, Callable[[], dict[str, Any]]] = {
        "flood_1024": lambda: flood_1024(fresh(), work),
        "flood_20000": lambda: flood_20000(fresh(), work),
        "d1": lambda: d1(fresh(), work),
        "d6": lambda: d6(fresh(), work, hashes),
        "d7": lambda: d7(fresh(), work),
        "d8": lambda: d8(fresh(), work, work / "model", work / "other"),
        "d9": lambda: d9(fresh(), work),
        "d10": lambda: d10(fresh(), work),
    }
    record: dict[str, Any] = {
        "cpu": cpu_capabilities(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for name, run in scenarios.items():
        if args.only and name not in args.only:
            continue
        t0 = time.monotonic()
        record[name] = run()
        print(name, f"({time.monotonic() - t0:.0f} s):", json.dumps(record[name]), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    cpu = record["cpu"]
    md = [
        "# eslmatch serve under abuse (issue 34)",
        "",
        f"CPU: {cpu.get('cpu_name')} ({cpu.get('capability')}), {os.cpu_count()} cores; "
        f"python {platform.python_version()}, torch {torch.__version__}. Command: `python benchmarks/serve_abuse.py`.",
        "",
        "| scenario | figures |",
        "|---|---|",
    ]
    md += [
        f"| {k} | `{json.dumps(v)}` |" for k, v in record.items() if k not in ("cpu", "cpu_count", "python", "torch")
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
