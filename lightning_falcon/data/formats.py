"""The two shapes of training data, as two objects the datamodule holds one of (`data_format`).

- `PromptResponse`: a prompt column and a response column; the prompt is rendered through a named
  template and the response follows it.
- `Turns`: one text column holding a conversation with turn markers; only assistant turns train.

Each knows its columns, how a row is tokenized, how a user's input is rendered for generation (the
way training rendered it), and what is saved beside an adapter so that others render it alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from lightning_falcon.data.prompts import (
    TEMPLATES,
    Encoded,
    encode_pair,
    encode_pairs,
    encode_turns,
    encode_turns_batch,
    pair_prompt_ids,
    prompt_length,
    turn_prompt_ids,
)

FormatName = Literal["prompt_response", "turns"]


class DataFormat(Protocol):
    """What the datamodule asks of a format."""

    name: ClassVar[str]

    @property
    def columns(self) -> list[str]:
        """The columns a dataset must have."""

    def problems(self) -> list[str]:
        """What is wrong with the settings, each with its fix (none: an empty list)."""

    def encode(self, tokenizer, row: dict, max_length: int) -> Encoded | None:
        """A row's ids and labels, cut to `max_length`; None when no trained token fits."""

    def encode_batch(self, tokenizer, columns: dict[str, list], max_length: int) -> list[Encoded | None]:
        """`encode` of each row of a batch given as columns (`columns` holds at least `self.columns`), batched."""

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        """The ids generation starts from for a user's input, rendered as training rendered prompts."""

    def scaffold(self, tokenizer) -> tuple[int, str]:
        """(tokens the rendering takes around an empty input, what those tokens are)."""

    def raw_input(self, tokenizer, row: dict, encoded: Encoded) -> str:
        """What a user would have typed for this row."""

    def describe(self) -> dict[str, Any]:
        """How inputs are rendered, as saved beside an adapter."""


@dataclass(frozen=True)
class PromptResponse:
    prompt_column: str
    response_column: str
    template: str
    name: ClassVar[str] = "prompt_response"

    @property
    def columns(self) -> list[str]:
        return [self.prompt_column, self.response_column]

    def problems(self) -> list[str]:
        if self.template not in TEMPLATES:
            return [f"data.template {self.template!r} is unknown. Fix: choose one of {sorted(TEMPLATES)}"]
        return []

    def encode(self, tokenizer, row: dict, max_length: int) -> Encoded | None:
        prompt, response = str(row[self.prompt_column]), str(row[self.response_column])
        return encode_pair(tokenizer, prompt, response, self.template, max_length)

    def encode_batch(self, tokenizer, columns: dict[str, list], max_length: int) -> list[Encoded | None]:
        prompts = [str(p) for p in columns[self.prompt_column]]
        responses = [str(r) for r in columns[self.response_column]]
        return encode_pairs(tokenizer, prompts, responses, self.template, max_length)

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        return pair_prompt_ids(tokenizer, text, self.template)

    def scaffold(self, tokenizer) -> tuple[int, str]:
        return len(self.prompt_ids(tokenizer, "")), f"the {self.template!r} template"

    def raw_input(self, tokenizer, row: dict, encoded: Encoded) -> str:
        return str(row[self.prompt_column])

    def describe(self) -> dict[str, Any]:
        return {"format": self.name, "template": self.template, "template_text": TEMPLATES[self.template]}


@dataclass(frozen=True)
class Turns:
    text_column: str
    human_marker: str
    assistant_marker: str
    name: ClassVar[str] = "turns"

    @property
    def columns(self) -> list[str]:
        return [self.text_column]

    def problems(self) -> list[str]:
        return []

    def encode(self, tokenizer, row: dict, max_length: int) -> Encoded | None:
        return encode_turns(tokenizer, str(row[self.text_column]), self.human_marker, self.assistant_marker, max_length)

    def encode_batch(self, tokenizer, columns: dict[str, list], max_length: int) -> list[Encoded | None]:
        texts = [str(t) for t in columns[self.text_column]]
        return encode_turns_batch(tokenizer, texts, self.human_marker, self.assistant_marker, max_length)

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        return turn_prompt_ids(tokenizer, text, self.human_marker, self.assistant_marker)

    def scaffold(self, tokenizer) -> tuple[int, str]:
        return len(self.prompt_ids(tokenizer, "")), "the turn markers"

    def raw_input(self, tokenizer, row: dict, encoded: Encoded) -> str:
        # the conversation before the first trained reply
        return tokenizer.decode(encoded.input_ids[: prompt_length(encoded.labels)]).strip()

    def describe(self) -> dict[str, Any]:
        return {"format": self.name, "human_marker": self.human_marker, "assistant_marker": self.assistant_marker}


def data_format(hparams) -> DataFormat:
    """The format object a datamodule's settings describe."""
    if hparams["format"] == "prompt_response":
        return PromptResponse(hparams["prompt_column"], hparams["response_column"], hparams["template"])
    return Turns(hparams["text_column"], hparams["human_marker"], hparams["assistant_marker"])
