"""``eslmatch serve --index INDEX``: a local web page and JSON API for text-to-image search."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from ..errors import EslmatchError
from .index import milvus_args, need_collection

ORDER = 60


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a search page and JSON API over a gallery index")
    s.add_argument("--index", help="gallery index directory (eslmatch index)")
    milvus_args(s, "serve")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--model", help="model directory or released .pth.tar (default: the one the index records)")
    s.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    s.add_argument("--max-text", type=int, default=1000, help="longest query in characters (default 1000)")
    s.add_argument("--max-k", type=int, default=1000, help="most results per search (default 1000)")
    s.add_argument("--max-rerank-k", type=int, default=2000, help="largest rerank_k allowed (default 2000)")
    s.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header names NAME (repeatable; e.g. behind a reverse "
        "proxy). By default only 127.0.0.1, localhost, [::1] and --host are answered (DNS rebinding); "
        "'*' answers any",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import ServeConfig, load_app
        from ..serve.app import HostRules
    except ImportError as exc:
        raise EslmatchError(
            f"eslmatch serve needs FastAPI and uvicorn: pip install 'eslmatch[serve]' ({exc.name} missing)"
        ) from exc

    milvus = need_collection(args, "index")
    if not 0 <= args.port <= 65535:
        raise EslmatchError(f"--port must be between 0 and 65535 (got {args.port})")
    try:
        config = ServeConfig(max_text_chars=args.max_text, max_k=args.max_k, max_rerank_k=args.max_rerank_k)
    except ValueError as exc:
        raise EslmatchError(str(exc)) from exc
    if not is_loopback(args.host):
        print(
            f"eslmatch: warning: binding to {args.host}: the server has no authentication and anyone who can "
            "reach this address can query the index and view its images",
            file=sys.stderr,
        )
    allowed_hosts = [args.host, *args.allowed_host]
    HostRules(allowed_hosts)  # a bad --allowed-host fails before the index and model load
    if milvus:
        from ..serve.app import load_milvus_app

        app = load_milvus_app(
            args.milvus,
            args.collection,
            args.model,
            config=config,
            device=args.device,
            allowed_hosts=allowed_hosts,
            timeout=args.milvus_timeout,
        )
        args.index = f"collection {args.collection} at {args.milvus}"
    else:
        app = load_app(args.index, args.model, config=config, device=args.device, allowed_hosts=allowed_hosts)
    where = f"http://{args.host}:{args.port}/" if args.port else f"{args.host}, a free port (uvicorn prints it)"
    print(f"eslmatch: serving {args.index} on {where} (Ctrl-C to stop)", file=sys.stderr)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, server_header=False, timeout_graceful_shutdown=5
    )
    return 0
