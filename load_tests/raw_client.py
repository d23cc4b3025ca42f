"""A lean HTTP/1.1 load-generator client: one keep-alive socket, each request written whole in one
`sendall`, each response read by its Content-Length.

The load generator shares the machine's cores with the servers it measures. httpx costs ~0.3 ms
of Python per request on this project's 2-core machine, more than either server spends on a small
model, so with it an HTTP benchmark mostly measures the client: both servers wait on it. This
client does what a benchmark needs and no more (no redirects, cookies, chunked or compressed
responses, TLS), so that the cores go to the servers. It is for load tests only, never for
clients of offramp.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


class RawResponse:
    """Status, lower-case headers and body of one response (`headers.get` as httpx's, by name)."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes):
        self.status_code, self.headers, self.content = status_code, headers, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class RawHttpClient:
    """POSTs over one keep-alive connection to `base` (http://host:port); reconnects once when the
    server closed the connection between requests."""

    def __init__(self, base: str, timeout: float = 120.0):
        parts = urlsplit(base)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"RawHttpClient needs http://host:port, got {base!r}")
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._heads: dict[tuple[str, int, tuple[tuple[str, str], ...]], bytes] = {}

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._buf = sock, b""
        return sock

    def post(self, path: str, content: bytes, headers: dict[str, str] | None = None) -> RawResponse:
        key = (path, len(content), tuple(sorted((headers or {}).items())))
        head = self._heads.get(key)
        if head is None:  # the request head of a body size and header set, encoded once
            lines = [f"POST {path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(content)}",
                     *(f"{k}: {v}" for k, v in (headers or {}).items())]
            head = self._heads[key] = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        fresh = self._sock is None
        sock = self._sock or self._connect()
        try:
            sock.sendall(head + content)
            return self._read(sock)
        except (ConnectionError, _Closed):
            self.close()
            if fresh:
                raise
            sock = self._connect()  # the server closed the idle connection: once more, on a new one
            sock.sendall(head + content)
            return self._read(sock)

    def _read(self, sock: socket.socket) -> RawResponse:
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += _recv(sock)
        lines = buf[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise RuntimeError(f"response without Content-Length (status {status}): not supported here")
        size, body = int(headers["content-length"]), buf[end + 4:]
        while len(body) < size:
            body += _recv(sock)
        self._buf = body[size:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return RawResponse(status, headers, body[:size])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _Closed(Exception):
    pass


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(1 << 16)
    if not data:
        raise _Closed("the server closed the connection")
    return data
