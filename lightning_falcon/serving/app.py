"""The HTTP side of `serve`: the OpenAI routes, the chat page, and every error in the OpenAI shape.

FastAPI parses and checks the requests; each is rendered as `chat` renders a conversation and queued on the
`Engine`, and its answer is awaited whole or streamed as server-sent events. A client that goes away is withdrawn:
its sequences stop and its place in the queue is freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from lightning_falcon.data.conversation import Conversation
from lightning_falcon.data.formats import Chat, DataFormat
from lightning_falcon.serving.engine import Engine, Event, Job, QueueFull, Sampling
from lightning_falcon.serving.openai import (
    APIError,
    ChatRequest,
    Common,
    CompletionRequest,
    Message,
    model_list,
    usage,
)

DISCONNECT_CHECK_S = 0.25  # how often a request looks whether its client is still there
RETRY_AFTER_S = 1  # a batch of the tiny model lasts about this long; a client is told to come back after it


@dataclass
class Served:
    """What the server answers with.

    Args:
        models: Each model id a request may name, and its PEFT adapter name (None: the base model).
        default_model: The id a request without `model` gets.
        format: The data format the run was trained on: requests are rendered as it renders them.
        tokenizer: The training tokenizer.
        context: The longest prompt, in tokens (the run's `data.max_length`).
        defaults: The sampling a request gets where it says nothing (the run's `generation:` settings).
        max_n: Most sequences one request may ask for (the batch size).
        api_key: The key every `/v1` request must carry; None: no key.
    """

    models: dict[str, str | None]
    default_model: str
    format: DataFormat
    tokenizer: object
    context: int
    defaults: Sampling
    max_n: int
    api_key: str | None = None


def create_app(served: Served, engine: Engine) -> FastAPI:
    app = FastAPI(title="lightning_falcon", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, APIError(400, *invalid_message(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(e.status_code, str(e.detail)))

    async def authenticate(request: Request) -> None:
        # A dependency, not an HTTP middleware: Starlette's middleware wraps `receive`, and a request behind it
        # would never see its client disconnect.
        if served.api_key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            given = given.strip() if scheme.lower() == "bearer" else ""
            if not hmac.compare_digest(given.encode(), served.api_key.encode()):
                message = "missing or wrong API key. Fix: send the header `Authorization: Bearer KEY`"
                raise APIError(401, message, code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("lightning_falcon.serving").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:  # the generation thread has ended: no request would be answered
            return JSONResponse({"status": "stopped", **engine.stats()}, status_code=503)
        return JSONResponse({"status": "ok", **engine.stats()})

    @v1.get("/models")
    async def models() -> dict:
        return model_list(list(served.models))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        name = model_id(served, body.model)
        prompt = chat_prompt(served, body.messages)
        job = submit(served, engine, body, [prompt], name, body.max_completion_tokens)
        if body.stream:
            return JobStream(chat_chunks(engine, job, name, body, request), engine, job)
        await answered(engine, job, request)
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for c in job.choices
        ]
        return response(job, "chat.completion", name, choices)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        name = model_id(served, body.model)
        prompts = [rendered(served, served.format, [], text, "prompt") for text in body.prompts()]
        job = submit(served, engine, body, prompts, name)
        if body.stream:
            return JobStream(completion_chunks(engine, job, name, body, request), engine, job)
        await answered(engine, job, request)
        choices = [
            {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None} for c in job.choices
        ]
        return response(job, "text_completion", name, choices)

    app.include_router(v1)
    return app


class JobStream(StreamingResponse):
    """A job's answer as server-sent events; however the response ends (done, failed, or its client gone before or
    while it streams), the job is withdrawn, so that it never runs on for nobody."""

    def __init__(self, chunks: AsyncIterator[str], engine: Engine, job: Job) -> None:
        # a proxy (nginx) would otherwise hold the events back until its buffer fills
        super().__init__(chunks, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})
        self.engine, self.job = engine, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.engine.withdraw(self.job)


def invalid_message(errors: list[dict]) -> tuple[str, str | None]:
    """(one line naming each invalid field and why, the first field) from pydantic's errors."""
    if any(error["type"] == "json_invalid" for error in errors):
        return "the request body is not valid JSON. Fix: send a JSON object", None
    parts, first = [], None
    for error in errors:
        field = ".".join(str(p) for p in error["loc"] if p != "body")
        first = first or field
        parts.append(f"{field or 'body'}: {error['msg']}")
    return "; ".join(parts), first


def model_id(served: Served, asked: str | None) -> str:
    name = asked or served.default_model
    if name not in served.models:
        raise APIError(
            404,
            f"the model {name!r} is not served here (served: {', '.join(served.models)})",
            "model",
            "model_not_found",
        )
    return name


def chat_prompt(served: Served, messages: list[Message]) -> list[int]:
    """The prompt's ids: a leading system message, then user and assistant turns in order, the user's last."""
    system = None
    if messages[0].role in ("system", "developer"):
        system, messages = messages[0].text(), messages[1:]
    roles = [m.role for m in messages]
    expected = ["user", "assistant"] * (len(messages) // 2) + ["user"] * (len(messages) % 2)
    if not messages or roles != expected or roles[-1] != "user":
        raise APIError(
            400,
            f"messages must be an optional system message, then user and assistant turns in turn, ending with the "
            f"user's; got {', '.join([*(['system'] if system is not None else []), *roles]) or 'no turn'}",
            "messages",
        )
    format = served.format
    if system is not None:
        if not isinstance(format, Chat):
            raise APIError(
                400,
                f"this model was trained on {format.name} rows, with no system prompt. Fix: drop the system message",
                "messages",
            )
        format = dataclasses.replace(format, system_prompt=system)
    history = [(messages[i].text(), messages[i + 1].text()) for i in range(0, len(messages) - 1, 2)]
    return rendered(served, format, history, messages[-1].text(), "messages")


def rendered(served: Served, format: DataFormat, history: list[tuple[str, str]], text: str, param: str) -> list[int]:
    """The ids generation starts from, as `chat` renders them; a prompt over the context is refused, not cut."""
    conversation = Conversation(format, served.tokenizer, sys.maxsize)
    conversation.replay(history)
    ids = conversation.prompt(text)
    if len(ids) > served.context:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens, longer than this model's context of {served.context} tokens "
            "(the run's data.max_length). Fix: shorten it",
            param,
            "context_length_exceeded",
        )
    return ids


def submit(
    served: Served, engine: Engine, body: Common, prompts: list[list[int]], name: str, max_tokens: int | None = None
) -> Job:
    """Check the request's numbers, then queue it (503 when the queue is full)."""
    defaults = served.defaults
    max_tokens = next((m for m in (max_tokens, body.max_tokens) if m is not None), defaults.max_tokens)
    problems = []
    if not 1 <= max_tokens <= served.context:
        problems.append(f"max_tokens must be between 1 and {served.context}, got {max_tokens}")
    n = 1 if body.n is None else body.n
    if not 1 <= n * len(prompts) <= served.max_n:
        rows = n * len(prompts)
        problems.append(f"n times the prompts must be between 1 and {served.max_n} (the batch size), got {rows}")
    if problems:
        raise APIError(400, "; ".join(problems), "max_tokens" if "max_tokens" in problems[0] else "n")
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        stop=body.stops(),
    )
    job = Job(prompts, n, served.models[name], sampling, asyncio.get_running_loop())
    try:
        engine.submit(job)
    except QueueFull:
        raise APIError(503, f"the server is busy: {engine.max_queue} requests are in already. Retry later") from None
    return job


async def events(engine: Engine, job: Job, request: Request) -> AsyncIterator[Event]:
    """The job's events until every choice has ended; the job is withdrawn if its client disconnects meanwhile
    (looked for every DISCONNECT_CHECK_S, whether events flow or the request still waits in the queue) or its
    reader stops."""
    left = len(job.choices)
    checked = time.monotonic()
    try:
        while left:
            try:
                event = await asyncio.wait_for(job.events.get(), DISCONNECT_CHECK_S)
            except TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            if event is None:
                continue
            if event.finish_reason == "error":
                raise APIError(500, f"generation failed: {event.text}")
            left -= event.finish_reason is not None
            yield event
    finally:
        if left:
            engine.withdraw(job)


async def answered(engine: Engine, job: Job, request: Request) -> None:
    """Wait for the whole answer (a client that disconnects meanwhile is withdrawn)."""
    async for _ in events(engine, job, request):
        pass


def response(job: Job, kind: str, name: str, choices: list[dict]) -> dict:
    return {
        "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{job.id}",
        "object": kind,
        "created": job.created,
        "model": name,
        "choices": choices,
        "usage": usage(job.prompt_tokens, job.completion_tokens),
    }


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def chat_chunks(engine: Engine, job: Job, name: str, body: ChatRequest, request: Request) -> AsyncIterator[str]:
    base = {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk", "created": job.created, "model": name}

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return sse({**base, "choices": [choice]})

    for choice in job.choices:
        yield chunk(choice.index, {"role": "assistant", "content": ""})
    async for text in streamed(engine, job, request, body, base, chunk):
        yield text


async def completion_chunks(
    engine: Engine, job: Job, name: str, body: CompletionRequest, request: Request
) -> AsyncIterator[str]:
    base = {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": name}

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> str:
        text = delta.get("content", "")
        choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return sse({**base, "choices": [choice]})

    async for text in streamed(engine, job, request, body, base, chunk):
        yield text


async def streamed(engine: Engine, job: Job, request: Request, body: Common, base: dict, chunk) -> AsyncIterator[str]:
    """The events as server-sent chunks, then the usage if asked for, then `[DONE]`; an error ends the stream
    with an error chunk."""
    try:
        async for event in events(engine, job, request):
            if event.text:
                yield chunk(event.index, {"content": event.text})
            if event.finish_reason is not None:
                yield chunk(event.index, {}, event.finish_reason)
    except APIError as e:
        yield sse(e.body())
        return
    if body.stream_options is not None and body.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage(job.prompt_tokens, job.completion_tokens)})
    yield sse("[DONE]")
