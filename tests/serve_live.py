"""Helpers for the `moee serve` tests: a live server in a subprocess and checks of its answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import torch

from conftest import relative_error

KEY = "test-key-3f9a"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """`python -m moee_fast.cli serve ...` on a free 127.0.0.1 port, up until /health says ok."""

    def __init__(self, model: str, *flags: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "moee_fast.cli", "serve", "--model", model, "--port", str(self.port), "--log-level", "warning", *flags]
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
        # One thread: on a shared, oversubscribed machine OpenMP teams of 2 ran 10x slower.
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env)
        self._wait_healthy()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def _wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def assert_error(response: httpx.Response, status: int, param: str | None = "", text: str = "") -> dict:
    """An OpenAI-shaped error with `status`; `param` checked unless "", `text` in its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and 'File "' not in response.text
    if param != "":
        assert error["param"] == param
    assert text in error["message"]
    return error


def post(server, route: str, body, headers=AUTH, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + route, content=content, headers={"Content-Type": "application/json", **headers}, timeout=60, **kwargs)


def decoded(row):
    """An embedding row as numbers: base64 strings hold little-endian float32."""
    import base64

    return np.frombuffer(base64.b64decode(row), dtype="<f4") if isinstance(row, str) else row


def assert_rows_close(actual, expected, bound: float = 1e-5) -> None:
    actual = torch.as_tensor(np.asarray([decoded(row) for row in actual], dtype=np.float32))
    assert actual.shape == expected.shape
    assert relative_error(actual, expected).max() <= bound


