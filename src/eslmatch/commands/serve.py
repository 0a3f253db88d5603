"""``eslmatch serve --index INDEX``: a local web page and JSON API over a gallery (docs/serve.md)."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from ..errors import EslmatchError
from ._gallery import check_encoding_args, encoding_args, gallery_args, gallery_target

ORDER = 60


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a search page and JSON API over a gallery")
    gallery_args(s, "serve")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--model", help="model directory or released checkpoint (default: the one the gallery records)")
    s.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    s.add_argument("--max-text", type=int, default=1000, help="longest query in characters (default 1000)")
    s.add_argument("--max-k", type=int, default=1000, help="most results per search (default 1000)")
    s.add_argument("--max-rerank-k", type=int, default=2000, help="largest rerank_k allowed (default 2000)")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest uploaded photo in MiB (default 20)")
    s.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="largest uploaded photo in pixels (default 40,000,000)"
    )
    s.add_argument(
        "--write-token-file",
        metavar="FILE",
        help="allow writes (POST /items, DELETE /items/ID, POST /items/delete) with 'Authorization: Bearer TOKEN', "
        "TOKEN being this file's content (at least 16 characters); without it the server is read-only",
    )
    s.add_argument(
        "--upload-dir",
        metavar="DIR",
        help="where photos added over HTTP are kept (default: INDEX/uploads; needed with --milvus)",
    )
    s.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header names NAME (repeatable; e.g. behind a reverse proxy). By "
        "default only 127.0.0.1, localhost, [::1] and --host are answered (DNS rebinding); '*' answers any",
    )
    connection_args(s)
    s.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default info)",
    )
    encoding_args(s, "the queries", None)
    s.set_defaults(func=run)


def connection_args(s: argparse.ArgumentParser) -> None:
    """The limits a running server puts on connections and queued work (docs/serve.md, Limits)."""
    s.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="close a connection whose request line and headers are not complete within S seconds (default 10)",
    )
    s.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="close a connection whose request body is not complete within S seconds of its headers (default 60)",
    )
    s.add_argument(
        "--send-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="close a connection that reads nothing of its response for S seconds (default 30)",
    )
    s.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="close a kept-alive connection idle for S seconds (default 5)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=0,
        metavar="N",
        help="most open connections; at N a new one closes the oldest idle one, or is closed when none is idle "
        "(default 0: the file-descriptor limit, raised to its hard limit, less a reserve of a quarter of it, at most "
        "1024; at most 65536)",
    )
    s.add_argument(
        "--backlog",
        type=int,
        default=4096,
        metavar="N",
        help="connections the kernel queues before the server accepts them (default 4096; the kernel caps it at "
        "net.core.somaxconn)",
    )
    s.add_argument(
        "--max-pending",
        type=int,
        default=256,
        metavar="N",
        help="most searches and writes waiting for the model; beyond them the answer is 503 at once (default 256)",
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    target, collection = gallery_target(args)
    check_encoding_args(args)
    if not 0 <= args.port <= 65535:
        raise EslmatchError(f"--port must be between 0 and 65535 (got {args.port})")
    from ..serve.limits import ConnectionLimits, ServeConfig, connection_cap

    if not 0 < args.max_upload_mb <= 1 << 20:  # also NaN and inf
        raise EslmatchError(
            f"--max-upload-mb must be a number of MiB above 0, at most 1048576 (got {args.max_upload_mb})"
        )
    try:
        config = ServeConfig(
            max_text_chars=args.max_text,
            max_k=args.max_k,
            max_rerank_k=args.max_rerank_k,
            max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
            max_pixels=args.max_pixels,
            max_pending=args.max_pending,
        )
        limits = ConnectionLimits(
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            keep_alive_timeout=args.keep_alive_timeout,
            send_timeout=args.send_timeout,
            max_connections=args.max_connections,
            backlog=args.backlog,
        )
    except ValueError as exc:
        raise EslmatchError(str(exc)) from exc
    connection_cap(limits)  # a cap the descriptors cannot hold fails before the loading
    try:
        from ..serve import load_app, runner
        from ..serve.app import read_token
        from ..serve.middleware import HostRules
    except ImportError as exc:
        raise EslmatchError(
            f"eslmatch serve needs FastAPI and uvicorn: pip install 'eslmatch[serve]' ({exc.name} missing)"
        ) from exc
    token = read_token(args.write_token_file) if args.write_token_file else None
    if collection is not None and token is not None and not args.upload_dir:
        raise EslmatchError("with --milvus, writes need --upload-dir DIR (where uploaded photos are kept)")
    if not is_loopback(args.host):
        print(
            f"eslmatch: warning: binding to {args.host}: anyone who can reach this address can query the gallery and "
            "view its images" + ("" if token is None else " (writes need the token)"),
            file=sys.stderr,
        )
    allowed_hosts = [args.host, *args.allowed_host]
    HostRules(allowed_hosts)  # a bad --allowed-host fails before the gallery and model load
    sock = runner.bind_socket(args.host, args.port)  # a busy port fails here, before the slow loading
    try:
        app = load_app(
            target,
            args.model,
            config=config,
            device=args.device,
            allowed_hosts=allowed_hosts,
            collection=collection,
            timeout=args.milvus_timeout,
            write_token=token,
            upload_dir=args.upload_dir,
            precision=args.precision,
            runtime=args.runtime,
            onnx=args.onnx,
        )
        port = sock.getsockname()[1]
        host = f"[{args.host}]" if ":" in args.host else args.host
        mode = "read-only" if token is None else "writes allowed with the token"
        name = target if collection is None else f"collection {collection} at {target}"
        print(f"eslmatch: serving {name} on http://{host}:{port}/ ({mode}; Ctrl-C to stop)", file=sys.stderr)
        runner.run_server(app, sock, limits, log_level=args.log_level)
    finally:
        sock.close()
    return 0
