"""Prometheus metrics of one server, in a registry of its own (two apps in one process never
share counters): requests by route and status, tokens, batch sizes, queue depth, latencies."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moee_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("moee_request_duration_seconds", "HTTP request latency", ["route"], registry=r)
        self.tokens = Counter("moee_tokens", "Tokens of the texts accepted for embedding", registry=r)
        self.texts = Counter("moee_texts", "Texts accepted for embedding", registry=r)
        self.batch_texts = Histogram("moee_batch_texts", "Texts per encode call", buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("moee_batch_tokens", "Tokens per encode call", buckets=_TOKEN_BUCKETS, registry=r)
        self.inference = Histogram("moee_inference_duration_seconds", "Seconds per encode call", registry=r)
        self.queue_wait = Histogram("moee_queue_duration_seconds", "Seconds from acceptance to the start of encoding", registry=r)
        depth = Gauge("moee_queue_depth", "Requests accepted and not yet answered", registry=r)
        depth.set_function(queue_depth)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_accepted(self, texts: int, tokens: int) -> None:
        self.texts.inc(texts)
        self.tokens.inc(tokens)

    def observe_batch(self, texts: int, tokens: int, seconds: float, waited: list[float]) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.observe(tokens)
        self.inference.observe(seconds)
        for wait in waited:
            self.queue_wait.observe(wait)

    def render(self) -> bytes:
        return generate_latest(self.registry)
