"""Masking: labels are -100 exactly on prompt and padding, and every response's EOS is trained."""

import functools

import pytest
from helpers import MIDJOURNEY, TINY

from lightning_falcon import PromptDataModule
from lightning_falcon.data import conversations
from lightning_falcon.data.chat_templates import NAMED, render
from lightning_falcon.data.prompts import IGNORE_INDEX, encode_turns, split_turns, turn_prompt_ids

# The string templates prompt/response rows were rendered through before chat templates: each chat template of the
# same name gives a one-exchange conversation exactly these ids (so a tiny run trains on the batches it did).
OLD_TEMPLATES = {
    "instruction": "### Instruction:\n{prompt}\n\n### Response:\n",
    "guanaco": "### Human: {prompt} ### Assistant: ",
    "plain": "{prompt}\n",
}


@functools.cache
def rendering(template: str) -> conversations.Rendering:
    """`data.chat_template` `template` as a run on the tiny tokenizer renders with it (the EOS after each reply)."""
    return PromptDataModule(dataset=MIDJOURNEY, tokenizer=TINY, chat_template=template).rendering


def exchange(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def encode_one(tokenizer, prompt: str, response: str, template: str, max_length: int = 256):
    """A prompt/response row, as training encodes it through the chat template `template`."""
    (enc,) = conversations.encode(tokenizer, rendering(template), [exchange(prompt, response)], max_length)
    return enc


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", list(OLD_TEMPLATES))
def test_one_exchange_masks_the_prompt_and_trains_the_response_and_eos(tokenizer, template):
    response = "red fox, misty forest --ar 16:9"
    enc = encode_one(tokenizer, "a fox", response, template)
    # as the string template laid it out: its text but a trailing space, then that space and the response
    text = OLD_TEMPLATES[template].format(prompt="a fox")
    prompt_ids = ids(tokenizer, text.rstrip(" "))
    response_ids = ids(tokenizer, text[len(text.rstrip(" ")) :] + response) + [tokenizer.eos_token_id]
    assert enc.input_ids == prompt_ids + response_ids
    assert enc.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    assert not enc.truncated and enc.dropped_turns == 0 and enc.input == "a fox"


@pytest.mark.parametrize("template", ["guanaco", "falcon-instruct"])
def test_template_boundary_tokenizes_as_running_text(tokenizer, template):
    # The space after the assistant's role name joins the response's first word, as in the running text.
    enc = encode_one(tokenizer, "a fox", "Hello fox", template)
    messages = exchange("a fox", "Hello fox")
    running = ids(tokenizer, render(tokenizer, rendering(template).template, messages))
    assert enc.input_ids == running + [tokenizer.eos_token_id]
    trained = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == " Hello fox" + tokenizer.eos_token


def test_truncation_is_reported_and_a_prompt_filling_max_length_is_dropped(tokenizer):
    enc = encode_one(tokenizer, "a fox", "word " * 100, "instruction", max_length=40)
    assert enc.truncated and len(enc.input_ids) == 40
    assert enc.labels[-1] != IGNORE_INDEX  # the cut falls in the response, which still trains
    assert encode_one(tokenizer, "long " * 50, "short", "instruction", max_length=10) is None


def test_turns_train_only_assistant_turns_each_ending_in_eos(tokenizer):
    text = "### Human: Hi there ### Assistant: Hello! ### Human: Bye ### Assistant: See you."
    assert [r for r, _ in split_turns(text, "### Human:", "### Assistant:")] == ["human", "assistant"] * 2
    enc = encode_turns(tokenizer, text, "### Human:", "### Assistant:", max_length=256)
    trained = [t for t, label in zip(enc.input_ids, enc.labels, strict=False) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == f" Hello!{tokenizer.eos_token} See you.{tokenizer.eos_token}"
    assert trained.count(tokenizer.eos_token_id) == 2


@pytest.mark.parametrize("template", sorted(NAMED))
def test_generation_starts_from_exactly_the_prompt_training_conditions_on(tokenizer, template):
    enc = encode_one(tokenizer, "a fox at dawn", "red fox", template)
    first_trained = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    request = exchange("a fox at dawn", "red fox")[:1]
    assert conversations.prompt_ids(tokenizer, rendering(template), request) == enc.input_ids[:first_trained]


def test_a_turns_prompt_matches_the_first_turn_of_training(tokenizer):
    enc = encode_turns(tokenizer, "### Human: Hi there ### Assistant: Hello!", "### Human:", "### Assistant:", 256)
    first_trained = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert turn_prompt_ids(tokenizer, "Hi there", "### Human:", "### Assistant:") == enc.input_ids[:first_trained]
