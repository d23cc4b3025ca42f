"""The benchmarks' load-generator client (load_tests/raw_client.py) against a plain HTTP/1.1 server
on 127.0.0.1: keep-alive reuse, the server's Connection: close, a connection the server dropped
between requests, and what it refuses to parse."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from load_tests.raw_client import RawHttpClient


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: list[int] = []

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        reply = body[::-1] + self.headers.get("x-tag", "").encode()
        self.send_response(200)
        if self.path == "/no-length":
            self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(reply)
            self.close_connection = True
            return
        self.send_header("content-length", str(len(reply)))
        if self.path == "/close":
            self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(reply)
        if self.path in ("/close", "/drop"):  # /drop: closes without saying so (an idle timeout)
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.connections = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_requests_share_one_keep_alive_connection(server: str) -> None:
    client = RawHttpClient(server)
    try:
        answers = [client.post("/echo", f"body-{i}".encode(), {"x-tag": str(i)}) for i in range(5)]
    finally:
        client.close()
    assert [a.status_code for a in answers] == [200] * 5
    assert [a.content for a in answers] == [f"body-{i}".encode()[::-1] + str(i).encode() for i in range(5)]
    assert answers[0].headers["content-length"] == str(len(answers[0].content))
    assert len(_Handler.connections) == 1


def test_a_close_from_the_server_is_honoured_and_the_next_request_reconnects(server: str) -> None:
    client = RawHttpClient(server)
    try:
        assert client.post("/close", b"one").content == b"eno"
        assert client.post("/drop", b"two").content == b"owt"  # a new connection, then dropped silently
        assert client.post("/echo", b"three").content == b"eerht"  # finds it dropped: one retry
    finally:
        client.close()
    assert len(_Handler.connections) == 3


def test_a_response_without_content_length_is_refused(server: str) -> None:
    client = RawHttpClient(server)
    try:
        with pytest.raises(RuntimeError, match="Content-Length"):
            client.post("/no-length", b"x")
    finally:
        client.close()


def test_only_plain_http_urls_with_a_port() -> None:
    for base in ("https://127.0.0.1:1", "http://127.0.0.1"):
        with pytest.raises(ValueError, match="http://host:port"):
            RawHttpClient(base)
