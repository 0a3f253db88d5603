"""A local Milvus server for tests: milvus-lite's gRPC server (the Milvus protocol) on
127.0.0.1 at a free port, in its own process, so tests can kill and restart it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from _wait import HUNG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_grpc_server() -> bool:
    """Whether the installed milvus-lite can serve gRPC (``milvus-lite server``, 3.x)."""
    try:
        import milvus_lite.adapter.grpc.server  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError:
        return False
    return True


class MilvusServer:
    """``python -m milvus_lite server --data-dir DIR --host 127.0.0.1 --port PORT``.

    :meth:`start` waits until it answers; :meth:`kill` ends it abruptly (SIGKILL, as a
    crashed server); :meth:`start` again reopens the same data on the same port.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = HUNG) -> MilvusServer:
        cmd = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--max-workers", "4"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        from pymilvus import MilvusClient

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                client = MilvusClient(uri=self.uri, timeout=5)
                client.list_collections()
                client.close()
                return self
            except Exception:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"milvus-lite did not answer on {self.uri} within {timeout:.0f} s")

    def kill(self) -> None:
        """End the server at once (SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        """End the server cleanly (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None
