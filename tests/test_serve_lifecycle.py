"""`moee serve`'s connections and lifetime: idle and slow-header connections are closed, an idle
server exits 0 on SIGTERM, and the startup line says what is served and where (SIGTERM with
requests in flight: test_serve_load.py and test_serve_app.py)."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from moee_fast.serve.cli import is_loopback, served_name
from serve_live import LiveServer


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe")


def closed_by_server(sock: socket.socket, within: float = 30.0) -> bool:
    """Whether the server closes the connection (reads EOF) before `within` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length (ours all have one)."""
    sock.settimeout(60)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return data


def test_idle_and_slow_header_connections_are_closed(model_path):
    server = LiveServer(model_path, "--header-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            assert closed_by_server(silent)
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            assert closed_by_server(slow)
        with socket.create_connection(("127.0.0.1", server.port)) as kept:  # a full request, then half of another
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(kept).startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET /health HTTP/1.1\r\n")
            assert closed_by_server(kept)
        # A request whose body takes longer than the header deadline is still answered.
        with socket.create_connection(("127.0.0.1", server.port)) as patient:
            body = b'{"input": "slow body"}'
            patient.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
            time.sleep(2)
            patient.sendall(body[5:])
            assert read_response(patient).startswith(b"HTTP/1.1 200")
    finally:
        assert server.stop() == 0, server.output()


def test_startup_line_and_idle_exit(model_path):
    server = LiveServer(model_path, "--prompt", "prompteol")
    line = next(line for line in server.output().splitlines() if "moee serve: model" in line)
    name = served_name(model_path, "unused")
    assert f"model {name}, variant sum, prompt prompteol, auth off, on {server.url}/" in line
    assert model_path not in line
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0, server.output()


def test_served_name_and_loopback():
    assert served_name("allenai/OLMoE-1B-7B-0924", "d") == "allenai/OLMoE-1B-7B-0924"  # not a directory here: a Hub id
    assert served_name(None, "demo") == "demo"
    assert all(is_loopback(host) for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.0.0.1", "example.org"))
