"""A chat's token ids so far, rendered as training renders a conversation.

A `messages` model reads its history through the chat template, each earlier reply laid out as training laid
it out (`conversations.layout`); a `turns` model reads the human turns and the assistant's replies in a row,
each reply ending with EOS, as `encode_turns` lays out the training data. A model trained on alpaca or
prompt/response rows learned single requests, so each is answered on its own.
"""

from __future__ import annotations

from lightning_falcon.data.conversations import without_marker
from lightning_falcon.data.formats import Chat, DataFormat, Turns


class Conversation:
    """The requests and replies so far, as the token ids the next reply is generated from.

    Args:
        format: The data format the model was trained on; `messages`, `preference` and `turns` keep a history.
        tokenizer: The training tokenizer.
        max_length: The longest prompt kept: the oldest exchanges are dropped to fit (training's `data.max_length`).
        history: False answers every request on its own, in any format.
    """

    def __init__(self, format: DataFormat, tokenizer, max_length: int, history: bool = True) -> None:
        self.format, self.tokenizer, self.max_length = format, tokenizer, max_length
        conversations = isinstance(format, Chat) and format.kind in ("messages", "preference")
        multi_turn = isinstance(format, Turns) or conversations
        self.keeps_history = history and multi_turn
        # each: the request, the reply's text, and (for `turns`) the exchange's ids, the reply ending with EOS
        self.exchanges: list[tuple[str, str, list[int]]] = []
        self.dropped = 0  # exchanges dropped to fit max_length since the last reset

    def _ids(self, message: str) -> list[int]:
        if isinstance(self.format, Chat):
            history = [(request, reply) for request, reply, _ in self.exchanges]
            return self.format.prompt_ids(self.tokenizer, message, history)
        return [t for *_, ids in self.exchanges for t in ids] + self.format.prompt_ids(self.tokenizer, message)

    def prompt(self, message: str) -> list[int]:
        """The ids to generate the reply to `message` from: the history that fits, then the request."""
        ids = self._ids(message)
        while self.exchanges and len(ids) > self.max_length:
            self.exchanges.pop(0)
            self.dropped += 1
            ids = self._ids(message)
        return ids

    def add(self, message: str, reply_ids: list[int]) -> None:
        """Keep an answered request (when the format has a history); `reply_ids` without the EOS."""
        if self.keeps_history:
            # the end marker ends the reply, and the template writes it again
            reply = without_marker(
                self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip(), self.format.reply_marker
            )
            self._keep(message, reply, reply_ids)

    def replay(self, exchanges: list[tuple[str, str]]) -> None:
        """Keep earlier (request, reply) exchanges given as text, as a client of `serve` sends them."""
        if self.keeps_history:
            for message, reply in exchanges:
                ids = []  # only a `turns` history is kept as ids: a chat template renders the text again
                if isinstance(self.format, Turns):
                    # the reply keeps the space after the assistant marker, as training tokenizes it
                    ids = self.tokenizer(" " + reply.strip(), add_special_tokens=False).input_ids
                self._keep(message, reply.strip(), ids)

    def _keep(self, message: str, reply: str, reply_ids: list[int]) -> None:
        if not reply:  # an empty answer tells the model nothing, and no training row holds one
            return
        ids = []
        if isinstance(self.format, Turns):
            ids = self.format.prompt_ids(self.tokenizer, message) + reply_ids + [self.tokenizer.eos_token_id]
        self.exchanges.append((message, reply, ids))

    def reset(self) -> None:
        self.exchanges, self.dropped = [], 0
