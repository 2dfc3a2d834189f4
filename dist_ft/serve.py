"""`dist-ft serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over an exported model.

`/v1/chat/completions` (JSON or SSE stream), `/v1/completions`, `/v1/models`, `/health`. Replies come from
`inference.stream`, so they render the same chat template, stop on the same end-of-turn token and sample the same
way as `dist-ft chat`. One generation runs at a time (a CPU or a single GPU is busy with one); up to `max_queue`
requests wait, more get 503 at once. A client that disconnects stops its generation at the next token. Bad requests
get OpenAI-style 4xx JSON errors; with an API key every request needs `Authorization: Bearer <key>` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from .inference import Delta, stream
from .model import POSITION_KEYS


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields this server ignores (user, logprobs=false, ...) are accepted
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)  # dist-ft chat's defaults
    top_p: float = Field(0.9, gt=0, le=1)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=1)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str
    max_tokens: Optional[int] = Field(16, ge=1)  # (OpenAI's default for completions)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def context_length(model) -> int:
    return next((getattr(model.config, k) for k in POSITION_KEYS if isinstance(getattr(model.config, k, None), int)), 2048)


class Server:
    """The model, its request queue and counters."""

    def __init__(self, tok, model, name: str, api_key: str | None = None, max_queue: int = 16, default_max_tokens: int = 256):
        self.tok, self.model, self.name, self.api_key = tok, model, name, api_key
        self.max_queue, self.default_max_tokens, self.context = max_queue, default_max_tokens, context_length(model)
        self.waiting = 0  # requests admitted (running or queued)
        self.counts = {"served": 0, "cancelled": 0, "rejected_busy": 0}
        self.lock = asyncio.Lock()

    def check_key(self, header: str | None) -> None:
        if self.api_key and not (header and secrets.compare_digest(header, f"Bearer {self.api_key}")):
            raise ApiError(401, "Incorrect or missing API key: send the header Authorization: Bearer <key>", "invalid_request_error",
                           "invalid_api_key")

    def plan(self, req: _Sampling, ids: list[int], requested: int | None) -> dict:
        if req.model != self.name:
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{self.name}' (GET /v1/models)",
                           "invalid_request_error", "model_not_found", "model")
        room = self.context - len(ids)
        if room <= 0:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens; the prompt has {len(ids)} tokens",
                           "invalid_request_error", "context_length_exceeded", "messages")
        if requested is not None and requested > room:
            raise ApiError(400, f"max_tokens {requested} is too large: the prompt has {len(ids)} tokens and the context {self.context}, "
                           f"so at most {room} can be generated", "invalid_request_error", "context_length_exceeded", "max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return {"max_new_tokens": requested or min(self.default_max_tokens, room), "temperature": req.temperature, "top_p": req.top_p,
                "stop": stop, "seed": req.seed}

    def admit(self) -> None:
        if self.waiting >= self.max_queue:
            self.counts["rejected_busy"] += 1
            raise ApiError(503, f"The server is busy: {self.waiting} requests are running or queued (at most {self.max_queue}); "
                           "retry later", "server_error", "server_busy")
        self.waiting += 1

    async def deltas(self, ids: list[int], gen: dict, cancel: threading.Event):
        """Deltas of one generation, after waiting for its turn; the queue slot is freed when it ends, however it ends."""
        finished = False
        try:
            async with self.lock:
                it = stream(self.tok, self.model, ids, cancel=cancel, **gen)
                while (d := await asyncio.to_thread(next, it, None)) is not None:
                    finished = d.finish not in (None, "cancelled")
                    yield d
        finally:
            self.waiting -= 1
            self.counts["served" if finished else "cancelled"] += 1


def _usage(prompt: int, d: Delta) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": d.tokens, "total_tokens": prompt + d.tokens}


def build_app(server: Server):
    app = FastAPI(title="dist_ft", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(ApiError(400, f"Invalid request: {where or 'body'}: {first['msg']}", param=where or None).body, status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            try:
                server.check_key(request.headers.get("authorization"))
            except ApiError as e:
                return JSONResponse(e.body, status_code=e.status)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, "running_or_queued": server.waiting, **server.counts}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "dist_ft"}]}

    async def respond(request: Request, req: _Sampling, ids: list[int], requested: int | None, chat: bool):
        gen = server.plan(req, ids, requested)
        server.admit()
        cancel, rid, created = threading.Event(), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        deltas = server.deltas(ids, gen, cancel)

        def choice(text: str, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if req.stream:
                return {"index": 0, "delta": ({"role": "assistant", "content": text} if first else {"content": text}) if finish is None else {},
                        "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        def body(choices: dict, extra: dict | None = None) -> dict:
            return {"id": rid, "object": kind + (".chunk" if req.stream and chat else ""), "created": created, "model": server.name,
                    "choices": [choices], **(extra or {})}

        if req.stream:
            usage_wanted = bool((getattr(req, "stream_options", None) or {}).get("include_usage"))

            async def events():
                first = True
                try:
                    async for d in deltas:
                        if d.text or (first and chat):
                            yield json.dumps(body(choice(d.text, None, first)))
                            first = False
                        if d.finish is not None:
                            yield json.dumps(body(choice("", d.finish), {"usage": _usage(len(ids), d)} if usage_wanted else None))
                    yield "[DONE]"
                finally:
                    cancel.set()  # a client that went away: the generation stops at its next token

            return EventSourceResponse(events(), ping=15)
        text, last = [], None
        async for d in deltas:
            text.append(d.text)
            last = d
            if await request.is_disconnected():
                cancel.set()
        return body(choice("".join(text), last.finish), {"usage": _usage(len(ids), last)})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        msgs = [m.model_dump(include={"role", "content"}) for m in req.messages]
        ids = list(server.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        return await respond(request, req, ids, req.max_completion_tokens or req.max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await respond(request, req, server.tok(req.prompt)["input_ids"], req.max_tokens, chat=False)

    return app


def serve(model_dir: str, adapter: str | None, host: str, port: int, api_key: str | None, name: str | None, max_queue: int) -> None:
    import uvicorn

    from .inference import is_sequence_head, load

    if is_sequence_head(model_dir):
        from .errors import UserError

        raise UserError(f"--model '{model_dir}': a sequence classifier / reward model has no text to generate; serve a chat model")
    tok, model = load(model_dir, adapter=adapter)
    server = Server(tok, model, name or model_dir, api_key, max_queue)
    print(f"serving '{server.name}' on http://{host}:{port}/v1 (context {server.context} tokens, queue {max_queue}"
          f"{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(build_app(server), host=host, port=port, log_level="warning")
