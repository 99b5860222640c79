"""Request bodies of the HTTP routes (pydantic, shown in /docs) and the OpenAI error shape.

Text lists are typed loosely (`list[Any]`) so that the routes, not pydantic, check their items
and name the first bad one (`input[3] must be a string ...`); token-id inputs are refused there.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# What the status of an error says, in OpenAI's `error.type` vocabulary.
ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

_PROMPT = "a preset name, a template containing {text}, or 'verbatim' (default: the server's --prompt)"
_ALPHA = "weight of cos_RW in MoEE(sum) (default: the server's --alpha)"
_TRUNCATE = "cut texts longer than the model's context instead of refusing them (422)"


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        error_type = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def response(self):
        return json_response(self.body(), self.status, self.headers)


def json_response(payload: dict, status: int = 200, headers=None):
    from starlette.responses import Response

    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field(None, description=_PROMPT)
    truncate: bool = Field(False, description=_TRUNCATE)


class EmbeddingsRequest(_Body):
    """OpenAI's /v1/embeddings body, plus moee-fast's `variant`, `alpha`, `prompt`, `truncate`."""

    input: str | list[Any] = Field(..., description="a text or a list of texts")
    model: str | None = Field(None, description="accepted; the server embeds with the model it serves")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    dimensions: int | None = Field(None, description="must equal the variant's full size: MoEE vectors are not Matryoshka")
    user: str | None = None
    variant: str | None = Field(None, description="hs, rw, concat or sum (default: the server's --variant)")
    alpha: float | None = Field(None, description=_ALPHA)


_POOLING = "last: the text's last token (MoEE); mean: the mean over every token the model sees (prompt and special tokens included)"


class EmbedRequest(_Body):
    """The raw views: `hs` [N, H] and `rw` [N, L, E]."""

    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: each row as little-endian float32")
    rw_pooling: Literal["last", "mean"] = Field("last", description=_POOLING)
    hs_pooling: Literal["last", "mean"] = Field("last", description=_POOLING)


class SimilarityRequest(_Body):
    """MoEE(sum) scores of `source` against each of `targets`."""

    source: str
    targets: list[Any]
    alpha: float | None = Field(None, description=_ALPHA)


class RerankRequest(_Body):
    """`documents` ordered by MoEE(sum) score against `query`."""

    query: str
    documents: list[Any]
    top_n: int | None = Field(None, ge=1, description="how many results (default: all)")
    return_documents: bool = False
    alpha: float | None = Field(None, description=_ALPHA)


class CompareRequest(_Body):
    """A few texts compared every way: the HS, RW and MoEE(sum) matrices and each text's routing."""

    input: list[Any]
    alpha: float | None = Field(None, description=_ALPHA)
