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
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest uploaded photo in MiB (default 20)")
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
    limit_args(s)
    s.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default info)",
    )
    encoding_args(s, "the queries", None)
    s.set_defaults(func=run)


def limit_args(s: argparse.ArgumentParser) -> None:
    """The limits on requests, connections and queued work (docs/serve.md, Limits): each
    option, its default and help come from its field in :mod:`eslmatch.serve.limits`."""
    from ..serve.limits import ConnectionLimits, ServeConfig, options_of

    for o in options_of(ServeConfig) + options_of(ConnectionLimits):
        s.add_argument(
            o.flag,
            dest=o.name,
            type=o.type,
            default=o.default,
            metavar=o.metavar,
            help=f"{o.help} (default {o.default:{',' if o.type is int else 'g'}})",
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
    from ..serve.limits import ConnectionLimits, ServeConfig, connection_cap, options_of

    if not 0 < args.max_upload_mb <= 1 << 20:  # also NaN and inf
        raise EslmatchError(
            f"--max-upload-mb must be a number of MiB above 0, at most 1048576 (got {args.max_upload_mb})"
        )
    try:
        config = ServeConfig(
            max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
            **{o.name: getattr(args, o.name) for o in options_of(ServeConfig)},
        )
        limits = ConnectionLimits(**{o.name: getattr(args, o.name) for o in options_of(ConnectionLimits)})
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
