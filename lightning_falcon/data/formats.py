"""The shapes of training data, as the objects the datamodule holds one of per source.

- `Chat`: rows that are conversations (`messages` and ShareGPT lists, alpaca's instruction/input/output,
  prompt/response pairs), rendered through the run's chat template (`conversations.py`).
- `Turns`: one text column holding a conversation with turn markers, trained on as written; only assistant
  turns train.
- `Preference`: a chosen and a rejected answer to one request, each rendered as `Chat` renders a conversation,
  for the preference objectives (`model/preference.py`).

`detect` picks the format of a source set to `format: auto` from its columns. Each format knows its columns,
why a row is skipped, how a batch of rows is tokenized, how a user's input is rendered for generation (the way
training rendered it), and what is saved beside an adapter so that others render it alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from lightning_falcon.data import conversations
from lightning_falcon.data.conversations import BLANK, NO_ASSISTANT, Rendering
from lightning_falcon.data.prompts import Encoded, encode_turns_batch, prompt_length, split_turns, turn_prompt_ids

FormatName = Literal["auto", "messages", "alpaca", "prompt_response", "turns", "preference"]
# the columns of alpaca rows: the input may be empty, or missing
ALPACA = ("instruction", "input", "output")
# the column of a messages list, by default: OpenAI's name, then ShareGPT's
MESSAGES = ("messages", "conversations")
# the answers of a preference row (TRL's names); its request is the source's prompt column, when it has one
ANSWERS = ("chosen", "rejected")


class DataFormat(Protocol):
    """What the datamodule asks of a format."""

    name: ClassVar[str]

    @property
    def columns(self) -> list[str]:
        """The columns a dataset must have, in the order `screen` and `encode_batch` take them."""

    def screen(self, values: tuple) -> tuple[str | None, bool]:
        """(why a row, its `columns`' values, is skipped, None when it is kept; whether it has a system message of
        its own)."""

    def encode_batch(self, tokenizer, columns: dict[str, list], max_length: int) -> list[Encoded | None]:
        """Each kept row's ids and labels, cut to `max_length`, with one tokenizer call for the batch; None when
        no trained token fits."""

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        """The ids generation starts from for a user's input, rendered as training rendered requests."""

    def scaffold(self, tokenizer) -> tuple[int, str]:
        """(tokens the rendering takes around an empty input, what those tokens are)."""

    @property
    def reply_marker(self) -> str:
        """Text a generated reply ends with before its EOS, which is not part of the answer (empty: none)."""

    def describe(self) -> dict[str, Any]:
        """How inputs are rendered, as saved beside an adapter."""


@dataclass(frozen=True)
class Chat:
    """Conversation rows of one `kind` (`messages`, `alpaca` or `prompt_response`), rendered through the run's
    chat template."""

    kind: str
    row_columns: tuple[str, ...]
    rendering: Rendering
    system_prompt: str | None = None
    name: ClassVar[str] = "chat"

    @property
    def columns(self) -> list[str]:
        return list(self.row_columns)

    def messages(self, values: tuple) -> list[dict[str, str]] | str:
        return conversations.messages_of(self.kind, values, self.system_prompt)

    def screen(self, values: tuple) -> tuple[str | None, bool]:
        found = conversations.messages_of(self.kind, values, None)
        return (found, False) if isinstance(found, str) else (None, found[0]["role"] == "system")

    def encode_batch(self, tokenizer, columns: dict[str, list], max_length: int) -> list[Encoded | None]:
        rows = zip(*(columns[c] for c in self.row_columns), strict=True)
        conversations_ = [self.messages(values) for values in rows]
        return conversations.encode(tokenizer, self.rendering, conversations_, max_length)

    def request(self, text: str, history: list[tuple[str, str]] = ()) -> list[dict[str, str]]:
        """The messages that ask `text` after the exchanges of `history`, the system prompt first."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for asked, answered in history:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
        return [*messages, {"role": "user", "content": text}]

    def prompt_ids(self, tokenizer, text: str, history: list[tuple[str, str]] = ()) -> list[int]:
        return conversations.prompt_ids(tokenizer, self.rendering, self.request(text, history))

    def scaffold(self, tokenizer) -> tuple[int, str]:
        return len(self.prompt_ids(tokenizer, "")), f"the {self.rendering.template.name!r} chat template"

    @property
    def reply_marker(self) -> str:
        return self.rendering.marker

    def describe(self) -> dict[str, Any]:
        template = self.rendering.template
        return {
            "format": self.name,
            "rows": self.kind,
            "chat_template": template.name,
            "chat_template_text": template.text,
            "system_prompt": self.system_prompt,
            "eos_after_reply": bool(self.rendering.eos),
            "reply_marker": self.rendering.marker,
            "train_on": self.rendering.train_on,
        }


@dataclass(frozen=True)
class Preference(Chat):
    """Preference rows: a request (`row_columns` first, unless the answers hold whole conversations) and its chosen
    and rejected answers, each pair rendered as two conversations that share everything but the last reply, which
    alone trains (the rendering's `train_on` is `last_assistant`)."""

    name: ClassVar[str] = "preference"

    def pair(self, values: tuple, system_prompt: str | None) -> tuple[list, list] | str:
        prompt = values[0] if len(values) == 3 else None
        return conversations.pair_of(prompt, values[-2], values[-1], system_prompt)

    def screen(self, values: tuple) -> tuple[str | None, bool]:
        found = self.pair(values, None)
        return (found, False) if isinstance(found, str) else (None, found[0][0]["role"] == "system")

    def encode_batch(self, tokenizer, columns: dict[str, list], max_length: int) -> list[Encoded | None]:
        rows = zip(*(columns[c] for c in self.row_columns), strict=True)
        pairs = [self.pair(values, self.system_prompt) for values in rows]
        return conversations.encode_pairs(tokenizer, self.rendering, pairs, max_length)


@dataclass(frozen=True)
class Turns:
    text_column: str
    human_marker: str
    assistant_marker: str
    name: ClassVar[str] = "turns"

    @property
    def columns(self) -> list[str]:
        return [self.text_column]

    def screen(self, values: tuple) -> tuple[str | None, bool]:
        (text,) = values
        if text is None or not str(text).strip():
            return BLANK, False
        turns = split_turns(str(text), self.human_marker, self.assistant_marker)
        return (None if any(role == "assistant" for role, _ in turns) else NO_ASSISTANT), False

    def encode_batch(self, tokenizer, columns: dict[str, list], max_length: int) -> list[Encoded | None]:
        texts = [str(t) for t in columns[self.text_column]]
        encoded = encode_turns_batch(tokenizer, texts, self.human_marker, self.assistant_marker, max_length)
        for enc in encoded:
            if enc is not None:  # the conversation before the first trained reply
                enc.input = tokenizer.decode(enc.input_ids[: prompt_length(enc.labels)]).strip()
        return encoded

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        return turn_prompt_ids(tokenizer, text, self.human_marker, self.assistant_marker)

    def scaffold(self, tokenizer) -> tuple[int, str]:
        return len(self.prompt_ids(tokenizer, "")), "the turn markers"

    @property
    def reply_marker(self) -> str:
        return ""

    def describe(self) -> dict[str, Any]:
        return {"format": self.name, "human_marker": self.human_marker, "assistant_marker": self.assistant_marker}


def row_columns(kind: str, source, columns: list[str] | None = None) -> tuple[str, ...]:
    """The columns rows of `kind` are read from, by the source's settings (and the data's `columns`, when known:
    alpaca's input column is optional)."""
    if kind == "messages":
        return (messages_column(columns or [], source),)
    if kind == "alpaca":
        return ALPACA if columns is None or ALPACA[1] in columns else (ALPACA[0], ALPACA[2])
    if kind == "prompt_response":
        return (source.prompt_column, source.response_column)
    if kind == "preference":  # the prompt column is optional: whole conversations need none
        whole = columns is not None and source.prompt_column not in columns
        return ANSWERS if whole else (source.prompt_column, *ANSWERS)
    return (source.text_column,)


def detect(columns: list[str], source) -> str | None:
    """The format of a source set to `auto`, from its columns: a messages list (`messages`, ShareGPT's
    `conversations`, or `messages_column`), alpaca's instruction and output, the prompt and response columns,
    or the text column with turn markers; preference rows by their chosen and rejected answers; None when none
    fits. A messages list wins over chosen and rejected answers beside it (UltraFeedback's rows hold both): SFT
    reads the messages, and a preference objective asks for `format: preference`."""
    if source.messages_column in columns or any(c in columns for c in MESSAGES):
        return "messages"
    if all(c in columns for c in ANSWERS):
        return "preference"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if source.prompt_column in columns and source.response_column in columns:
        return "prompt_response"
    if source.text_column in columns:
        return "turns"
    return None


def messages_column(columns: list[str], source) -> str:
    """The column that holds a source's messages lists: `messages_column`, else `messages` or `conversations`."""
    if source.messages_column is not None:
        return source.messages_column
    return next((c for c in MESSAGES if c in columns), MESSAGES[0])


def expected_columns(source) -> str:
    """Each format and the columns it reads, for the error when a source fits none."""
    return (
        f"messages ({source.messages_column or ' or '.join(MESSAGES)}), alpaca ({', '.join(ALPACA)}), "
        f"prompt_response ({source.prompt_column}, {source.response_column}), turns ({source.text_column}), "
        f"preference ({source.prompt_column}, {', '.join(ANSWERS)})"
    )
