"""A fault-injecting HTTP proxy in front of the loopback S3 server (test support).

Every S3 request of a test session (the test process's and its Ray workers') goes through it; a
test adds rules (method, key pattern, status, how many times) and matching requests get an S3
error response instead of reaching the server, exactly as a throttled or failing S3 answers.
Everything else is forwarded unchanged.
"""

from __future__ import annotations

import http.client
import http.server
import re
import threading
from dataclasses import dataclass

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
)
_CODES = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}


@dataclass
class FaultRule:
    method: str
    path: re.Pattern
    status: int
    times: int | None  # None: every matching request
    hits: int = 0

    def take(self, method: str, path: str) -> bool:
        if method != self.method or not self.path.search(path):
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


class S3FaultProxy:
    """Forwards to ``upstream`` (host, port); serves on an ephemeral loopback port."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self._read_body()
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                    rule = next((r for r in proxy._rules if r.take(self.command, self.path)), None)
                if rule is not None:
                    self._send_error(rule.status)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() in _HOP_BY_HOP or key.lower() == "content-length":
                        continue
                    self.send_header(key, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read_body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = self.headers.get("Content-Length")
                return self.rfile.read(int(length)) if length else None

            def _send_error(self, status: int):
                code = _CODES.get(status, "ServiceUnavailable")
                payload = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>injected by the test proxy</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, method: str, key_pattern: str, status: int = 503, times: int | None = None) -> FaultRule:
        """Answer ``status`` to the next ``times`` (default: all) ``method`` requests whose path
        matches ``key_pattern`` (a regex searched in ``/bucket/key?query``)."""
        rule = FaultRule(method.upper(), re.compile(key_pattern), status, times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self.requests.clear()
