"""A small routing API for the demo: the HTTP contract, answered from a routes table.

It can stall batches that contain chosen ids, the way one batch of the
incident timed out. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import Engine, select

from .seed import reference_tables

__all__ = ["DemoRoutingServer"]

MAX_STALL_SECONDS = 30.0


class DemoRoutingServer:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._routes = reference_tables().routes
        self.stall_ids: set[str] = set()
        self._released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                ids = [str(i) for i in json.loads(self.rfile.read(length))["ids"]]
                if server.stall_ids.intersection(ids):
                    server._released.wait(MAX_STALL_SECONDS)
                    return
                body = json.dumps({"results": server.answer(ids)}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="demo-routing", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}/v1/routes/lookup"

    def answer(self, ids: list[str]) -> list[dict[str, object]]:
        build_id = self._routes.c.build_id
        with self._engine.connect() as conn:
            routed = {
                str(v)
                for v in conn.execute(
                    select(build_id).where(build_id.in_([int(i) for i in ids]))
                ).scalars()
            }
        return [{"id": i, "routed": i in routed} for i in ids]

    def heal(self) -> None:
        """Stop stalling and let any stalled request finish (with no answer)."""
        self.stall_ids.clear()
        self._released.set()

    def __enter__(self) -> DemoRoutingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)
