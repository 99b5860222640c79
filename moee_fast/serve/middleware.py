"""Two plain ASGI middlewares: a request-body byte limit (413) and per-route request metrics."""

from __future__ import annotations

import time

from .schemas import APIError


class BodyLimit:
    """Reads an HTTP request's body up to `max_bytes` before the app sees it; a larger body (by
    its Content-Length, or as it streams in) is answered 413 without reading the rest."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay(message, receive), send)  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._reject(scope, receive, send)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay(body, receive), send)

    async def _reject(self, scope, receive, send):
        error = APIError(413, f"request body larger than the limit of {self.max_bytes} bytes", code="payload_too_large")
        await error.response()(scope, receive, send)


def _replay(first, receive):
    """A `receive` that hands out `first`, then what the connection sends next (a disconnect)."""
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


class RequestMetrics:
    """Counts every HTTP request by route and status and times it (unknown paths as "other",
    so a scan of random URLs cannot grow the label set)."""

    def __init__(self, app, metrics, known_paths: set[str]):
        self.app, self.metrics, self.known_paths = app, metrics, known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in self.known_paths else "other"
            self.metrics.observe_request(route, status[0], time.perf_counter() - start)
