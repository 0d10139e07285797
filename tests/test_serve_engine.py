"""`serve`'s parts without a server: per-row sampling, stop texts, and how a request's messages are rendered."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, chat_format
from transformers import AutoTokenizer, TopPLogitsWarper

from lightning_falcon.data.formats import Turns
from lightning_falcon.serving.app import Served, chat_prompt
from lightning_falcon.serving.engine import Choice, Job, RowSampling, RowStreamer, Sampling, held_back
from lightning_falcon.serving.openai import APIError, Message


def test_row_sampling_keeps_the_best_token_of_a_greedy_row_and_each_rows_own_top_p():
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    out = RowSampling([0.0, 0.7, 1.0], [1.0, 0.9, 0.5], torch.device("cpu"))(None, scores.clone())
    # greedy: only the most likely token is left
    assert torch.isfinite(out[0]).sum() == 1 and out[0].argmax() == scores[0].argmax()
    # sampled: transformers' own warpers, one row at a time
    for row, (temperature, top_p) in ((1, (0.7, 0.9)), (2, (1.0, 0.5))):
        expected = TopPLogitsWarper(top_p)(None, scores[row : row + 1] / temperature)
        assert torch.equal(out[row : row + 1], expected)


def test_held_back_text_waits_for_what_may_start_a_stop_or_end_a_character():
    assert held_back("a cat ##", ("###",)) == 3  # " ##" may be the stop's start, and the space goes with it
    assert held_back("a cat #", ("###", "cat #!")) == 6  # the longer stop's start, " cat #", is held
    assert held_back("a cat", ("###",)) == 0
    assert held_back("a cat\n", ("###",)) == held_back("a cat ", ()) == 1  # a cut would drop it
    assert held_back("caf\ufffd", ()) == 1  # a character whose bytes the next token completes


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


class Loop:
    """What `Job.send` needs of an asyncio loop: events are collected as they are sent."""

    def __init__(self) -> None:
        self.sent = []

    def call_soon_threadsafe(self, put, event) -> None:
        self.sent.append(event)


def test_the_streamer_cuts_at_a_stop_text_and_never_sends_its_start(tokenizer):
    from lightning_falcon.serving.engine import Row

    loop = Loop()
    job = Job([[1]], 1, None, Sampling(max_tokens=50, stop=("###",)), loop)
    ids = tokenizer("a quiet harbour\n### and more", add_special_tokens=False).input_ids
    streamer = RowStreamer(tokenizer, [Row(job, job.choices[0], ("###",))], [tokenizer.eos_token_id])
    streamer.put(torch.tensor([[1]]))  # the prompt
    for token in ids:
        streamer.put(torch.tensor([token]))
    choice: Choice = job.choices[0]
    assert choice.text == "a quiet harbour" and choice.finish_reason == "stop"
    assert "".join(e.text for e in loop.sent) == "a quiet harbour"
    assert not any("#" in e.text for e in loop.sent)
    assert len(loop.sent) > 2  # streamed in pieces


def served(tokenizer, format) -> Served:
    return Served({"base": None}, "base", format, tokenizer, 128, Sampling(16), 8)


def messages(*pairs) -> list[Message]:
    return [Message(role=role, content=content) for role, content in pairs]


def test_a_conversation_renders_as_the_training_template_does(tokenizer):
    fmt = chat_format(tokenizer, kind="messages", system="Be brief.")
    asked = messages(("user", "a cat"), ("assistant", "a cat on a mat"), ("user", "a dog"))
    expected = fmt.prompt_ids(tokenizer, "a dog", [("a cat", "a cat on a mat")])
    assert chat_prompt(served(tokenizer, fmt), asked) == expected
    # a system message of the request's own replaces the run's
    own = chat_prompt(served(tokenizer, fmt), messages(("system", "Be long."), ("user", "a dog")))
    assert tokenizer.decode(own).count("Be long.") == 1 and "Be brief." not in tokenizer.decode(own)


@pytest.mark.parametrize(
    ("pairs", "says"),
    [
        ((("user", "a"), ("user", "b")), "user and assistant turns in turn"),
        ((("user", "a"), ("assistant", "b")), "ending with the user's"),
        ((("user", "a"), ("system", "b"), ("user", "c")), "user and assistant turns in turn"),
    ],
)
def test_a_conversation_out_of_order_is_refused(tokenizer, pairs, says):
    with pytest.raises(APIError, match=says) as e:
        chat_prompt(served(tokenizer, chat_format(tokenizer, kind="messages")), messages(*pairs))
    assert e.value.status == 400


def test_a_system_message_to_a_model_trained_without_one_is_refused(tokenizer):
    turns = Turns("text", "### Human:", "### Assistant:")
    with pytest.raises(APIError, match="with no system prompt"):
        chat_prompt(served(tokenizer, turns), messages(("system", "x"), ("user", "a")))
