"""`dist-ft serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over an exported model.

`/v1/chat/completions` (JSON or SSE stream), `/v1/completions`, `/v1/models`, `/health`. Replies come from
`inference.stream`, so they render the same chat template, stop on the same end-of-turn token and sample the same
way as `dist-ft chat`. One generation runs at a time (a CPU or a single GPU is busy with one); up to `max_queue`
requests wait, more get 503 at once. No client can wedge it: a request is validated (serve_api.py) before it takes a
queue slot, the slot is given back however the request ends (an error, a disconnect, a stream never read), a client
that disconnects - streaming or not - stops its generation at the next token, a failure mid-stream is sent as an SSE
error event and `[DONE]`, and templating and tokenizing run off the event loop, so `/health` always answers. With an
API key every `/v1` request needs `Authorization: Bearer <key>` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, suppress

from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse

from .faults import NONE, Faults
from .inference import Delta, stream
from .model import POSITION_KEYS
from .serve_api import (
    ApiError,
    BodyLimit,
    ChatRequest,
    CompletionRequest,
    Json,
    install_error_handlers,
    parse,
)


def context_length(model) -> int:
    return next(
        (getattr(model.config, k) for k in POSITION_KEYS if isinstance(getattr(model.config, k, None), int)),
        2048,
    )


def longest_token(tok) -> int:
    """The most characters one token can stand for (at least 8): a prompt with more characters than the context
    times this cannot fit, so it is refused without being tokenized."""
    try:
        return max(8, *(len(t) for t in tok.get_vocab()))
    except Exception:  # noqa: BLE001 - a tokenizer without a plain vocabulary
        return 64


class Slot:
    """One admitted request's place in the queue: released once, however the request ends; releasing it also stops
    its generation."""

    def __init__(self, server: Server):
        self.server, self.cancel, self.open, self.started = server, threading.Event(), True, False

    def release(self, outcome: str | None) -> None:
        self.cancel.set()
        if self.open:
            self.open = False
            self.server.waiting -= 1
            if outcome:
                self.server.counts[outcome] += 1


class Server:
    """The model, its request queue and counters."""

    def __init__(
        self,
        tok,
        model,
        name: str,
        api_key: str | None = None,
        max_queue: int = 16,
        default_max_tokens: int = 256,
        faults: Faults = NONE,
    ):
        self.tok, self.model, self.name, self.api_key, self.faults = tok, model, name, api_key, faults
        self.max_queue, self.default_max_tokens, self.context = (
            max_queue,
            default_max_tokens,
            context_length(model),
        )
        self.max_chars = self.context * longest_token(tok)
        self.waiting = 0  # requests admitted (running or queued)
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected_busy": 0}
        self.lock = asyncio.Lock()
        self.tok_lock = (
            threading.Lock()
        )  # (a fast tokenizer may refuse two threads at once: "Already borrowed")
        self.pool = ThreadPoolExecutor(
            2, "generate"
        )  # (the generation's own threads: never behind JSON parsing or tokenizing)

    def check_key(self, request: Request) -> None:
        header = request.headers.get("authorization", "").encode("latin-1")  # (as sent: bytes, any of them)
        if self.api_key and not secrets.compare_digest(header, f"Bearer {self.api_key}".encode()):
            raise ApiError(
                401,
                "Incorrect or missing API key: send the header Authorization: Bearer <key>",
                "invalid_request_error",
                "invalid_api_key",
            )

    def check(self, req) -> None:
        """What can be refused before tokenizing: the model's name and a prompt too long whatever its tokens."""
        if req.model != self.name:
            raise ApiError(
                404,
                f"The model '{req.model[:100]}' does not exist; this server serves '{self.name}' (GET /v1/models)",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        param = "messages" if isinstance(req, ChatRequest) else "prompt"
        if req.prompt_chars() > self.max_chars or (param == "messages" and len(req.messages) > self.context):
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context} tokens; the {param} cannot fit "
                f"(more than {self.max_chars} characters or {self.context} messages)",
                "invalid_request_error",
                "context_length_exceeded",
                param,
            )

    def encode(self, req) -> list[int]:
        """The prompt's token ids (run off the event loop). A chat template that refuses the conversation is a 400."""
        from jinja2 import TemplateError

        with self.tok_lock:
            if isinstance(req, CompletionRequest):
                return list(self.tok(req.text())["input_ids"])
            try:
                out = self.tok.apply_chat_template(
                    [m.text() for m in req.messages],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                )
            except TemplateError as e:
                raise ApiError(
                    400, f"The chat template refused these messages: {str(e)[:300]}", param="messages"
                ) from None
            return list(out["input_ids"])

    def plan(self, req, ids: list[int], requested: int | None) -> dict:
        room = self.context - len(ids)
        if room <= 0:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context} tokens; the prompt has {len(ids)} tokens",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            )
        if requested is not None and requested > room:
            raise ApiError(
                400,
                f"max_tokens {requested} is too large: the prompt has {len(ids)} tokens and the context {self.context}, "
                f"so at most {room} can be generated",
                "invalid_request_error",
                "context_length_exceeded",
                "max_tokens",
            )
        return {
            "max_new_tokens": requested or min(self.default_max_tokens, room),
            "temperature": 0.7 if req.temperature is None else req.temperature,  # dist-ft chat's defaults
            "top_p": 0.9 if req.top_p is None else req.top_p,
            "stop": req.stops(),
            "seed": req.seed,
        }

    def admit(self) -> Slot:
        if self.waiting >= self.max_queue:
            self.counts["rejected_busy"] += 1
            raise ApiError(
                503,
                f"The server is busy: {self.waiting} requests are running or queued (at most {self.max_queue}); "
                "retry later",
                "server_error",
                "server_busy",
            )
        self.waiting += 1
        return Slot(self)

    async def deltas(self, slot: Slot, ids: list[int], gen: dict):
        """Deltas of one generation, after waiting for its turn; the slot is released when it ends, however it ends."""
        outcome = "cancelled"
        try:
            async with self.lock:
                if slot.cancel.is_set():  # (the client left while queued)
                    return
                slot.started = True
                it = stream(self.tok, self.model, ids, cancel=slot.cancel, faults=self.faults, **gen)
                while (
                    d := await asyncio.get_running_loop().run_in_executor(self.pool, next, it, None)
                ) is not None:
                    if d.finish is not None:
                        outcome = "cancelled" if d.finish == "cancelled" else "served"
                    yield d
        except Exception:
            outcome = "failed"
            raise
        finally:
            slot.release(outcome)


class _Stream(EventSourceResponse):
    """An SSE response that owns its queue slot: released (and its events closed) when the response ends, even if
    the events were never read."""

    def __init__(self, events, slot: Slot):
        super().__init__(events, ping=15)
        self.events, self.slot = events, slot

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.cancel.set()
            with suppress(Exception):
                await self.events.aclose()  # (runs the events' own cleanup now, which releases the slot)
            self.slot.release("cancelled")


async def _disconnected(request: Request) -> None:
    """Returns when the client of a non-streaming request has disconnected."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


def _usage(prompt: int, d: Delta) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": d.tokens, "total_tokens": prompt + d.tokens}


SERVER_ERROR = ApiError(500, "The server had an error while generating the reply", "server_error").body


def build_app(server: Server, max_body: int = 8 << 20):
    app = FastAPI(
        title="dist_ft", docs_url=None, redoc_url=None, openapi_url=None, default_response_class=Json
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=max_body)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, "running_or_queued": server.waiting, **server.counts}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        return {
            "object": "list",
            "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "dist_ft"}],
        }

    async def respond(request: Request, chat: bool):
        server.check_key(request)
        req = await parse(request, ChatRequest if chat else CompletionRequest)
        server.check(req)
        slot = server.admit()
        try:
            ids = await asyncio.to_thread(server.encode, req)  # (a long prompt does not hold up /health)
            gen = server.plan(
                req, ids, (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
            )
            return (
                _Stream(events(req, ids, gen, slot, chat), slot)
                if req.stream
                else await answer(request, req, ids, gen, slot, chat)
            )
        except BaseException as e:
            slot.release(
                None if isinstance(e, ApiError) else "failed" if isinstance(e, Exception) else "cancelled"
            )
            raise

    def shape(req, chat: bool):
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = ("chat.completion" if chat else "text_completion") + (".chunk" if req.stream and chat else "")

        def choice(text: str, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if req.stream:
                delta = (
                    ({"role": "assistant", "content": text} if first else {"content": text})
                    if finish is None
                    else {}
                )
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        def body(choices: list, extra: dict | None = None) -> dict:
            return {
                "id": rid,
                "object": kind,
                "created": created,
                "model": server.name,
                "choices": choices,
                **(extra or {}),
            }

        return choice, body

    async def events(req, ids: list[int], gen: dict, slot: Slot, chat: bool):
        choice, body = shape(req, chat)
        first, last = True, None
        try:
            async with aclosing(server.deltas(slot, ids, gen)) as deltas:
                async for d in deltas:
                    if d.text or (first and chat):
                        yield json.dumps(body([choice(d.text, None, first)]))
                        first = False
                    if d.finish is not None:
                        last = d
                        yield json.dumps(body([choice("", d.finish)]))
            if last is not None and req.usage_wanted():
                yield json.dumps(body([], {"usage": _usage(len(ids), last)}))
        except Exception:  # noqa: BLE001 - the status was sent: the client gets an error event (never the exception's text)
            yield json.dumps(SERVER_ERROR)
        yield "[DONE]"

    async def answer(request: Request, req, ids: list[int], gen: dict, slot: Slot, chat: bool) -> dict:
        choice, body = shape(req, chat)
        text, last = [], None

        async def run() -> None:
            nonlocal last
            async with aclosing(server.deltas(slot, ids, gen)) as deltas:
                async for d in deltas:
                    text.append(d.text)
                    last = d

        work, watcher = asyncio.create_task(run()), asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client left: a queued request leaves the queue now, a running one stops at its next token
                slot.cancel.set()
                if not slot.started:
                    work.cancel()
                await asyncio.wait({work})
        finally:
            for task in (work, watcher):
                task.cancel()
        if not work.cancelled():
            work.result()  # (a failed generation raises here)
        if work.cancelled() or last is None:
            raise ApiError(499, "The client closed the request", code="client_closed")  # (nobody reads this)
        return body([choice("".join(text), last.finish)], {"usage": _usage(len(ids), last)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    return app


def serve(
    model_dir: str,
    adapter: str | None,
    host: str,
    port: int,
    api_key: str | None,
    name: str | None,
    max_queue: int,
    max_body_mb: float = 8.0,
    faults: Faults = NONE,
) -> None:
    import uvicorn

    from .inference import is_sequence_head, load

    if is_sequence_head(model_dir):
        from .errors import UserError

        raise UserError(
            f"--model '{model_dir}': a sequence classifier / reward model has no text to generate; serve a chat model"
        )
    tok, model = load(model_dir, adapter=adapter)
    server = Server(tok, model, name or model_dir, api_key, max_queue, faults=faults)
    print(
        f"serving '{server.name}' on http://{host}:{port}/v1 (context {server.context} tokens, queue {max_queue}, bodies up to "
        f"{max_body_mb:g} MB{', API key required' if api_key else ''})",
        flush=True,
    )
    uvicorn.run(build_app(server, int(max_body_mb * (1 << 20))), host=host, port=port, log_level="warning")
