"""Request bodies of the HTTP routes (pydantic, shown in /docs) and the OpenAI error shape.

Every body forbids fields it does not know (a typo is a 400 naming the field, never silently
ignored) and takes booleans strictly ("yes" is not true). Inputs are typed loosely (`Any`) so
that the service, not pydantic, checks each item and names the first bad one (`input[3]`,
`input[1][7]`): a text, or token ids as OpenAI and TEI allow them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

# What the status of an error says, in OpenAI's `error.type` vocabulary.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

_PROMPT = "a preset name, a template containing {text}, or 'verbatim' (default: the server's --prompt); token-id inputs skip it"
_ALPHA = "weight of cos_RW in MoEE(sum) (default: the server's --alpha)"
_TRUNCATE = "keep the head of inputs longer than the model's context instead of refusing them (400)"
_POOLING = ("{view} at the last token (the paper's MoEE) or its mean over every token the model sees for the input, "
            "prompt and special tokens included")
_INPUT = "a text, a list of texts, token ids ([int]) or a list of token-id lists ([[int]]), embedded as given"


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


def json_response(payload, status: int = 200, headers=None):
    from starlette.responses import Response

    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


Number = StrictFloat | StrictInt


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description=_PROMPT)
    truncate: StrictBool = Field(False, description=_TRUNCATE)


class EmbeddingsRequest(_Body):
    """OpenAI's /v1/embeddings body, vLLM's `truncate_prompt_tokens` and `normalize`, plus
    moee-fast's `variant`, `alpha`, `prompt`, `truncate`."""

    input: Any = Field(..., description=_INPUT)
    model: str | None = Field(None, description="accepted; the server embeds with the model it serves")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    dimensions: StrictInt | None = Field(None, description="must equal the variant's full size: MoEE vectors are not Matryoshka")
    user: str | None = None
    truncate_prompt_tokens: StrictInt | None = Field(None, description="keep each input's last k tokens (template included); -1: the context")
    normalize: StrictBool = Field(False, description="L2-normalize each vector")
    variant: str | None = Field(None, description="hs, rw, concat or sum (default: the server's --variant)")
    alpha: Number | None = Field(None, description=_ALPHA)


class TEIEmbedRequest(BaseModel):
    """Text-embeddings-inference's /embed body: vectors of the server's default variant."""

    model_config = ConfigDict(extra="forbid")

    inputs: Any = Field(..., description=_INPUT)
    normalize: StrictBool = Field(True, description="L2-normalize each vector (TEI's default: true)")
    truncate: StrictBool = Field(False, description=_TRUNCATE)
    prompt_name: str | None = Field(None, description="a prompt preset (default: the server's --prompt)")


class RawEmbedRequest(_Body):
    """The raw views: `hs` [N, H] and `rw` [N, L, E], each pooled over the last token or all tokens."""

    input: Any = Field(..., description=_INPUT)
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: each row as little-endian float32")
    rw_pooling: Literal["last", "mean"] = Field("last", description=_POOLING.format(view="RW (each MoE layer's router distribution)"))
    hs_pooling: Literal["last", "mean"] = Field("last", description=_POOLING.format(view="HS (the final norm's output)"))


class SimilarityRequest(_Body):
    """MoEE(sum) scores of `source` against each of `targets`."""

    source: Any
    targets: list[Any]
    alpha: Number | None = Field(None, description=_ALPHA)


class RerankRequest(_Body):
    """Documents ordered by MoEE(sum) score against `query`: TEI's body (`texts`, `return_text`,
    answered as a list) or Cohere's and Jina's (`documents`, `top_n`, `return_documents`,
    answered as `{"results"}`)."""

    query: Any
    texts: list[Any] | None = Field(None, description="TEI: the documents")
    return_text: StrictBool = Field(False, description="TEI: include each text")
    documents: list[Any] | None = Field(None, description="Cohere/Jina: the documents")
    top_n: StrictInt | None = Field(None, ge=1, description="how many results (default: all)")
    return_documents: StrictBool = False
    model: str | None = Field(None, description="accepted; the server ranks with the model it serves")
    alpha: Number | None = Field(None, description=_ALPHA)


class CompareRequest(_Body):
    """A few texts compared every way: the HS, RW and MoEE(sum) matrices and each text's routing."""

    input: list[Any]
    alpha: Number | None = Field(None, description=_ALPHA)
