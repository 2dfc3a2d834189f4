"""The request models and error answers of `dist-ft serve` (see serve.py), after the OpenAI API.

Every body is read under a size limit, parsed as JSON off the event loop, checked for invalid Unicode and
validated by its pydantic model before the server takes anything (a queue slot, a tokenizer, the model). Every
error is answered as `{"error": {"message", "type", "param", "code"}}`, whatever raised it; a 500 never
carries the exception's text.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

MAX_STOPS, MAX_STOP_CHARS, MAX_MODEL_CHARS = 4, 256, 256


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.body = (
            status,
            {"error": {"message": message, "type": kind, "param": param, "code": code}},
        )


class Json(JSONResponse):
    """JSON that any str survives (ensure_ascii: a lone surrogate echoed back is escaped,
    not a UnicodeEncodeError)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(e: ApiError, headers: dict | None = None) -> Json:
    return Json(e.body, status_code=e.status, headers=headers)


class _Open(BaseModel):
    # OpenAI fields this server ignores (user, logprobs=false, ...) are accepted
    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    type: StrictStr
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content parts of type '{self.type[:40]}' are not supported: only 'text'")
        if self.text is None:
            raise ValueError("a text content part needs its 'text'")
        return self


class Function(_Open):
    name: StrictStr = Field(..., min_length=1, max_length=256)
    arguments: StrictStr | None = None  # (a call's: a JSON object as a string)


class ToolCall(_Open):
    id: StrictStr | None = Field(None, max_length=256)
    type: Literal["function"] = "function"
    function: Function


class ToolDef(_Open):
    type: Literal["function"] = "function"
    function: dict

    @field_validator("function")
    @classmethod
    def _named(cls, v):
        if not isinstance(v.get("name"), str) or not v["name"]:
            raise ValueError("a tool's function needs a 'name'")
        return v


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = Field(...)
    tool_calls: list[ToolCall] | None = None  # (assistant)
    tool_call_id: StrictStr | None = None  # (tool)

    def text(self) -> dict:
        """{role, content} for the chat template: text parts joined by newlines, `developer` as `system`;
        with an assistant's tool calls and a tool result's call id (arguments as the JSON text sent: the data
        path parses and checks them)."""
        body = (
            self.content
            if isinstance(self.content, str)
            else "\n".join(p.text or "" for p in self.content or ())
        )
        out: dict = {"role": "system" if self.role == "developer" else self.role, "content": body}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        return out

    @model_validator(mode="after")
    def _null_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError("content may be null only in an assistant message")
        return self


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class _Sampling(_Open):
    model: StrictStr = Field(..., max_length=MAX_MODEL_CHARS)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, strict=True)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, strict=True)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    n: StrictInt | None = Field(None, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, not {len(stops)}")
        if any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return v

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def usage_wanted(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto"] | None = None  # ("required" and a named function: not supported)

    @model_validator(mode="after")
    def _tools_not_streamed(self):
        if self.tools and self.stream:
            raise ValueError("stream with tools is not supported by this server yet; set stream: false")
        return self

    def calls_wanted(self) -> bool:
        """Whether the reply is read for tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    def prompt_chars(self) -> int:
        return sum(len(m.text()["content"]) for m in self.messages) + len(json.dumps(self.tool_list() or []))

    def tool_list(self) -> list[dict] | None:
        return [t.model_dump(include={"type", "function"}) for t in self.tools] if self.tools else None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = Field(16, ge=1)  # (OpenAI's default for completions)

    @field_validator("prompt")
    @classmethod
    def _one(cls, v):
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("this server answers one prompt per request")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def prompt_chars(self) -> int:
        return len(self.text())


def _bad_unicode(data) -> str | None:
    """The path ('messages[0].content') of the first string (value or key) that is not valid Unicode,
    else None."""
    todo = [(data, "")]
    while todo:
        item, path = todo.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if not _encodable(k):
                    return f"{path}.<key>".lstrip(".")
                todo.append((v, f"{path}.{k}".lstrip(".")))
        elif isinstance(item, list):
            todo += [(v, f"{path}[{i}]") for i, v in enumerate(item)]
        elif isinstance(item, str) and not _encodable(item):
            return path or "body"
    return None


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _param(data, err: ErrorDetails) -> str | None:
    """OpenAI's spelling of a pydantic error's location ('messages[0].content'), following the input: the
    union members pydantic adds ('str', 'list[TextPart]') are skipped."""
    path, loc = "", err["loc"]
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(data, list) and 0 <= part < len(data):
            path, data = f"{path}[{part}]", data[part]
        elif (
            isinstance(part, str)
            and isinstance(data, dict)
            and (part in data or (i == len(loc) - 1 and err["type"] == "missing"))
        ):
            path, data = f"{path}.{part}".lstrip("."), data.get(part)
        elif not isinstance(part, str):
            break
    return path or None


async def parse(request, model: type[_Sampling]) -> _Sampling:
    """The request's body validated by `model` (400 naming the parameter otherwise)."""
    raw = await request.body()
    try:
        data = await asyncio.to_thread(json.loads, raw) if raw else None
    except (ValueError, RecursionError):
        # (not JSON, too deep, an integer of more than 4300 digits, invalid UTF-8)
        raise ApiError(
            400,
            "We could not parse the JSON body of your request: send a JSON object with Content-Type: "
            "application/json",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object")
    if (where := _bad_unicode(data)) is not None:
        raise ApiError(
            400, f"Invalid Unicode (a lone surrogate) in '{where}'", param=where, code="invalid_unicode"
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [(_param(data, err), err) for err in e.errors(include_url=False, include_input=False)]
        param, first = max(errors, key=lambda pe: len(pe[0] or ""))  # (the most specific of a union's errors)
        if first["type"] == "missing":
            raise ApiError(400, f"Missing required parameter: '{param}'", param=param) from None
        msg = first["msg"].removeprefix("Value error, ")
        raise ApiError(
            400, f"Invalid value for '{param or 'body'}': {msg}", param=param, code="invalid_value"
        ) from None


def install_error_handlers(app) -> None:
    """Every error as OpenAI-style JSON: ours, starlette's (404, 405), validation, and any other
    (a generic 500)."""
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        what = f"{request.method} {request.url.path}"[:200]
        message = {404: f"Unknown request URL: {what}", 405: f"Method not allowed: {what}"}.get(
            e.status_code, str(e.detail)[:200]
        )
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(
            ApiError(
                e.status_code,
                message,
                kind,
                {404: "unknown_url", 405: "method_not_allowed"}.get(e.status_code),
            ),
            getattr(e, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return error_response(ApiError(400, "Invalid request"))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        return error_response(
            ApiError(500, "The server had an error while processing your request", "server_error")
        )


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused with 413, by its Content-Length before it is
    read, and by the bytes received when it is sent in chunks."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def error(self) -> ApiError:
        return ApiError(
            413,
            f"The request body is too large: at most {self.limit} bytes (dist-ft serve --max-body-mb)",
            code="request_too_large",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await error_response(self.error())(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self.error()
            return message

        await self.app(scope, limited, send)
