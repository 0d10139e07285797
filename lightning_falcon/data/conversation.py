"""A chat's token ids so far, rendered as training renders a conversation.

In the `turns` format a conversation is the human turns and the assistant's replies in a row, each reply
ending with EOS, which is how `encode_turns` lays out the training data: the model reads its history as
it learned to. A `prompt_response` model learned single prompts, so each request is answered on its own.
"""

from __future__ import annotations

from lightning_falcon.data.formats import DataFormat, Turns


class Conversation:
    """The requests and replies so far, as the token ids the next reply is generated from.

    Args:
        format: The data format the model was trained on; only `turns` keeps a history.
        tokenizer: The training tokenizer.
        max_length: The longest prompt kept: the oldest exchanges are dropped to fit (training's `data.max_length`).
        history: False answers every request on its own, in any format.
    """

    def __init__(self, format: DataFormat, tokenizer, max_length: int, history: bool = True) -> None:
        self.format, self.tokenizer, self.max_length = format, tokenizer, max_length
        self.keeps_history = history and isinstance(format, Turns)
        self.exchanges: list[list[int]] = []  # each: the request's prompt ids, the reply's ids and EOS
        self.dropped = 0  # exchanges dropped to fit max_length since the last reset

    def prompt(self, message: str) -> list[int]:
        """The ids to generate the reply to `message` from: the history that fits, then the request."""
        request = self.format.prompt_ids(self.tokenizer, message)
        while self.exchanges and sum(map(len, self.exchanges)) + len(request) > self.max_length:
            self.exchanges.pop(0)
            self.dropped += 1
        return [token for exchange in self.exchanges for token in exchange] + request

    def add(self, message: str, reply_ids: list[int]) -> None:
        """Keep an answered request (when the format has a history); `reply_ids` without the EOS."""
        if self.keeps_history:
            request = self.format.prompt_ids(self.tokenizer, message)
            self.exchanges.append([*request, *reply_ids, self.tokenizer.eos_token_id])

    def reset(self) -> None:
        self.exchanges, self.dropped = [], 0
