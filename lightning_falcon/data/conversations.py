"""Chat-shaped rows as conversations, and a conversation as token ids and labels through a chat template.

A row becomes a list of `{"role", "content"}` messages:
- `messages`: the column's own list, roles system, user and assistant; ShareGPT's `{"from", "value"}` with
  `human`, `gpt` and `system` reads alike.
- `alpaca`: one exchange, the user asking the instruction with its input after a blank line.
- `prompt_response`: one exchange.

A row is skipped, with its reason counted, when it has an unknown role, an empty content, roles out of order
(an optional system message first, then user and assistant in turn, from the user) or no assistant turn. A
user turn at the very end answers nothing, and is left out. Without a system message of its own, a row gets
`data.system_prompt` when it is set.

The trained tokens of an assistant turn are its text after the template's generation prompt, through the
template's end-of-turn marker when it has one, then EOS unless that marker is EOS itself: the reply, then what
ends it. Role names, the generation prompt, system and user text, and the space between turns train nothing.
Rendering is the template's own (`apply_chat_template`); the ids are the tokenizer's on the rendered text, with
the EOS tokens inserted, so they equal `apply_chat_template(messages, tokenize=True)` but for those EOS.

Too long for `max_length`: whole exchanges are dropped from the front (after the system message) until the
rest fits or one exchange is left, then the sequence is cut at `max_length`, inside the last reply.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Literal

from lightning_falcon.data.chat_templates import ChatTemplate, end_marker, render
from lightning_falcon.data.prompts import IGNORE_INDEX, Encoded
from lightning_falcon.data.tokenizer import special_token_id
from lightning_falcon.errors import ConfigError

TrainOn = Literal["all_assistant", "last_assistant"]

# `from` / `role` -> role: ShareGPT's names, then the OpenAI ones
ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

# why a row is skipped
UNKNOWN_ROLE = "an unknown role"
EMPTY = "an empty content"
BLANK = "an empty or null field"  # a prompt, response, instruction or output column
ORDER = "roles out of order"
NO_ASSISTANT = "no assistant turn"
IDENTICAL = "identical chosen and rejected answers"
OTHER_PROMPTS = "chosen and rejected conversations with different requests"
NO_PROMPT = "answers without a request (no prompt column, and not whole conversations)"


def _message(item: Any) -> dict[str, str] | str | None:
    """One message as `{"role", "content"}` (OpenAI's keys or ShareGPT's), or why it is unusable; None for an empty
    system message, which ShareGPT dumps often hold: it is left out (and `data.system_prompt` applies)."""
    if not isinstance(item, dict):
        return UNKNOWN_ROLE
    # `datasets` gives a column mixing both layouts every key, the other layout's null
    role = item.get("role") if item.get("role") is not None else item.get("from")
    content = item.get("content") if item.get("content") is not None else item.get("value")
    if role not in ROLES:
        return UNKNOWN_ROLE
    if not isinstance(content, str) or not content.strip():
        return None if ROLES[role] == "system" and (content is None or isinstance(content, str)) else EMPTY
    return {"role": ROLES[role], "content": content}


def _text(value: Any) -> str | None:
    """A field as text: a number in a CSV column reads as its digits; null stays None."""
    return value if isinstance(value, str) or value is None else str(value)


def messages_of(kind: str, values: tuple, system_prompt: str | None) -> list[dict[str, str]] | str:
    """A row's conversation (`values`: the format's columns, in order), or why the row is skipped."""
    if kind == "alpaca":  # the input column may be missing
        instruction, extra, output = (_text(v) for v in (values if len(values) == 3 else (values[0], None, values[1])))
        if not (instruction and instruction.strip() and output and output.strip()):
            return BLANK
        ask = instruction if not isinstance(extra, str) or not extra.strip() else f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": output}]
    elif kind == "prompt_response":
        prompt, response = (_text(v) for v in values)
        if not (prompt and prompt.strip() and response and response.strip()):
            return BLANK
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        (items,) = values
        messages = _messages(items)
        if isinstance(messages, str):
            return messages
        if not messages:
            return NO_ASSISTANT
    return _ordered(messages, system_prompt)


def _messages(items: Any) -> list[dict[str, str]] | str:
    """A list of messages (OpenAI's or ShareGPT's keys) as `{"role", "content"}`, or why it is unusable."""
    if not isinstance(items, list):
        return NO_ASSISTANT
    messages = []
    for item in items:
        message = _message(item)
        if isinstance(message, str):
            return message
        if message is not None:
            messages.append(message)
    return messages


def _part(value: Any, role: str) -> list[dict[str, str]] | str:
    """A preference row's request or answer as messages: a list of them as it is, text as one message of `role`."""
    if isinstance(value, list):
        return _messages(value)
    text = _text(value)
    return BLANK if text is None or not text.strip() else [{"role": role, "content": text}]


def pair_of(prompt: Any, chosen: Any, rejected: Any, system_prompt: str | None) -> tuple[list, list] | str:
    """A preference row as two conversations that differ in their last reply only (chosen, rejected), or why the
    row is skipped. An answer is text or a messages list: the reply alone, after the request (`prompt`: text or a
    messages list), or a whole conversation that opens with its request, whatever `prompt` holds (TRL's implicit
    prompt; UltraFeedback's rows repeat it in `prompt`). `prompt` is None without a prompt column."""
    sides = []
    for answer in (chosen, rejected):
        reply = _part(answer, "assistant")
        if isinstance(reply, str):
            return reply
        if not reply:
            return NO_ASSISTANT
        if reply[0]["role"] == "assistant":  # the reply alone: after the request
            if prompt is None:
                return NO_PROMPT
            request = _part(prompt, "user")
            if isinstance(request, str):
                return request
            reply = request + reply
        conversation = _ordered(reply, system_prompt)
        if isinstance(conversation, str):
            return conversation
        sides.append(conversation)
    chosen_side, rejected_side = sides
    if chosen_side[:-1] != rejected_side[:-1]:
        return OTHER_PROMPTS
    if chosen_side[-1]["content"].strip() == rejected_side[-1]["content"].strip():
        return IDENTICAL
    return chosen_side, rejected_side


def _ordered(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]] | str:
    start = 1 if messages[0]["role"] == "system" else 0
    turns = messages[start:]
    if turns and turns[-1]["role"] == "user":
        turns = turns[:-1]  # a last request answers nothing
    if any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)):
        return ORDER
    if not turns:
        return NO_ASSISTANT
    system = messages[:start] or ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    return system + turns


@dataclass(frozen=True)
class Rendering:
    """How conversations become ids: the template, the EOS text inserted after each reply (empty where the
    template's own end marker is EOS, or a special token of the tokenizer), which replies train, and the end marker
    a generated reply stops with, which is not part of the answer: ChatML's `<|im_end|>`, as text before the
    inserted EOS on a tokenizer that lacks it as a token, or as the token itself (Falcon-H1's)."""

    template: ChatTemplate
    eos: str
    train_on: TrainOn = "all_assistant"
    marker: str = ""


def rendering_of(tokenizer, template: ChatTemplate, train_on: TrainOn = "all_assistant") -> Rendering:
    """How `template` ends a reply on this tokenizer, and so what goes after it and where generation stops."""
    marker = end_marker(tokenizer, template).strip()
    if marker == tokenizer.eos_token:  # the template ends a reply with EOS itself: nothing to add or cut
        return Rendering(template, "", train_on)
    if special_token_id(tokenizer, marker) is not None:  # an end-of-turn token: generation stops there
        return Rendering(template, "", train_on, marker)
    # An EOS after the template's own end (if any), which generation stops at; the marker text is cut off.
    return Rendering(template, tokenizer.eos_token, train_on, marker)


def without_marker(text: str, marker: str) -> str:
    """A generated reply up to the end `marker` it stopped with (`Rendering.marker`; empty: all of it)."""
    return text.split(marker, 1)[0].rstrip() if marker else text


@dataclass
class Layout:
    text: str  # the rendered conversation, the EOS inserted after each reply
    spans: list[tuple[int, int]]  # the characters that train: each trained reply and what ends it


def layout(tokenizer, rendering: Rendering, messages: list[dict[str, str]], generation_prompt: bool = False) -> Layout:
    """The text of `messages` as training sees it, and which characters train."""
    template = rendering.template
    whole = render(tokenizer, template, messages, generation_prompt)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = set(replies if rendering.train_on == "all_assistant" else replies[-1:])
    text, spans, cursor = "", [], 0
    for i in replies:
        before = render(tokenizer, template, messages[:i], generation_prompt=True)
        last = i == len(messages) - 1 and not generation_prompt
        through = whole if last else render(tokenizer, template, messages[: i + 1])
        if not (whole.startswith(through) and through.startswith(before)):
            raise ConfigError(
                f"data.chat_template {template.name} renders turn {i} differently once later turns follow, so its "
                "tokens cannot be marked. Fix: choose another --data.chat_template"
            )
        end = len(before) + len(through[len(before) :].rstrip())
        text += whole[cursor:end]
        if i in trained:
            spans.append((len(before) + len(text) - end, len(text) + len(rendering.eos)))
        text += rendering.eos
        cursor = end
    return Layout(text + whole[cursor:], spans)


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's label: itself where it overlaps a trained span, else ignored."""
    labels = [IGNORE_INDEX] * len(ids)
    starts = [start for start, _ in offsets]
    ends = [max(end, start + 1) for start, end in offsets]  # an empty token sits on its first character
    for first, last in spans:  # the tokens overlapping [first, last): their ends past `first`, starts before `last`
        i, j = bisect.bisect_right(ends, first), bisect.bisect_left(starts, last)
        labels[i:j] = ids[i:j]
    return labels


def _tokenize(tokenizer, layouts: list[Layout]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each layout, from one batched tokenizer call."""
    if not layouts:
        return []
    encoded = tokenizer([lay.text for lay in layouts], add_special_tokens=False, return_offsets_mapping=True)
    return [
        (ids, _labels(ids, offsets, lay.spans))
        for ids, offsets, lay in zip(encoded["input_ids"], encoded["offset_mapping"], layouts, strict=True)
    ]


def prompt_ids(tokenizer, rendering: Rendering, messages: list[dict[str, str]]) -> list[int]:
    """The ids a reply to `messages` (ending with the user's request) is generated from: as training lays out
    the conversation so far, then the generation prompt."""
    return _tokenize(tokenizer, [layout(tokenizer, rendering, messages, generation_prompt=True)])[0][0]


def _exchanges(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[list[dict[str, str]]]]:
    start = 1 if messages[0]["role"] == "system" else 0
    return messages[:start], [messages[i : i + 2] for i in range(start, len(messages), 2)]


def _assemble(ids: list[int], labels: list[int], max_length: int, dropped: int, request: str) -> Encoded | None:
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    # shifted loss: the label at position 0 never counts
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Encoded(ids, labels, truncated, dropped_turns=dropped, input=request)


def encode(
    tokenizer, rendering: Rendering, conversations: list[list[dict[str, str]]], max_length: int
) -> list[Encoded | None]:
    """Each conversation's ids and labels, fitted to `max_length` (None: no trained token fits), with one
    batched tokenizer call for all that fit whole."""
    first = _tokenize(tokenizer, [layout(tokenizer, rendering, c) for c in conversations])
    return [_fit(tokenizer, rendering, c, max_length, encoded) for c, encoded in zip(conversations, first, strict=True)]


def _fit(
    tokenizer,
    rendering: Rendering,
    messages: list[dict[str, str]],
    max_length: int,
    encoded: tuple[list[int], list[int]] | None = None,
    drop: int = 0,
) -> Encoded | None:
    """A conversation fitted to `max_length`, its first `drop` exchanges left out whatever its length (`encoded`:
    its ids and labels whole, when known)."""
    system, exchanges = _exchanges(messages)
    dropped = min(drop, len(exchanges) - 1)
    if dropped or encoded is None:
        exchanges = exchanges[dropped:]
        messages = system + [m for exchange in exchanges for m in exchange]
        encoded = _tokenize(tokenizer, [layout(tokenizer, rendering, messages)])[0]
    ids, labels = encoded
    while len(ids) > max_length and len(exchanges) > 1:
        exchanges, dropped = exchanges[1:], dropped + 1
        messages = system + [m for exchange in exchanges for m in exchange]
        ((ids, labels),) = _tokenize(tokenizer, [layout(tokenizer, rendering, messages)])
    return _assemble(ids, labels, max_length, dropped, _request(messages, rendering.train_on))


def encode_pairs(
    tokenizer, rendering: Rendering, pairs: list[tuple[list, list]], max_length: int
) -> list[Encoded | None]:
    """Each (chosen, rejected) pair of conversations as the chosen one's ids and labels with the rejected one's
    beside them, both cut the same way: the same earlier exchanges left out, then each cut at `max_length` (the
    request they share is cut alike). None where either answer keeps no trained token."""
    encoded = encode(tokenizer, rendering, [c for pair in pairs for c in pair], max_length)
    out: list[Encoded | None] = []
    for (chosen, rejected), first, second in zip(pairs, encoded[0::2], encoded[1::2], strict=True):
        while first is not None and second is not None and first.dropped_turns != second.dropped_turns:
            drop = max(first.dropped_turns, second.dropped_turns)
            if first.dropped_turns < drop:
                first = _fit(tokenizer, rendering, chosen, max_length, drop=drop)
            else:
                second = _fit(tokenizer, rendering, rejected, max_length, drop=drop)
        if first is None or second is None:
            out.append(None)
            continue
        first.truncated = first.truncated or second.truncated
        first.rejected_ids, first.rejected_labels = second.input_ids, second.labels
        out.append(first)
    return out


def _request(messages: list[dict[str, str]], train_on: TrainOn) -> str:
    """What a user typed for the first trained reply: the request it answers."""
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    first = replies[0] if train_on == "all_assistant" else replies[-1]
    return messages[first - 1]["content"].strip()
