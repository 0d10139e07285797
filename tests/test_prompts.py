"""Masking: labels are -100 exactly on prompt and padding, and every response's EOS is trained."""

import pytest

from lightning_falcon.data.prompts import (
    IGNORE_INDEX,
    encode_pair,
    encode_turns,
    pair_prompt_ids,
    render,
    split_turns,
    turn_prompt_ids,
)


def test_pair_masks_prompt_and_trains_response_and_eos(tokenizer):
    enc = encode_pair(tokenizer, "a fox", "red fox, misty forest --ar 16:9", "instruction", max_length=256)
    prompt_len = len(tokenizer(render("instruction", "a fox"), add_special_tokens=False)["input_ids"])
    response = tokenizer("red fox, misty forest --ar 16:9", add_special_tokens=False)["input_ids"]
    assert enc.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert enc.labels[prompt_len:] == response + [tokenizer.eos_token_id]
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    assert not enc.truncated


@pytest.mark.parametrize("template", ["guanaco", "falcon-instruct"])
def test_template_boundary_tokenizes_as_running_text(tokenizer, template):
    # The template's trailing space joins the response's first word, as in the running text.
    enc = encode_pair(tokenizer, "a fox", "Hello fox", template, max_length=256)
    running = tokenizer(render(template, "a fox") + "Hello fox", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == running + [tokenizer.eos_token_id]
    trained = [t for t, label in zip(enc.input_ids, enc.labels, strict=False) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == " Hello fox" + tokenizer.eos_token


def test_pair_truncation_is_reported_and_a_prompt_filling_max_length_is_dropped(tokenizer):
    enc = encode_pair(tokenizer, "a fox", "word " * 100, "instruction", max_length=40)
    assert enc.truncated and len(enc.input_ids) == 40
    assert enc.labels[-1] != IGNORE_INDEX  # the cut falls in the response, which still trains
    assert encode_pair(tokenizer, "long " * 50, "short", "instruction", max_length=10) is None


def test_turns_train_only_assistant_turns_each_ending_in_eos(tokenizer):
    text = "### Human: Hi there ### Assistant: Hello! ### Human: Bye ### Assistant: See you."
    assert [r for r, _ in split_turns(text, "### Human:", "### Assistant:")] == ["human", "assistant"] * 2
    enc = encode_turns(tokenizer, text, "### Human:", "### Assistant:", max_length=256)
    trained = [t for t, label in zip(enc.input_ids, enc.labels, strict=False) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == f" Hello!{tokenizer.eos_token} See you.{tokenizer.eos_token}"
    assert trained.count(tokenizer.eos_token_id) == 2


@pytest.mark.parametrize("template", ["instruction", "guanaco", "falcon-instruct", "plain"])
def test_generation_starts_from_exactly_the_prompt_training_conditions_on(tokenizer, template):
    enc = encode_pair(tokenizer, "a fox at dawn", "red fox", template, max_length=256)
    first_trained = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert pair_prompt_ids(tokenizer, "a fox at dawn", template) == enc.input_ids[:first_trained]


def test_a_turns_prompt_matches_the_first_turn_of_training(tokenizer):
    enc = encode_turns(tokenizer, "### Human: Hi there ### Assistant: Hello!", "### Human:", "### Assistant:", 256)
    first_trained = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert turn_prompt_ids(tokenizer, "Hi there", "### Human:", "### Assistant:") == enc.input_ids[:first_trained]
