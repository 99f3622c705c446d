"""OpenAI Chat Completions, the part a vision-language model on one device serves: the request
models, the response models, and the error object, as vLLM's ``protocol`` holds them.

Requests are validated here (pydantic, as FastAPI does); every refusal becomes OpenAI's error
object ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status. Responses are
built as the models below and serialised from them, so the wire's shape is written down once.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from ccra_export.core.errors import CCRAExportError

#: OpenAI's bound on stop strings, and one on their length (each is matched against every token)
MAX_STOPS = 4
MAX_STOP_CHARS = 1024
#: the runtime's names for its inputs -> where they sit in a Chat Completions request
_REQUEST_FIELDS = {
    "answer": "messages",
    "history": "messages",
    "image": "messages[0].content",
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
}


class OpenAIBaseModel(BaseModel):
    """A response model: every field is written, null included (OpenAI's required-but-nullable
    fields, a chunk's ``finish_reason`` and the error's ``param`` and ``code``, must be present),
    except those in ``omitted_when_none``, which OpenAI leaves out rather than nulls (a delta's
    unchanged keys, ``usage`` on every stream chunk but the usage chunk). A per-field rule because
    ``exclude_none`` on a whole dump would drop both kinds."""

    model_config = ConfigDict(extra="forbid")
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _wire(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {key: value for key, value in data.items() if value is not None or key not in self.omitted_when_none}


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    """OpenAI's error body; also a stream's last event when the generation fails after the 200."""

    error: ErrorInfo


class ApiError(Exception):
    """A refusal the client sees as OpenAI's error JSON (``headers``: e.g. a 429's Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    @property
    def kind(self) -> str:
        """OpenAI's error type: the client's fault for a 4xx (a 405 or 408 too), the server's for a 5xx."""
        return {
            401: "authentication_error",
            404: "not_found_error",
            429: "rate_limit_error",
        }.get(self.status, "invalid_request_error" if 400 <= self.status < 500 else "server_error")

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.kind, param=self.param, code=self.code))

    def body(self) -> dict[str, Any]:
        return self.response().model_dump()


def refused(error: CCRAExportError, messages: int) -> ApiError:
    """Input the runtime refused, as a 400 naming the request's field (``messages`` holds ``messages``
    messages; the prompt is the last one's content), never a flag or the runtime's own name."""

    def request_field(name: str) -> str:
        return f"messages[{messages - 1}].content" if name == "prompt" else _REQUEST_FIELDS.get(name, "messages")

    param = request_field(error.field) if error.field is not None else "messages"
    # no value: it may be a server-side path
    without_value = CCRAExportError(error.message, field=error.field, remedy=error.remedy, mentions=error.mentions)
    return ApiError(400, without_value.render(request_field), param=param)


def invalid_request(errors: list[dict[str, Any]]) -> ApiError:
    """pydantic's validation errors as one 400: the first one, with where it is (``param``)."""
    first = errors[0] if errors else {}
    where = request_path(first.get("loc", ()))
    return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)


def request_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """pydantic's location as the request's field: ``messages[0].content[1].image_url`` (a union's
    member tags, ``list[ContentPart]``, are pydantic's, not the request's)."""
    where = ""
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
        elif "[" not in str(part) and str(part) != "str":
            where += f".{part}"
    return where.lstrip(".")


def parse_chat_request(raw: bytes) -> ChatRequest:
    """A request body -> a validated request, or the 400 that says which field is wrong. Parsed
    here rather than by a FastAPI body parameter so that every refusal is OpenAI's error object
    (FastAPI's own is a list of pydantic errors) and NaN, which Python clients write, is refused
    by name."""
    try:
        payload = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not JSON") from None
    except RecursionError:  # [[[[...: deeper than the parser recurses
        raise ApiError(400, "the body is not JSON a server reads: it nests too deeply") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object with messages", param="messages")
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content or [] if part.type == "text")

    def images(self) -> list[ImageUrl]:
        if isinstance(self.content, str) or self.content is None:
            return []
        return [part.image_url for part in self.content if part.type == "image_url" and part.image_url is not None]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("n")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is served")
        return value

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"up to {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each")
        return value

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
        return stops

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class UsageInfo(OpenAIBaseModel):
    """Tokens as OpenAI counts them: the prompt is the whole conversation, image tokens included."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo | None = None


class DeltaMessage(OpenAIBaseModel):
    """What a chunk adds: the first says the role, the others only their text, the last nothing."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    """One server-sent event of a stream; ``usage`` only on the extra last chunk (empty
    ``choices``) that ``stream_options.include_usage`` asks for, as OpenAI sends it."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ccra-export"


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(OpenAIBaseModel):
    """``/health``: not OpenAI's, for load balancers; the model's name once it is ready."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"model"})

    status: Literal["ok", "loading"]
    model: str | None = None
