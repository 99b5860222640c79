"""The HTTP layer: OpenAI-compatible /v1/embeddings and /v1/models, text-embeddings-inference's
/embed, /rerank and /info, MoEE's own routes, health, metrics, the reference page and the
routing page. Requests are checked and tokenized here (in worker threads, off the event loop),
queued as jobs, and answered with the rows the batcher's worker thread hands back."""

from __future__ import annotations

import base64
from importlib import resources

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import PRESETS, __version__, search, similarity
from ..checks import check_variant
from .docs import docs_page
from .middleware import BodyLimit, RequestMetrics
from .schemas import (
    APIError,
    CompareRequest,
    EmbeddingsRequest,
    RawEmbedRequest,
    RerankRequest,
    SimilarityRequest,
    TEIEmbedRequest,
    json_response,
)
from .service import EmbeddingService, ServeConfig

__all__ = ["ServeConfig", "create_app"]

FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#2a5d9f"/>'
           b'<rect x="3" y="3" width="4" height="4" fill="#fff"/><rect x="9" y="9" width="4" height="4" fill="#fff"/></svg>')


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


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, dim=1)


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

    app = FastAPI(title="moee-fast", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    app.mount("/static", StaticFiles(directory=str(static_dir())), name="static")
    known = {route.path for route in app.routes}
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics, known_paths=known)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, malformed or invalid requests as 400; never a traceback."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = _param_of(first.get("loc", ())[1:])
        if first.get("type") == "json_invalid":
            param, message = None, f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}"
        elif param is None:
            message = "the body must be a JSON object, sent with Content-Type: application/json"
        elif first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}: this route does not take it (see /docs)"
        else:
            message = f"{param}: {first.get('msg', 'invalid value')}"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "request body is not valid UTF-8 JSON" if exc.status_code == 400 else str(exc.detail)
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return APIError(500, "internal server error").response()


def _param_of(loc: tuple) -> str | None:
    """`field` or `field[3]` from pydantic's error location (our bodies are flat; what follows
    the indices names a member of a union type, not a field)."""
    if not loc:
        return None
    param = str(loc[0])
    for part in loc[1:]:
        if not isinstance(part, int):
            break
        param += f"[{part}]"
    return param


def _add_routes(app: FastAPI, service: EmbeddingService) -> None:
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        service.authorize(credentials.credentials if credentials is not None else "")

    guarded = [Depends(authorized)]
    _add_openai_routes(app, service, guarded)
    _add_tei_routes(app, service, guarded)
    _add_moee_routes(app, service, guarded)
    _add_status_routes(app, service)


def _add_openai_routes(app: FastAPI, service: EmbeddingService, guarded: list) -> None:
    config = service.config

    @app.post("/v1/embeddings", dependencies=guarded, tags=["OpenAI"], summary="OpenAI embeddings: texts or token ids")
    async def embeddings(body: EmbeddingsRequest):
        variant = body.variant or config.variant
        try:
            check_variant(variant)
        except ValueError as exc:
            raise APIError(400, str(exc), param="variant") from None
        alpha, size = service.alpha_of(body.alpha), service.dimensions(variant)
        if body.dimensions is not None and body.dimensions != size:
            message = f"dimensions={body.dimensions} is not offered: MoEE {variant} vectors have {size} dimensions and cannot be shortened"
            raise APIError(400, message, param="dimensions")
        keep_last = service.keep_last_of(body.truncate_prompt_tokens)
        items = service.inputs_of(body.input, "input")
        emb, tokens = await service.embed(items, service.prompt_of(body.prompt), body.truncate, indexed("input", len(items)), keep_last)

        def render():
            vectors = emb.vectors(variant, alpha)
            rows = encode_rows(unit_rows(vectors) if body.normalize else vectors, body.encoding_format)
            data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
            return json_response({"object": "list", "data": data, "model": config.served_model_name, "usage": usage(tokens)})

        return await run_in_threadpool(render)

    @app.get("/v1/models", dependencies=guarded, tags=["OpenAI"], summary="the one model served")
    async def models():
        model = {"id": config.served_model_name, "object": "model", "created": service.started, "owned_by": "moee-fast"}
        return json_response({"object": "list", "data": [model]})


def _add_tei_routes(app: FastAPI, service: EmbeddingService, guarded: list) -> None:
    config = service.config

    async def tei_embed(body: TEIEmbedRequest):
        if body.prompt_name is not None and body.prompt_name not in PRESETS:
            raise APIError(400, f"prompt_name {body.prompt_name!r} is not a preset: {', '.join(PRESETS)}", param="prompt_name")
        items = service.inputs_of(body.inputs, "inputs")
        prompt = service.prompt_of(body.prompt_name, "prompt_name")
        emb, _ = await service.embed(items, prompt, body.truncate, indexed("inputs", len(items)))

        def render():
            vectors = emb.vectors(config.variant, config.alpha)
            return json_response((unit_rows(vectors) if body.normalize else vectors).tolist())

        return await run_in_threadpool(render)

    summary = "text-embeddings-inference's embed: the server's default variant, [[float]]"
    app.post("/embed", dependencies=guarded, tags=["TEI"], summary=summary)(tei_embed)
    app.post("/", dependencies=guarded, tags=["TEI"], summary=summary)(tei_embed)

    @app.post("/rerank", dependencies=guarded, tags=["TEI"], summary="MoEE(sum) ranking: TEI's body (texts) or Cohere/Jina's (documents)")
    async def rerank(body: RerankRequest):
        tei = body.texts is not None
        if tei == (body.documents is not None):
            raise APIError(400, "send either texts (TEI) or documents (Cohere, Jina), not both or neither", param="texts" if tei else "documents")
        param = "texts" if tei else "documents"
        alpha = service.alpha_of(body.alpha)
        documents = service.inputs_of(body.texts if tei else body.documents, param)
        names = ["query", *indexed(param, len(documents))]
        emb, tokens = await service.embed([body.query, *documents], service.prompt_of(body.prompt), body.truncate, names)
        k = min(body.top_n or len(documents), len(documents))
        values, indices = await run_in_threadpool(search, emb[0], emb[1:], k, "sum", alpha)
        ranked = [(int(i), float(v)) for v, i in zip(values[0], indices[0])]
        if tei:
            return json_response([{"index": i, "score": v, **({"text": documents[i]} if body.return_text else {})} for i, v in ranked])
        results = [{"index": i, "relevance_score": v, **({"document": {"text": documents[i]}} if body.return_documents else {})} for i, v in ranked]
        return json_response({"results": results, "model": config.served_model_name, "usage": usage(tokens)})


def _add_moee_routes(app: FastAPI, service: EmbeddingService, guarded: list) -> None:
    config = service.config

    @app.post("/moee/embed", dependencies=guarded, tags=["MoEE"], summary="the raw views: hs [N, H] and rw [N, L, E]")
    async def raw_embed(body: RawEmbedRequest):
        items = service.inputs_of(body.input, "input")
        pooling = (body.rw_pooling, body.hs_pooling)
        emb, tokens = await service.embed(items, service.prompt_of(body.prompt), body.truncate, indexed("input", len(items)),
                                          pooling=pooling)

        def render():
            views = {"hs": encode_rows(emb.hs, body.encoding_format), "rw": encode_rows(emb.rw, body.encoding_format)}
            shape = {"layers": emb.rw.shape[1], "experts": emb.rw.shape[2], "hidden_size": emb.hs.shape[1]}
            how = {"rw_pooling": pooling[0], "hs_pooling": pooling[1]}
            return json_response({**views, **shape, **how, "model": config.served_model_name, "usage": usage(tokens)})

        return await run_in_threadpool(render)

    @app.post("/similarity", dependencies=guarded, tags=["MoEE"], summary="MoEE(sum) scores of source against each target")
    async def similarity_route(body: SimilarityRequest):
        alpha = service.alpha_of(body.alpha)
        targets = service.inputs_of(body.targets, "targets")
        names = ["source", *indexed("targets", len(targets))]
        emb, tokens = await service.embed([body.source, *targets], service.prompt_of(body.prompt), body.truncate, names)
        scores = await run_in_threadpool(lambda: similarity(emb[0], emb[1:], variant="sum", alpha=alpha)[0].tolist())
        return json_response({"scores": scores, "model": config.served_model_name, "usage": usage(tokens)})

    @app.post("/compare", dependencies=guarded, tags=["MoEE"], summary="what the page draws: score matrices and routing")
    async def compare(body: CompareRequest):
        alpha = service.alpha_of(body.alpha)
        items = service.inputs_of(body.input, "input", max_inputs=config.max_compare_inputs)
        emb, tokens = await service.embed(items, service.prompt_of(body.prompt), body.truncate, indexed("input", len(items)))

        def render():
            scores = {v: similarity(emb, emb, variant=v, alpha=alpha).tolist() for v in ("hs", "rw", "sum")}
            return json_response({**scores, "alpha": alpha, "routing": emb.rw.tolist(), "usage": usage(tokens)})

        return await run_in_threadpool(render)


def _add_status_routes(app: FastAPI, service: EmbeddingService) -> None:
    @app.get("/health", tags=["status"], summary="200 when serving, 503 while loading or shutting down")
    async def health():
        if service.draining or not service.ready:
            return json_response({"status": "shutting down" if service.draining else "loading"}, status=503)
        return json_response({"status": "ok"})

    @app.get("/info", tags=["status"], summary="the model, sizes, defaults and limits (TEI's fields too)")
    async def info():
        return json_response(service.info())

    @app.get("/metrics", tags=["status"], summary="Prometheus text")
    async def metrics():
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse((static_dir() / "index.html").read_text(encoding="utf-8"))

    @app.get("/docs", include_in_schema=False)
    @app.get("/redoc", include_in_schema=False)
    async def reference():
        return HTMLResponse(docs_page(app.openapi()))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
