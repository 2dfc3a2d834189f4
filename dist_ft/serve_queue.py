"""The model behind `dist-ft serve` (see serve.py) and its request queue.

A request is checked against the model (its name, the context) before it takes a queue slot; at most
`max_queue` requests hold a slot (running or queued), more are refused with 503 at once; one generation runs
at a time, on the server's own threads. A slot is released once, however its request ends, and releasing it
stops the request's generation at the next token. The generation itself is handed in by the caller (serve.py:
`inference.stream`).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request

from .data import tools as tool_calls
from .errors import UserError
from .faults import NONE, Faults
from .inference import Delta
from .model import POSITION_KEYS
from .serve_api import ApiError, ChatRequest, CompletionRequest


def context_length(model) -> int:
    return next(
        (getattr(model.config, k) for k in POSITION_KEYS if isinstance(getattr(model.config, k, None), int)),
        2048,
    )


def longest_token(tok) -> int:
    """The most characters one token can stand for (at least 8): a prompt with more characters than the
    context times this cannot fit, so it is refused without being tokenized."""
    try:
        return max(8, *(len(t) for t in tok.get_vocab()))
    except Exception:  # noqa: BLE001 - a tokenizer without a plain vocabulary
        return 64


class Slot:
    """One admitted request's place in the queue: released once, however the request ends; releasing it also
    stops its generation."""

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
        # (a fast tokenizer may refuse two threads at once: "Already borrowed")
        self.tok_lock = threading.Lock()
        # (the generation's own threads: never behind JSON parsing or tokenizing)
        self.pool = ThreadPoolExecutor(2, "generate")

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
        """What can be refused before tokenizing: the model's name and a prompt too long whatever its
        tokens."""
        if req.model != self.name:
            raise ApiError(
                404,
                f"The model '{req.model[:100]}' does not exist; "
                f"this server serves '{self.name}' (GET /v1/models)",
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
        """The prompt's token ids (run off the event loop). A chat template that refuses the conversation is a
        400."""
        from jinja2 import TemplateError

        with self.tok_lock:
            if isinstance(req, CompletionRequest):
                return list(self.tok(req.text())["input_ids"])
            try:
                # tool calls and results checked as training checks them (ids, JSON arguments, defined tools)
                tools = tool_calls.definitions(req.tool_list(), "tools")
                msgs = [m.text() for m in req.messages]
                if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in msgs):
                    msgs = tool_calls.checked(msgs, tools, "messages")
                out = self.tok.apply_chat_template(
                    msgs, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
                )
            except UserError as e:
                raise ApiError(400, str(e)[:500], param="messages") from None
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
                f"This model's maximum context length is {self.context} tokens; "
                f"the prompt has {len(ids)} tokens",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            )
        if requested is not None and requested > room:
            raise ApiError(
                400,
                f"max_tokens {requested} is too large: the prompt has {len(ids)} tokens "
                f"and the context {self.context}, so at most {room} can be generated",
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
                f"The server is busy: {self.waiting} requests are running or queued "
                f"(at most {self.max_queue}); retry later",
                "server_error",
                "server_busy",
            )
        self.waiting += 1
        return Slot(self)

    async def deltas(self, slot: Slot, generation: Callable[[], Iterator[Delta]]):
        """Deltas of `generation()`, started once it is this slot's turn; the slot is released when it ends,
        however it ends."""
        outcome = "cancelled"
        try:
            async with self.lock:
                if slot.cancel.is_set():  # (the client left while queued)
                    return
                slot.started = True
                it = generation()
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
