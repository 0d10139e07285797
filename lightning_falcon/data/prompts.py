"""The `turns` format (one text column with turn markers) -> token ids + labels, and what every format's
encoding is: `Encoded`, with -100 (ignored by the loss) on every untrained token.

Only assistant turns train, each ending with an EOS. The pieces are tokenized separately and concatenated,
so the boundary between masked and trained tokens is exact whatever the tokenizer merges. The per-row
encoder is the definition (also used to render generation prompts); the batched one makes one tokenizer call
for a whole batch of rows and gives exactly the per-row result (tests/test_tokenizing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # cut at max_length
    dropped_turns: int = 0  # whole earlier exchanges left out to fit max_length
    input: str = ""  # what a user typed for the first trained reply
    # a preference pair: the rejected answer's sequence (`input_ids` and `labels` hold the chosen one's)
    rejected_ids: list[int] | None = None
    rejected_labels: list[int] | None = None


def prompt_length(labels: list[int]) -> int:
    """How many leading tokens are prompt (untrained): generation starts from exactly these."""
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def _assemble(pieces: list[tuple[list[int], bool]], max_length: int) -> Encoded | None:
    """Concatenate (ids, trained) pieces and cut at `max_length`.

    Returns None when nothing trainable survives the cut (the row teaches nothing).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in pieces:
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    # Shifted loss: label at position 0 never counts, so a trainable token must sit at >= 1.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Encoded(input_ids, labels, truncated)


def batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids, as `tokenizer(text)` gives them, from one batched call (a fast tokenizer encodes in Rust)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def split_turns(text: str, human_marker: str, assistant_marker: str) -> list[tuple[str, str]]:
    """Split `### Human: a ### Assistant: b ...` into (role, content) pairs, roles 'human'/'assistant'."""
    turns: list[tuple[str, str]] = []
    rest = text
    while rest:
        h, a = rest.find(human_marker), rest.find(assistant_marker)
        starts = [
            (i, role, m) for i, role, m in ((h, "human", human_marker), (a, "assistant", assistant_marker)) if i >= 0
        ]
        if not starts:
            break
        _, role, marker = min(starts)
        rest = rest[rest.find(marker) + len(marker) :]
        nxt = [i for i in (rest.find(human_marker), rest.find(assistant_marker)) if i >= 0]
        end = min(nxt) if nxt else len(rest)
        turns.append((role, rest[:end]))
        rest = rest[end:]
    return turns


def turn_prompt_ids(tokenizer, message: str, human_marker: str, assistant_marker: str) -> list[int]:
    """Format (b) for generation: one human turn, then the assistant marker, tokenized as training pieces are."""
    human = tokenizer(f"{human_marker} {message.strip()} ", add_special_tokens=False)["input_ids"]
    return human + tokenizer(assistant_marker, add_special_tokens=False)["input_ids"]


def encode_turns(tokenizer, text: str, human_marker: str, assistant_marker: str, max_length: int) -> Encoded | None:
    """Format (b): a `text` with turn markers. Only assistant turns train, each ending with an EOS."""
    pieces: list[tuple[list[int], bool]] = []
    for role, content in split_turns(text, human_marker, assistant_marker):
        if role == "human":
            pieces.append((tokenizer(human_marker + content, add_special_tokens=False)["input_ids"], False))
        else:
            pieces.append((tokenizer(assistant_marker, add_special_tokens=False)["input_ids"], False))
            # The reply keeps its leading space, as a byte-level BPE tokenizes it after the marker.
            reply = tokenizer(content.rstrip(), add_special_tokens=False)["input_ids"]
            pieces.append((reply + [tokenizer.eos_token_id], True))
    if not pieces:
        return None
    return _assemble(pieces, max_length)


def encode_turns_batch(
    tokenizer, texts: list[str], human_marker: str, assistant_marker: str, max_length: int
) -> list[Encoded | None]:
    """`encode_turns` of each text, with one tokenizer call for the turns of all of them."""
    conversations = [split_turns(text, human_marker, assistant_marker) for text in texts]
    # the pieces `encode_turns` tokenizes, but the assistant marker, which is the same every time
    turn_ids = iter(
        batch_ids(
            tokenizer,
            [
                human_marker + content if role == "human" else content.rstrip()
                for turns in conversations
                for role, content in turns
            ],
        )
    )
    marker = tokenizer(assistant_marker, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    encoded: list[Encoded | None] = []
    for turns in conversations:
        pieces: list[tuple[list[int], bool]] = []
        for role, _ in turns:
            if role == "human":
                pieces.append((next(turn_ids), False))
            else:
                pieces += [(marker, False), (next(turn_ids) + eos, True)]
        encoded.append(_assemble(pieces, max_length) if pieces else None)
    return encoded
