"""The HTTP layer: OpenAI-compatible /v1/embeddings, MoEE's own routes, health, info, metrics
and the routing page. Requests are checked and tokenized here (in a thread, off the event
loop), queued as jobs, and answered with the rows the batcher's worker thread hands back."""

from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import threading
from dataclasses import asdict, dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, search, similarity
from ..checks import check_alpha, check_positive_int, check_variant
from ..prompts import build_prompt
from .batcher import Batcher, Job, JobQueue, QueueFull
from .metrics import Metrics
from .middleware import BodyLimit, RequestMetrics
from .schemas import (
    APIError,
    CompareRequest,
    EmbeddingsRequest,
    EmbedRequest,
    RerankRequest,
    SimilarityRequest,
    json_response,
)

VERBATIM = "verbatim"  # a request's `prompt` that asks for the text as given, whatever the default


@dataclass
class ServeConfig:
    """The server's defaults and limits (the `moee serve` flags)."""

    served_model_name: str
    variant: str = "sum"
    alpha: float = 1.0
    prompt: str | None = None
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_queue: int = 512
    max_inputs: int = 2048
    max_body_bytes: int = 4 * 1024 * 1024
    api_key: str | None = None
    retry_after_s: int = 1

    def __post_init__(self):
        check_variant(self.variant)
        self.alpha = check_alpha(self.alpha)
        if self.prompt is not None and self.prompt != VERBATIM:
            build_prompt(self.prompt)
        for name in ("max_batch_tokens", "max_queue", "max_inputs", "max_body_bytes", "retry_after_s"):
            check_positive_int(name, getattr(self, name))
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")


class EmbeddingService:
    """What the routes share: the encoder's sizes, request checks, tokenization and the queue."""

    def __init__(self, encoder, config: ServeConfig):
        self.encoder, self.config = encoder, config
        self.context = getattr(encoder.model.config, "max_position_embeddings", None)
        # A copy of its own: the worker thread tokenizes with the encoder's tokenizer meanwhile.
        self._tokenizer, self._tokenizer_lock = copy.deepcopy(encoder.tokenizer), threading.Lock()
        self.queue = JobQueue(config.max_queue)
        self.metrics = Metrics(lambda: self.queue.depth)
        self.batcher = Batcher(encoder, self.queue, config.max_batch_tokens, config.max_wait_ms, self.metrics)
        self.ready = self.draining = False

    # ------------------------------------------------------------------ sizes and description
    def dimensions(self, variant: str) -> int:
        hs, rw = self.encoder.hidden_size, self.encoder.num_moe_layers * self.encoder.num_experts
        return {"hs": hs, "rw": rw, "concat": hs + rw, "sum": hs + rw}[variant]

    def info(self) -> dict:
        enc, config = self.encoder, self.config
        limits = {k: v for k, v in asdict(config).items() if k.startswith("max_") or k == "retry_after_s"}
        return {
            "model": config.served_model_name,
            "family": enc.adapter.family,
            "hidden_size": enc.hidden_size,
            "num_moe_layers": enc.num_moe_layers,
            "num_experts": enc.num_experts,
            "dimensions": {v: self.dimensions(v) for v in ("hs", "rw", "concat", "sum")},
            "max_input_tokens": self.context,
            "defaults": {"variant": config.variant, "alpha": config.alpha, "prompt": config.prompt},
            "limits": limits,
            "auth": config.api_key is not None,
            "version": __version__,
        }

    # ------------------------------------------------------------------ request checks
    def prompt_of(self, prompt: str | None) -> str | None:
        """The template string a request's `prompt` means (None: the text verbatim)."""
        if prompt is None:
            prompt = self.config.prompt
        if prompt is None or prompt == VERBATIM:
            return None
        try:
            build_prompt(prompt)
        except (TypeError, ValueError) as exc:
            raise APIError(422, str(exc), param="prompt") from None
        return prompt

    def texts_of(self, value, param: str) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise APIError(422, f"{param} is empty: send at least one text", param=param)
        if len(texts) > self.config.max_inputs:
            raise APIError(413, f"{param} has {len(texts)} texts, more than --max-inputs {self.config.max_inputs}", param=param)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                kind = "token ids are not accepted, send text" if isinstance(text, (int, list)) else "it must be a string"
                raise APIError(422, f"{param}[{i}] is {type(text).__name__}: {kind}", param=f"{param}[{i}]")
        return texts

    def alpha_of(self, alpha) -> float:
        try:
            return check_alpha(self.config.alpha if alpha is None else alpha)
        except ValueError as exc:
            raise APIError(422, str(exc), param="alpha") from None

    # ------------------------------------------------------------------ tokens and the queue
    def count_tokens(self, texts: list[str], prompt: str | None) -> list[int]:
        template = build_prompt(prompt) if prompt is not None else None
        strings = texts if template is None else [template.format(t) for t in texts]
        with self._tokenizer_lock:
            ids = self._tokenizer(strings, add_special_tokens=True)["input_ids"]
        return [len(seq) for seq in ids]

    def check_lengths(self, counts: list[int], truncate: bool, names: list[str]) -> list[int]:
        for name, count in zip(names, counts):
            if count == 0:
                raise APIError(422, f"{name} is empty and this tokenizer adds no special token: it has no last token", param=name)
            if self.context and count > self.context and not truncate:
                message = f"{name} has {count} tokens, more than the model's context of {self.context}; send truncate: true to cut it"
                raise APIError(422, message, param=name, code="context_length_exceeded")
        return [min(c, self.context) if self.context else c for c in counts]

    async def embed(self, texts: list[str], prompt: str | None, truncate: bool, names: list[str]):
        """(MoEEmbeddings of `texts` in order, their token count), through the batcher; `names`
        name each text in error messages."""
        if self.draining or not self.ready:
            raise APIError(503, "the server is shutting down" if self.draining else "the model is not loaded yet")
        counts = self.check_lengths(await run_in_threadpool(self.count_tokens, texts, prompt), truncate, names)
        loop = asyncio.get_running_loop()
        max_length = self.context if truncate else None
        job = Job(texts, sum(counts), prompt, max_length, loop.create_future(), loop)
        try:
            self.queue.put(job)
        except QueueFull as exc:
            headers = {"Retry-After": str(self.config.retry_after_s)}
            raise APIError(429, f"server busy: {exc}; retry later", code="queue_full", headers=headers) from None
        except RuntimeError as exc:
            raise APIError(503, str(exc)) from None
        self.metrics.observe_accepted(len(texts), job.tokens)
        try:
            return await job.future, job.tokens
        except (TypeError, ValueError) as exc:
            raise APIError(422, str(exc)) from None

    # ------------------------------------------------------------------ auth
    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")


# ---------------------------------------------------------------------------------- encoding
def encode_rows(matrix, encoding_format: str) -> list:
    """Rows as float lists, or each row (flattened) as base64 of little-endian float32."""
    if encoding_format == "base64":
        rows = matrix.reshape(matrix.shape[0], -1).numpy().astype("<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    return matrix.tolist()


def indexed(param: str, count: int) -> list[str]:
    return [f"{param}[{i}]" for i in range(count)]


def usage(tokens: int) -> dict:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def static_dir():
    return resources.files("moee_fast.serve") / "static"


# ---------------------------------------------------------------------------------- the app
def create_app(encoder, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving `encoder` with `config`; its lifespan runs the batcher's worker."""
    service = EmbeddingService(encoder, config)

    async def lifespan(app):
        service.batcher.start()
        service.ready = True
        yield
        service.draining = True
        await run_in_threadpool(service.batcher.stop)

    app = FastAPI(title="moee-fast", version=__version__, lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    app.mount("/static", StaticFiles(directory=str(static_dir())), name="static")
    known = {route.path for route in app.routes}
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics, known_paths=known)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; never a traceback."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            param, message = None, f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}"
        elif param is None:
            message = "the body must be a JSON object, sent with Content-Type: application/json"
        else:
            message = f"{param}: {first.get('msg', 'invalid value')}"
        return APIError(422, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return APIError(500, "internal server error").response()


def _add_routes(app: FastAPI, service: EmbeddingService) -> None:
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        service.authorize(credentials)

    guarded = [Depends(authorized)]
    config = service.config

    @app.post("/v1/embeddings", dependencies=guarded, tags=["OpenAI"])
    async def embeddings(body: EmbeddingsRequest):
        variant = body.variant or config.variant
        try:
            check_variant(variant)
        except ValueError as exc:
            raise APIError(422, str(exc), param="variant") from None
        alpha, size = service.alpha_of(body.alpha), service.dimensions(variant)
        if body.dimensions is not None and body.dimensions != size:
            message = f"dimensions={body.dimensions} is not offered: MoEE {variant} vectors have {size} dimensions and cannot be shortened"
            raise APIError(422, message, param="dimensions")
        texts = service.texts_of(body.input, "input")
        emb, tokens = await service.embed(texts, service.prompt_of(body.prompt), body.truncate, indexed("input", len(texts)))

        def render():
            rows = encode_rows(emb.vectors(variant, alpha), body.encoding_format)
            data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
            return json_response({"object": "list", "data": data, "model": config.served_model_name, "usage": usage(tokens)})

        return await run_in_threadpool(render)

    @app.post("/embed", dependencies=guarded, tags=["MoEE"])
    async def embed(body: EmbedRequest):
        texts = service.texts_of(body.input, "input")
        emb, tokens = await service.embed(texts, service.prompt_of(body.prompt), body.truncate, indexed("input", len(texts)))

        def render():
            views = {"hs": encode_rows(emb.hs, body.encoding_format), "rw": encode_rows(emb.rw, body.encoding_format)}
            shape = {"layers": emb.rw.shape[1], "experts": emb.rw.shape[2], "hidden_size": emb.hs.shape[1]}
            return json_response({**views, **shape, "model": config.served_model_name, "usage": usage(tokens)})

        return await run_in_threadpool(render)

    @app.post("/similarity", dependencies=guarded, tags=["MoEE"])
    async def similarity_route(body: SimilarityRequest):
        alpha = service.alpha_of(body.alpha)
        texts = [body.source, *service.texts_of(body.targets, "targets")]
        names = ["source", *indexed("targets", len(texts) - 1)]
        emb, tokens = await service.embed(texts, service.prompt_of(body.prompt), body.truncate, names)
        scores = await run_in_threadpool(lambda: similarity(emb[0], emb[1:], variant="sum", alpha=alpha)[0].tolist())
        return json_response({"scores": scores, "model": config.served_model_name, "usage": usage(tokens)})

    @app.post("/rerank", dependencies=guarded, tags=["MoEE"])
    async def rerank(body: RerankRequest):
        alpha = service.alpha_of(body.alpha)
        documents = service.texts_of(body.documents, "documents")
        names = ["query", *indexed("documents", len(documents))]
        emb, tokens = await service.embed([body.query, *documents], service.prompt_of(body.prompt), body.truncate, names)
        k = min(body.top_n or len(documents), len(documents))
        values, indices = await run_in_threadpool(search, emb[0], emb[1:], k, "sum", alpha)
        results = [{"index": int(i), "relevance_score": float(v)} for v, i in zip(values[0], indices[0])]
        if body.return_documents:
            for result in results:
                result["document"] = {"text": documents[result["index"]]}
        return json_response({"results": results, "model": config.served_model_name, "usage": usage(tokens)})

    @app.post("/compare", dependencies=guarded, tags=["MoEE"])
    async def compare(body: CompareRequest):
        alpha = service.alpha_of(body.alpha)
        texts = service.texts_of(body.input, "input")
        emb, tokens = await service.embed(texts, service.prompt_of(body.prompt), body.truncate, indexed("input", len(texts)))

        def render():
            scores = {v: similarity(emb, emb, variant=v, alpha=alpha).tolist() for v in ("hs", "rw", "sum")}
            return json_response({**scores, "alpha": alpha, "routing": emb.rw.tolist(), "usage": usage(tokens)})

        return await run_in_threadpool(render)

    _add_status_routes(app, service)


def _add_status_routes(app: FastAPI, service: EmbeddingService) -> None:
    @app.get("/health", tags=["status"])
    async def health():
        if service.draining or not service.ready:
            return json_response({"status": "shutting down" if service.draining else "loading"}, status=503)
        return json_response({"status": "ok"})

    @app.get("/info", tags=["status"])
    async def info():
        return json_response(service.info())

    @app.get("/metrics", tags=["status"])
    async def metrics():
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse((static_dir() / "index.html").read_text(encoding="utf-8"))
