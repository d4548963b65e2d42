"""A reverse proxy in front of an S3 endpoint that injects faults, for the fault-tolerance tests and
the chaos soak (bench/chaos.py).

    with S3FaultProxy("http://127.0.0.1:PORT", fail_every=4) as proxy:
        ...  # point clients at proxy.url; every 4th request gets 503 SlowDown
        proxy.broken_paths = {"bucket/prompts/part-001.parquet"}  # those paths get 500 InternalError
        assert proxy.failures > 0
        assert proxy.by_path[("GET", "/bucket/models/x/unet/model.safetensors")] == 1  # every request counted
        proxy.delay = 0.5  # every request waits half a second first (a slow store)
        proxy.drop_every = 7  # every 7th connection is closed unanswered, the request never sent on
        proxy.lose_answer_every = 5  # every 5th request is sent on, then its answer is lost (closed)

Every method is forwarded with its headers and body (a chunked request body is de-chunked and sent
with a Content-Length; `Expect: 100-continue` is answered by the proxy itself) and the upstream's
status, headers and body come back. A request is counted and its fault decided before it is
forwarded; the body of a refused request is still read, so the client's connection stays usable.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Headers that belong to one connection, not to the request or response (RFC 9110 section 7.6.1).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}


def s3_error(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
    ).encode()


class S3FaultProxy:
    """Forward to `upstream`; fail every `fail_every`-th request (503 SlowDown) and every request
    whose path contains one of `broken_paths` (500 InternalError); wait `delay` seconds before each
    request; close the connection unanswered on every `drop_every`-th request (not forwarded) and every
    `lose_answer_every`-th (forwarded, so it took effect: a client retrying it meets its own write).
    Every setting may be changed at any time; `requests`, `failures`, `slowdowns`, `internal_errors`,
    `drops`, `lost_answers` and `failed_by_method` count, and `by_path` counts requests by (method, path
    with its query), both unquoted."""

    def __init__(
        self,
        upstream: str,
        fail_every: int = 0,
        broken_paths: set[str] | None = None,
        delay: float = 0.0,
        drop_every: int = 0,
        lose_answer_every: int = 0,
    ):
        parts = urlsplit(upstream)
        assert parts.scheme == "http" and parts.hostname, upstream
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.fail_every = fail_every
        self.broken_paths: set[str] = set(broken_paths or ())
        self.delay = delay
        self.drop_every = drop_every
        self.lose_answer_every = lose_answer_every
        self.requests = 0
        self.slowdowns = 0
        self.internal_errors = 0
        self.drops = 0
        self.lost_answers = 0
        self.failed_by_method: Counter[str] = Counter()
        self.by_path: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def failures(self) -> int:
        return self.slowdowns + self.internal_errors

    @property
    def url(self) -> str:
        assert self.server is not None, "the proxy is not started"
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def decide(self, method: str, path: str) -> tuple[int, bytes] | str | None:
        """The error response to send instead of forwarding, "drop" (close unanswered, not forwarded),
        "lose" (forward, then close unanswered), or None to forward."""
        key = unquote(urlsplit(path).path)
        with self.lock:
            self.requests += 1
            self.by_path[(method, unquote(path))] += 1
            if self.drop_every and self.requests % self.drop_every == 0:
                self.drops += 1
                return "drop"
            if self.lose_answer_every and self.requests % self.lose_answer_every == 0:
                self.lost_answers += 1
                return "lose"
            if any(broken in key for broken in self.broken_paths):
                self.internal_errors += 1
                self.failed_by_method[method] += 1
                return 500, s3_error("InternalError", "We encountered an internal error. Please try again.")
            if self.fail_every and self.requests % self.fail_every == 0:
                self.slowdowns += 1
                self.failed_by_method[method] += 1
                return 503, s3_error("SlowDown", "Please reduce your request rate.")
        return None

    def start(self) -> S3FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` handled by the base

            def log_message(self, format, *args):
                pass

            def read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()  # the CRLF after each chunk
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response_only(status)
                has_length = False
                for name, value in headers:
                    if name.lower() in HOP_BY_HOP:
                        continue
                    if name.lower() == "content-length":
                        if self.command == "HEAD":  # the size of the object a GET would return
                            has_length = True
                            self.send_header(name, value)
                        continue
                    self.send_header(name, value)
                if not has_length:
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
                self.end_headers()
                if self.command != "HEAD" and body:
                    self.wfile.write(body)

            def hang_up(self) -> None:
                """Close the client's connection without an answer (a connection dropped mid-request)."""
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def forward(self) -> None:
                body = self.read_body()
                if proxy.delay > 0:
                    time.sleep(proxy.delay)
                fault = proxy.decide(self.command, self.path)
                if fault == "drop":
                    self.hang_up()
                    return
                if isinstance(fault, tuple):
                    status, error = fault
                    self.reply(status, [("Content-Type", "application/xml")], error)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    if fault == "lose":
                        self.hang_up()
                        return
                    self.reply(response.status, response.getheaders(), data)
                finally:
                    upstream.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
