"""Requests in, tokens out: one generation thread that answers queued requests in left-padded batches.

Every request waits in one bounded queue; a full queue is refused (`QueueFull`), never grown. The thread takes the
oldest requests that fit `max_batch_size` sequences and generates for all of them in one `generate` call, whatever
their adapters and sampling settings:
- each row names its LoRA adapter (PEFT's mixed-adapter batches, `adapter_names`), `__base__` for none;
- each row samples with its own temperature and top_p, or greedily (`RowSampling`);
- each row stops at EOS, at the template's end marker, at its own `stop` strings, at its own `max_tokens`, or when
  its client has gone (`RowsDone`), while the others go on.
A batch is fixed once it starts: a request that arrives meanwhile waits for the next one.

Text reaches each request as it is generated (`RowStreamer`), on the request's asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lightning_falcon.data.tokenizer import special_ids
from lightning_falcon.model.generation import left_pad, stop_ids

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
GREEDY_BELOW = 1e-5  # a lower temperature is greedy: dividing the logits by it would overflow them
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """`max_queue` requests are in already, waiting or being answered: come back later."""


@dataclass(frozen=True)
class Sampling:
    """How one request's sequences are generated.

    Args:
        max_tokens: Most tokens generated per sequence.
        temperature: 0 is greedy; above 0 samples from the softmax at this temperature.
        top_p: Nucleus sampling: the smallest set of tokens whose probability reaches `top_p`.
        stop: Texts that end a sequence; the text is cut before them.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass
class Choice:
    """One generated sequence of a request: its text so far, its tokens, and why it ended (None: not yet)."""

    index: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already handed to the client
    finish_reason: str | None = None


@dataclass
class Event:
    """What a request learns from the generation thread: new text of a choice, or that it ended."""

    index: int
    text: str = ""
    finish_reason: str | None = None


class Job:
    """One request: its prompts (each generated `n` times), its adapter, its sampling, and its events.

    Args:
        prompts: Token ids of each prompt.
        n: Sequences generated per prompt; choice `i * n + j` is prompt i's j-th.
        adapter: The PEFT adapter name, or None for the base model.
        sampling: How its sequences are generated.
        loop: The asyncio loop the request waits on; events are put on it from the generation thread.
    """

    def __init__(
        self, prompts: list[list[int]], n: int, adapter: str | None, sampling: Sampling, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.prompts, self.n, self.adapter, self.sampling, self.loop = prompts, n, adapter, sampling, loop
        self.rows = [prompt for prompt in prompts for _ in range(n)]
        self.choices = [Choice(i) for i in range(len(self.rows))]
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def send(self, event: Event) -> None:
        """From the generation thread: hand `event` to the request's loop (dropped once the client has gone)."""
        if not self.cancelled.is_set():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """The client has gone: its sequences stop at the next token and nothing more is sent."""
        self.cancelled.set()


class RowSampling(LogitsProcessor):
    """Each row's own temperature and top_p; a row at temperature 0 keeps only its most likely token, so that
    sampling takes it, and greedy and sampled rows share one batch."""

    def __init__(self, temperatures: list[float], top_ps: list[float], device: torch.device) -> None:
        self.temperatures = torch.tensor(temperatures, device=device).unsqueeze(1)
        self.top_ps = torch.tensor(top_ps, device=device).unsqueeze(1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        greedy = self.temperatures < GREEDY_BELOW
        scores = scores / torch.where(greedy, 1.0, self.temperatures)
        # top_p, as transformers' TopPLogitsWarper does it, with a threshold per row; the most likely token stays
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - self.top_ps
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        best = scores.argmax(dim=-1, keepdim=True)
        only_best = torch.full_like(scores, -float("inf")).scatter(1, best, 0.0)
        return torch.where(greedy, only_best, scores)


@dataclass
class Row:
    """One sequence of a batch: whose choice it is, and the texts that end it."""

    job: Job
    choice: Choice
    stops: tuple[str, ...]

    @property
    def done(self) -> bool:
        return self.choice.finish_reason is not None or self.job.cancelled.is_set()


class RowStreamer(BaseStreamer):
    """Receives each step's tokens from `generate` (one per row) and turns them into each row's text.

    A row ends at a stop token, at one of its stop texts (cut before it), or at its `max_tokens`. Text is held back
    while it may be the start of a stop text, or ends inside a character that later tokens complete.
    """

    def __init__(self, tokenizer, rows: list[Row], stop_ids: list[int]) -> None:
        self.tokenizer, self.rows, self.stop_ids, self.prompt_seen = tokenizer, rows, set(stop_ids), False
        self.abandoned: list[int] = []  # tokens generated for each sequence whose client went away

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call hands over the prompts
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.tolist(), strict=True):
            if row.choice.finish_reason is None and row.job.cancelled.is_set():
                row.choice.finish_reason = "abandoned"  # its client has gone: this was its last token
                self.abandoned.append(len(row.choice.tokens))
            if row.done:
                continue
            if token in self.stop_ids:
                self.finish(row, "stop")
                continue
            row.choice.tokens.append(token)
            self.advance(row)
            if not row.done and len(row.choice.tokens) >= row.job.sampling.max_tokens:
                self.finish(row, "length")

    def end(self) -> None:
        for row in self.rows:  # generation stopped at the batch's longest max_tokens
            if not row.done:
                self.finish(row, "length")

    def advance(self, row: Row) -> None:
        choice = row.choice
        text = self.tokenizer.decode(choice.tokens, skip_special_tokens=True).lstrip()
        cut = min((i for i in (text.find(s) for s in row.stops) if i >= 0), default=-1)
        if cut >= 0:
            choice.text = text[:cut].rstrip()
            self.finish(row, "stop")
            return
        choice.text = text
        ready = len(text) - held_back(text, row.stops)
        if ready > choice.sent:
            row.job.send(Event(choice.index, text[choice.sent : ready]))
            choice.sent = ready

    def finish(self, row: Row, reason: str) -> None:
        choice = row.choice
        choice.finish_reason = reason
        row.job.send(Event(choice.index, choice.text[choice.sent :], reason))
        choice.sent = len(choice.text)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` to hold back: the longest end that a stop text starts with, and the
    whitespace before it (a cut drops it: the streamed text stays the start of the whole answer), or an unfinished
    character."""
    if text.endswith("\ufffd"):  # a character whose bytes span tokens: the next token completes it
        return len(text) - len(text.rstrip("\ufffd"))
    keep = max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
    return len(text) - len(text[: len(text) - keep].rstrip())


class RowsDone(StoppingCriteria):
    """Each row is done once the streamer has ended it or its client has gone."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


class Engine:
    """The generation thread and its bounded queue.

    Args:
        model: The PEFT model (LoRA layers and every served adapter loaded), on its device.
        tokenizer: The training tokenizer.
        marker: The text a reply ends with before its EOS (`Rendering.marker`), a stop for every request.
        repetition_penalty: `generation.repetition_penalty`, for every request.
        max_batch_size: Most sequences generated together.
        max_queue: Most requests in at once, waiting or being answered; one more is refused.
        batch_wait_s: How long a batch that is not full waits for more requests before it starts: clients that
            ask again as soon as an answer ends then share the next batch.
        forward_context: The precision context generation runs in (the trainer's).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        marker: str,
        repetition_penalty: float,
        max_batch_size: int,
        max_queue: int,
        batch_wait_s: float,
        forward_context: Callable[[], contextlib.AbstractContextManager],
    ) -> None:
        self.model, self.tokenizer, self.marker = model, tokenizer, marker
        self.repetition_penalty, self.max_batch_size, self.max_queue = repetition_penalty, max_batch_size, max_queue
        self.forward_context, self.batch_wait_s = forward_context, batch_wait_s
        self.pad = special_ids(tokenizer)[1]
        self.stop_ids = stop_ids(tokenizer, marker)
        # a marker that is plain text on this tokenizer (ChatML's on Falcon's) is cut at, as a stop text
        self.stops = (marker,) if marker and len(self.stop_ids) == 1 else ()
        self.waiting: deque[Job] = deque()
        self.admitted: set[Job] = set()  # waiting or being answered
        self.wakeup = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closing = False
        self.batches = 0  # generate calls made
        self.running = 0  # sequences of the batch being generated
        self.abandoned_sequences = self.abandoned_tokens = 0  # sequences stopped because their client went

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.wakeup:
            self.closing = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()

    def submit(self, job: Job) -> None:
        """Queue `job`; `QueueFull` when `max_queue` requests are in already."""
        with self.wakeup:
            if len(self.admitted) >= self.max_queue:
                raise QueueFull
            self.admitted.add(job)
            self.waiting.append(job)
            self.wakeup.notify()

    def withdraw(self, job: Job) -> None:
        """A client has gone: stop its sequences, and free its place at once, whether it waits or runs."""
        job.cancel()
        with self.wakeup:
            self.admitted.discard(job)
            with contextlib.suppress(ValueError):
                self.waiting.remove(job)

    def _done(self, jobs: list[Job]) -> None:
        with self.wakeup:
            self.admitted.difference_update(jobs)

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting requests whose sequences fit one batch (None: closing)."""
        with self.wakeup:
            while not self.waiting and not self.closing:
                self.wakeup.wait()
            deadline = time.monotonic() + self.batch_wait_s
            while sum(len(job.rows) for job in self.waiting) < self.max_batch_size and not self.closing:
                if not self.wakeup.wait(max(deadline - time.monotonic(), 0)):
                    break
            if self.closing:
                return None
            jobs, size = [], 0
            while self.waiting and size + len(self.waiting[0].rows) <= self.max_batch_size:
                job = self.waiting.popleft()
                jobs.append(job)
                size += len(job.rows)
            return jobs

    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            try:
                self._generate([job for job in jobs if not job.cancelled.is_set()])
            except Exception as e:
                log.exception("[serve] a batch of %d requests failed", len(jobs))
                for job in jobs:
                    job.send(Event(-1, f"{type(e).__name__}: {e}", "error"))
            finally:
                self._done(jobs)

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        rows = [Row(job, choice, self.stops + job.sampling.stop) for job in jobs for choice in job.choices]
        prompts = [prompt for job in jobs for prompt in job.rows]
        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_pad(prompts, self.pad)
        sampling = [row.job.sampling for row in rows]
        streamer = RowStreamer(self.tokenizer, rows, self.stop_ids)
        kwargs = {}
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        self.model.eval()
        self.running = len(rows)
        with self.forward_context():
            self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                adapter_names=[row.job.adapter or BASE for row in rows],
                max_new_tokens=max(s.max_tokens for s in sampling),
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad,
                use_cache=True,
                # RowSampling decides each row; transformers' own sampling settings stay neutral
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                logits_processor=LogitsProcessorList(
                    [RowSampling([s.temperature for s in sampling], [s.top_p for s in sampling], device)]
                ),
                stopping_criteria=StoppingCriteriaList([RowsDone(rows)]),
                streamer=streamer,
                **kwargs,
            )
        self.batches += 1
        self.running = 0
        self.abandoned_sequences += len(streamer.abandoned)
        self.abandoned_tokens += sum(streamer.abandoned)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stats(self) -> dict[str, int]:
        """What `/health` tells: requests waiting, batches run, and sequences stopped because their client went."""
        return {
            "admitted": len(self.admitted),
            "waiting": len(self.waiting),
            "running": self.running,
            "batches": self.batches,
            "abandoned_sequences": self.abandoned_sequences,
            "abandoned_tokens": self.abandoned_tokens,
        }
