"""`dist-ft serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over an exported model.

`/v1/chat/completions` (JSON or SSE stream), `/v1/completions`, `/v1/models`, `/health`. Replies come from
`inference.stream`, so they render the same chat template, stop on the same end-of-turn token and sample the
same way as `dist-ft chat`. One generation runs at a time (a CPU or a single GPU is busy with one); up to
`max_queue` requests wait, more get 503 at once (the queue: serve_queue.py). No client can wedge it: a request
is validated (serve_api.py) before it takes a queue slot, the slot is given back however the request ends (an
error, a disconnect, a stream never read), a client that disconnects - streaming or not - stops its generation
at the next token, a failure mid-stream is sent as an SSE error event and `[DONE]`, and templating and
tokenizing run off the event loop, so `/health` always answers. With an API key every `/v1` request needs
`Authorization: Bearer <key>` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing, suppress

from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse

from .data import tools as tool_calls
from .faults import NONE, Faults
from .inference import Delta, stream
from .serve_api import (
    ApiError,
    BodyLimit,
    ChatRequest,
    CompletionRequest,
    Json,
    install_error_handlers,
    parse,
)
from .serve_queue import Server, Slot


class _Stream(EventSourceResponse):
    """An SSE response that owns its queue slot: released (and its events closed) when the response ends,
    even if the events were never read."""

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
            requested = (
                (req.max_completion_tokens or req.max_tokens)
                if isinstance(req, ChatRequest)
                else req.max_tokens
            )
            gen = server.plan(req, ids, requested)
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
            if chat and not req.stream and req.calls_wanted():
                # calls written as <tool_call>{"name", "arguments"}</tool_call> (our ChatML; Qwen's and
                # Hermes' too): OpenAI's tool_calls, the rest as the content
                rest, calls = tool_calls.parse_calls(text)
                if calls:
                    message = {"role": "assistant", "content": rest or None, "tool_calls": calls}
                    return {"index": 0, "message": message, "finish_reason": "tool_calls"}
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

    def generation(slot: Slot, ids: list[int], gen: dict):
        """The deltas of one request's generation (`stream`, looked up when its turn comes)."""
        return server.deltas(
            slot,
            lambda: stream(server.tok, server.model, ids, cancel=slot.cancel, faults=server.faults, **gen),
        )

    async def events(req, ids: list[int], gen: dict, slot: Slot, chat: bool):
        choice, body = shape(req, chat)
        first, last = True, None
        try:
            async with aclosing(generation(slot, ids, gen)) as deltas:
                async for d in deltas:
                    if d.text or (first and chat):
                        yield json.dumps(body([choice(d.text, None, first)]))
                        first = False
                    if d.finish is not None:
                        last = d
                        yield json.dumps(body([choice("", d.finish)]))
            if last is not None and req.usage_wanted():
                yield json.dumps(body([], {"usage": _usage(len(ids), last)}))
        except Exception:  # noqa: BLE001 - the status was sent: the client gets an error event
            # (never the exception's text)
            yield json.dumps(SERVER_ERROR)
        yield "[DONE]"

    async def answer(request: Request, req, ids: list[int], gen: dict, slot: Slot, chat: bool) -> dict:
        choice, body = shape(req, chat)
        text, last = [], None

        async def run() -> None:
            nonlocal last
            async with aclosing(generation(slot, ids, gen)) as deltas:
                async for d in deltas:
                    text.append(d.text)
                    last = d

        work, watcher = asyncio.create_task(run()), asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                # the client left: a queued request leaves the queue now,
                # a running one stops at its next token
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
            f"--model '{model_dir}': a sequence classifier / reward model has no text to generate; "
            "serve a chat model"
        )
    tok, model = load(model_dir, adapter=adapter)
    server = Server(tok, model, name or model_dir, api_key, max_queue, faults=faults)
    print(
        f"serving '{server.name}' on http://{host}:{port}/v1 "
        f"(context {server.context} tokens, queue {max_queue}, bodies up to "
        f"{max_body_mb:g} MB{', API key required' if api_key else ''})",
        flush=True,
    )
    uvicorn.run(build_app(server, int(max_body_mb * (1 << 20))), host=host, port=port, log_level="warning")
