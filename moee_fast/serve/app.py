"""The HTTP layer: OpenAI-compatible /v1/embeddings, MoEE's own routes, health, info, metrics
and the routing page. Requests are checked and tokenized here (in a thread, off the event
loop), queued as jobs, and answered with the rows the batcher's worker thread hands back."""

from __future__ import annotations

import base64
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, search, similarity
from ..checks import check_variant
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
from .service import EmbeddingService, ServeConfig

__all__ = ["ServeConfig", "create_app"]

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
        service.authorize(credentials.credentials if credentials is not None else "")

    guarded = [Depends(authorized)]
    _add_openai_route(app, service, guarded)
    _add_moee_routes(app, service, guarded)
    _add_status_routes(app, service)


def _add_openai_route(app: FastAPI, service: EmbeddingService, guarded: list) -> None:
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


def _add_moee_routes(app: FastAPI, service: EmbeddingService, guarded: list) -> None:
    config = service.config

    @app.post("/embed", dependencies=guarded, tags=["MoEE"])
    async def embed(body: EmbedRequest):
        texts = service.texts_of(body.input, "input")
        emb, tokens = await service.embed(texts, service.prompt_of(body.prompt), body.truncate, indexed("input", len(texts)),
                                          (body.rw_pooling, body.hs_pooling))

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
