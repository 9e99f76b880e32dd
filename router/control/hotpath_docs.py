"""The inference endpoints in the OpenAPI document.

They are served by the lean hot path (router/app.py dispatches them before FastAPI), so the
routes below only document them: their request and response shapes are written once here as
pydantic models used for the docs, never for per-request validation (the hot path forwards
what the caller sent and the upstream answered). Both `/v1/X` and `/X` are served; `/v1/X`
is documented.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Security
from pydantic import BaseModel, ConfigDict, Field

from common.asgi import HTTPError

from .deps import bearer
from .views import ErrorResponse


class _Open(BaseModel):
    """Shapes that accept the API's other fields too (the hot path forwards them)."""
    model_config = ConfigDict(extra="allow")


class Message(_Open):
    role: str = Field(description="system, developer, user, assistant or tool")
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Open):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "lbl/cborg-chat:latest", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0},
        {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
         "stream_options": {"include_usage": True}}]})

    model: str = Field(description="a model name from GET /v1/models, e.g. lbl/cborg-chat:latest")
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int
    prompt_tokens_details: dict[str, Any] | None = None


class ChatCompletion(_Open):
    id: str
    object: str
    created: int
    model: str = Field(description="the underlying model that answered")
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class CompletionRequest(_Open):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "lbl/llama", "prompt": "Once upon a time", "max_tokens": 8}]})

    model: str
    prompt: str | list[Any]
    stream: bool | None = None
    max_tokens: int | None = None


class Completion(_Open):
    id: str
    object: str
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class EmbeddingRequest(_Open):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "lbl/nomic-embed-text", "input": ["a document", "another"]}]})

    model: str = Field(description="an embedding model, e.g. lbl/nomic-embed-text")
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None


class Embedding(_Open):
    object: str
    index: int
    embedding: list[float] | str


class EmbeddingList(_Open):
    object: str
    data: list[Embedding]
    model: str
    usage: Usage | None = None


class Model(_Open):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(_Open):
    object: str
    data: list[Model]


_ERR = {"model": ErrorResponse}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_ERR, "description": "Bad request (the message and `param` name the problem)"},
    401: {**_ERR, "description": "Missing or invalid API key"},
    403: {**_ERR, "description": "The key may not use this model"},
    404: {**_ERR, "description": "No such model"},
    408: {**_ERR, "description": "The request head did not arrive within CBORG_HEAD_TIMEOUT_S; the connection "
                                 "is closed (answered by the server, before any route)"},
    413: {**_ERR, "description": "Request body too large"},
    429: {**_ERR, "description": "A rate limit or budget refused it (see retry-after)"},
    500: {**_ERR, "description": "An upstream's own server error, passed on"},
    502: {**_ERR, "description": "The upstream failed or answered something unreadable"},
    503: {**_ERR, "description": "The model is loading, swapping or not configured here; or the server is over "
                                 "CBORG_MAX_CONNECTIONS (answered before any route, and the connection closed)"},
    504: {**_ERR, "description": "The upstream timed out"},
    508: {**_ERR, "description": "A provider base URL points back at this gateway"},
}
# With `stream: true`: server-sent events, each `data:` a chunk object, the last `data: [DONE]`.
_STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "description": "one server-sent event",
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"},
                   "event": {"type": "string"}}}}}

router = APIRouter(tags=["inference (OpenAI API)"], responses=ERRORS, dependencies=[Security(bearer)])


def _hot_path_only() -> None:
    raise HTTPError(500, "Served by the gateway's hot path, not here.", code="internal_error")


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={200: {"content": _STREAM}},
             summary="Chat completion (also /chat/completions); streams with stream: true")
async def chat(body: ChatRequest) -> None:
    _hot_path_only()


@router.post("/v1/completions", response_model=Completion, responses={200: {"content": _STREAM}},
             summary="Text completion (also /completions)")
async def completions(body: CompletionRequest) -> None:
    _hot_path_only()


@router.post("/v1/embeddings", response_model=EmbeddingList, summary="Embeddings (also /embeddings)")
async def embeddings(body: EmbeddingRequest) -> None:
    _hot_path_only()


@router.get("/v1/models", response_model=ModelList, summary="The models this key may use (also /models)")
async def models() -> None:
    _hot_path_only()


@router.get("/v1/models/{model}", response_model=Model, summary="One model (also /models/{model})")
async def model(model: str) -> None:
    _hot_path_only()


# -- the coding agents' APIs (router/api/agents.py) --------------------------------------------
class AnthropicErrorDetail(_Open):
    type: str
    message: str


class AnthropicError(_Open):
    """Errors on /v1/messages, in Anthropic's shape (same statuses as the OpenAI surface)."""
    type: Literal["error"]
    error: AnthropicErrorDetail


class MessagesRequest(_Open):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "lbl/cborg-chat:latest", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]},
        {"model": "anthropic/claude-sonnet", "max_tokens": 64, "stream": True,
         "messages": [{"role": "user", "content": "Hi"}]}]})

    model: str = Field(description="any chat model of the catalog, not only anthropic/*")
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stream: bool | None = None
    tools: list[dict[str, Any]] | None = None


class AnthropicMessage(_Open):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    usage: dict[str, Any]


class TokenCount(_Open):
    input_tokens: int


class ResponsesRequest(_Open):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "lbl/cborg-coder:latest", "input": "Write hello world in Python", "max_output_tokens": 64},
        {"model": "openai/gpt-4o-mini", "input": [{"role": "user", "content": "Hi"}], "stream": True,
         "store": False}]})

    model: str = Field(description="any chat model of the catalog, not only openai/*")
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    stream: bool | None = None
    tools: list[dict[str, Any]] | None = None


class ResponseObject(_Open):
    id: str
    object: Literal["response"]
    created_at: int | float
    model: str
    status: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class ResponseDeleted(_Open):
    id: str
    object: str
    deleted: bool


class InputItems(_Open):
    object: Literal["list"]
    data: list[dict[str, Any]]
    has_more: bool


_ANTHROPIC_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": AnthropicError, "description": v["description"]} for s, v in ERRORS.items()}
_EVENTS = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "description": "one server-sent event (`event:` names its type)",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}
agents = APIRouter(tags=["coding agents (Anthropic Messages, OpenAI Responses)"], dependencies=[Security(bearer)])


@agents.post("/v1/messages", response_model=AnthropicMessage, responses={**_ANTHROPIC_ERRORS, 200: {"content": _EVENTS}},
             summary="Anthropic Messages for every chat model (Claude Code; also /messages; x-api-key works)")
async def messages(body: MessagesRequest) -> None:
    _hot_path_only()


@agents.post("/v1/messages/count_tokens", response_model=TokenCount, responses=_ANTHROPIC_ERRORS,
             summary="Input tokens of a Messages request (exact for anthropic/* and local models)")
async def count_tokens(body: MessagesRequest) -> None:
    _hot_path_only()


@agents.post("/v1/responses", response_model=ResponseObject, responses={**ERRORS, 200: {"content": _EVENTS}},
             summary="OpenAI Responses for every chat model (Codex; also /responses)")
async def responses(body: ResponsesRequest) -> None:
    _hot_path_only()


@agents.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=ERRORS,
            summary="A stored response (only the key that made it)")
async def get_response(response_id: str) -> None:
    _hot_path_only()


@agents.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=ERRORS,
               summary="Delete a stored response (only the key that made it)")
async def delete_response(response_id: str) -> None:
    _hot_path_only()


@agents.get("/v1/responses/{response_id}/input_items", response_model=InputItems, responses=ERRORS,
            summary="The input items of a stored response")
async def input_items(response_id: str) -> None:
    _hot_path_only()
