"""Chat-shaped data (messages, ShareGPT, alpaca, prompt/response) rendered through one chat template.

Each assistant reply trains on its text after the template's generation prompt, through the template's end
marker, then an inserted EOS unless that marker is EOS itself: so a row's ids are what
`apply_chat_template(messages, tokenize=True)` gives, but for those inserted EOS. Everything here goes through a
real `PromptDataModule` on small JSONL files, with the tiny tokenizer (falcon-7b-instruct's template).
"""

import pytest
import torch
from helpers import TINY, prepared_datamodule, write_jsonl

from lightning_falcon import PromptDataModule
from lightning_falcon.data import chat_templates
from lightning_falcon.data.prompts import IGNORE_INDEX
from lightning_falcon.errors import ConfigError

# The `chat_template` of tiiuae/falcon-7b-instruct's tokenizer_config.json, as published (the reference).
OFFICIAL_FALCON_7B_INSTRUCT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = '' %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 %}{{ system_message.strip() }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '\\n\\nUser: ' + message['content'].strip().replace('\\r\\n', '\\n').replace('\\n\\n', '\\n') }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '\\n\\nAssistant: ' + message['content'].strip().replace('\\r\\n', '\\n').replace('\\n\\n', '\\n') }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)

# A template whose end-of-turn marker is EOS itself: nothing is inserted after a reply.
EOS_MARKED = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# A template that cannot render a system message.
NO_SYSTEM = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

EOS = "<|endoftext|>"
REPLIES = ["Hello friend", "Fine, thanks", "Goodbye now"]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": REPLIES[0]},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": REPLIES[1]},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": REPLIES[2]},
]


def sharegpt(messages: list[dict]) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def prepared(tmp_path, rows, stem="chat", **kwargs) -> PromptDataModule:
    """A prepared, set-up datamodule on `rows` written to `stem`.jsonl, validated on the same file (so every row
    trains)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / f"{stem}.jsonl", rows)
    kwargs.setdefault("dataset", {"dataset": path, "val_dataset": path})
    return prepared_datamodule(tmp_path, **kwargs)


def unprepared(tmp_path, rows, stem="chat", **kwargs) -> PromptDataModule:
    """The same datamodule, not yet prepared: nothing loaded or tokenized."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / f"{stem}.jsonl", rows)
    kwargs.setdefault("dataset", {"dataset": path, "val_dataset": path})
    return PromptDataModule(tokenizer=TINY, cache_dir=str(tmp_path / "cache"), **kwargs)


def chat_ids(tokenizer, messages, template: str | None = None, generation_prompt: bool = False) -> list[int]:
    """What a server's `apply_chat_template(messages, tokenize=True)` gives."""
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, add_generation_prompt=generation_prompt
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def trained_runs(tokenizer, row) -> list[str]:
    """Each contiguous run of trained tokens of a row, decoded; every trained label is its own token."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def prompt_text(tokenizer, row) -> str:
    """The row's text before its first trained token: what generation would start from."""
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    return tokenizer.decode(row["input_ids"][:first])


def data_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("[data]")]


# ----------------------------------------------------------------- rendering and trained tokens
@pytest.mark.parametrize(
    ("template", "before", "marker", "inserted"),
    [
        ("falcon-instruct", " ", "", True),  # no end marker of its own: EOS inserted
        ("chatml", "", "<|im_end|>", True),  # `<|im_end|>`, then EOS inserted
        ("eos.jinja", " ", EOS, False),  # the marker is EOS itself: nothing inserted
    ],
)
def test_each_reply_trains_through_its_end_marker_and_the_ids_are_the_templates(
    tmp_path, tokenizer, template, before, marker, inserted
):
    if template.endswith(".jinja"):
        (tmp_path / template).write_text(EOS_MARKED)
        template = str(tmp_path / template)
    dm = prepared(tmp_path, [{"messages": CONVERSATION}], chat_template=template)
    (row,) = dm._splits["train"]
    after = EOS if inserted else ""
    assert trained_runs(tokenizer, row) == [f"{before}{reply}{marker}{after}" for reply in REPLIES]
    # The template the adapter carries renders the same ids, as a server would, but for the inserted EOS.
    text = dm.prompt_format()["chat_template_text"]
    expected = chat_ids(tokenizer, CONVERSATION, text)
    eos = tokenizer.eos_token_id
    if inserted:
        assert row["input_ids"].count(eos) == len(REPLIES) and expected.count(eos) == 0
        assert [t for t in row["input_ids"] if t != eos] == expected
    else:
        assert row["input_ids"] == expected
        assert dm.prompt_format()["eos_after_reply"] is False
    if template == "falcon-instruct":  # the tokenizer's own template is the same
        assert [t for t in row["input_ids"] if t != eos] == chat_ids(tokenizer, CONVERSATION)
        assert tokenizer.decode(row["input_ids"]).startswith("Be brief.\n\nUser: Hi there\n\nAssistant: Hello friend")


def test_last_assistant_trains_only_the_last_reply(tmp_path, tokenizer):
    every = prepared(tmp_path / "all", [{"messages": CONVERSATION}])
    last = prepared(tmp_path / "last", [{"messages": CONVERSATION}], train_on="last_assistant")
    (row,), (every_row,) = last._splits["train"], every._splits["train"]
    assert trained_runs(tokenizer, row) == [f" {REPLIES[-1]}{EOS}"]
    assert row["input_ids"] == every_row["input_ids"]  # the earlier replies are context, laid out alike
    assert row["input"] == "Bye"  # the request the trained reply answers


def test_sharegpt_and_messages_forms_of_the_same_data_give_the_same_rows(tmp_path):
    conversations = [CONVERSATION, CONVERSATION[1:5]] + [
        [{"role": "user", "content": f"Tell me {i}"}, {"role": "assistant", "content": f"It is {i}"}] for i in range(6)
    ]
    # each held out as `val_fraction` says, from the same seed
    files = [
        write_jsonl(tmp_path / "openai.jsonl", [{"messages": c} for c in conversations]),
        write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": sharegpt(c)} for c in conversations]),
    ]
    messages, shared = (prepared_datamodule(tmp_path, dataset=path) for path in files)
    for split in ("train", "val"):
        for column in ("input_ids", "labels", "input"):
            assert shared._splits[split][column] == messages._splits[split][column]
    assert len(messages._splits["train"]) + len(messages._splits["val"]) == len(conversations)


def test_alpaca_keeps_the_input_and_an_empty_input_is_fine(tmp_path, tokenizer):
    rows = [
        {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"},
        {"instruction": "Name a primary colour", "input": "", "output": "Blue"},
    ]
    dm = prepared(tmp_path, rows, stem="alpaca")
    assert dm.stats["train"]["rows"] == 2 and dm.stats["train"]["skipped"] == {}
    prompts = sorted(prompt_text(tokenizer, row) for row in dm._splits["train"])
    # falcon-instruct's own rendering: the blank line between instruction and input closes up to a newline
    assert prompts == [
        "\n\nUser: Name a primary colour\n\nAssistant:",
        "\n\nUser: Translate to French\ngood morning\n\nAssistant:",
    ]
    assert sorted(trained_runs(tokenizer, row)[0] for row in dm._splits["train"]) == [f" Blue{EOS}", f" bonjour{EOS}"]


# ----------------------------------------------------------------- detection and bad rows
EXCHANGE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize(
    ("row", "kind", "columns"),
    [
        ({"messages": EXCHANGE}, "messages", "messages"),
        ({"conversations": sharegpt(EXCHANGE)}, "messages", "conversations"),
        ({"instruction": "Say hi", "input": "", "output": "Hi"}, "alpaca", "instruction, input, output"),
        ({"prompt": "Say hi", "response": "Hi"}, "prompt_response", "prompt, response"),
        ({"text": "### Human: Say hi ### Assistant: Hi"}, "turns", "text"),
    ],
)
def test_the_format_is_detected_from_the_columns_and_said(tmp_path, caplog, tokenizer, row, kind, columns):
    caplog.set_level("INFO")
    dm = prepared(tmp_path, [row, row], stem="mine")
    assert f"[data] mine: format {kind}, from its column(s) {columns} (set --data.dataset.format to choose)" in (
        data_lines(caplog)
    )
    (trained,) = {trained_runs(tokenizer, r)[0] for r in dm._splits["train"]}
    assert trained.strip() == f"{'Hello' if kind == 'messages' else 'Hi'}{EOS}"


def test_a_file_of_no_format_fails_with_one_line_listing_the_formats(tmp_path):
    dm = unprepared(tmp_path, [{"question": "a", "answer": "b"}] * 3, stem="odd")
    with pytest.raises(ConfigError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "\n" not in message and "has none of the columns of a format" in message
    assert "['question', 'answer']" in message and "Fix:" in message
    for listed in (
        "messages (messages or conversations)",
        "alpaca (instruction, input, output)",
        "prompt_response (prompt, response)",
        "turns (text)",
    ):
        assert listed in message


NO_REPLY = [{"role": "user", "content": "Anyone there?"}]
EMPTY_CONTENT = [{"role": "user", "content": "Say something"}, {"role": "assistant", "content": "  "}]
UNKNOWN_ROLE = [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Beep"}]
OUT_OF_ORDER = [{"role": "assistant", "content": "I go first"}, *EXCHANGE]


def test_unusable_rows_are_skipped_and_counted_by_reason(tmp_path, caplog):
    caplog.set_level("INFO")
    good = [[{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}] for i in range(10)]
    rows = [{"messages": m} for m in [good[0], NO_REPLY, EMPTY_CONTENT, *good[1:5], UNKNOWN_ROLE, OUT_OF_ORDER]]
    rows += [{"messages": m} for m in good[5:]]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    dm = prepared_datamodule(tmp_path, dataset=path)
    reasons = {"no assistant turn": 1, "an empty content": 1, "an unknown role": 1, "roles out of order": 1}
    assert dm.stats["train"]["skipped"] == reasons and dm.stats["val"]["skipped"] == {}
    assert dm.stats["train"]["rows"] + dm.stats["val"]["rows"] == 10
    (line,) = [line for line in data_lines(caplog) if line.startswith("[data] train:")]
    assert line.endswith(
        "4 skipped (1 an empty content, 1 an unknown role, 1 no assistant turn, 1 roles out of order)"
    ), line


def test_a_file_with_no_usable_row_fails_naming_the_line_and_a_fix(tmp_path):
    dm = unprepared(tmp_path, [{"messages": NO_REPLY}, {"messages": UNKNOWN_ROLE}], stem="broken")
    with pytest.raises(ConfigError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "\n" not in message
    assert "no row of dataset" in message and "(1 an unknown role, 1 no assistant turn)" in message
    assert "the first, line 1 of broken.jsonl, has no assistant turn" in message
    assert "Fix:" in message


# ----------------------------------------------------------------- a template that cannot render a system message
def test_a_template_without_system_messages_fails_before_any_weights(tmp_path):
    jinja = tmp_path / "nosystem.jinja"
    jinja.write_text(NO_SYSTEM)
    plain = [{"messages": EXCHANGE}] * 3
    # without a system message anywhere, the template is fine
    unprepared(tmp_path / "ok", plain, chat_template=str(jinja)).check_rendering()
    # data.system_prompt gives every row one: the check the CLI makes before loading weights fails
    dm = unprepared(tmp_path / "prompt", plain, chat_template=str(jinja), system_prompt="Be kind.")
    with pytest.raises(ConfigError, match="cannot render a system message") as error:
        dm.check_rendering()
    assert "\n" not in str(error.value) and "Fix:" in str(error.value)
    # rows with a system message of their own fail when the data is prepared
    own = [{"messages": [{"role": "system", "content": "Be kind."}, *EXCHANGE]}] * 3
    dm = unprepared(tmp_path / "rows", own, chat_template=str(jinja))
    with pytest.raises(ConfigError, match="cannot render a system message") as error:
        dm.prepare_data()
    assert "\n" not in str(error.value) and "Fix:" in str(error.value)


# ----------------------------------------------------------------- cutting at max_length
LONG = [
    {"role": "system", "content": "You are a patient tutor."},
    *[
        message
        for i, topic in enumerate(["rivers", "mountains", "deserts", "oceans"])
        for message in (
            {"role": "user", "content": f"Question {i}: tell me about {topic}."},
            {
                "role": "assistant",
                "content": f"Answer {i}: {topic} are a large and varied subject, and here is a long reply about them.",
            },
        )
    ],
]


def length(tokenizer, messages) -> int:
    """A conversation's ids as training lays them out: the template's, and an EOS after each reply."""
    return len(chat_ids(tokenizer, messages)) + sum(m["role"] == "assistant" for m in messages)


def test_a_long_conversation_drops_earlier_exchanges_first_then_cuts_the_last_reply(tmp_path, tokenizer, caplog):
    caplog.set_level("INFO")
    eos = tokenizer.eos_token_id
    last_two = [LONG[0], *LONG[-4:]]
    fits = length(tokenizer, last_two)
    assert fits < length(tokenizer, LONG)
    dm = prepared(tmp_path / "drop", [{"messages": LONG}], max_length=fits)
    (row,) = dm._splits["train"]
    assert dm.stats["train"] | {"skipped": {}} == {
        "rows": 1,
        "truncated": 0,
        "turns_dropped": 2,
        "rows_short": 1,
        "dropped": 0,
        "skipped": {},
    }
    # the system message stays; the two earliest exchanges go, whole
    assert [t for t in row["input_ids"] if t != eos] == chat_ids(tokenizer, last_two)
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("You are a patient tutor.\n\nUser: Question 2:") and "Question 1" not in text
    assert any(
        line.startswith(f"[data] train: 1 rows, 0 truncated to max_length={fits}, 2 earlier exchanges left out of 1")
        for line in data_lines(caplog)
    ), data_lines(caplog)

    # shorter than the system message and the last exchange: every earlier exchange goes, then the last reply is cut
    last = [LONG[0], *LONG[-2:]]
    short = length(tokenizer, last) - 5
    dm = prepared(tmp_path / "cut", [{"messages": LONG}], max_length=short)
    (row,) = dm._splits["train"]
    assert dm.stats["train"]["truncated"] == 1 and dm.stats["train"]["turns_dropped"] == 3
    assert len(row["input_ids"]) == short and eos not in row["input_ids"]
    assert row["input_ids"] == chat_ids(tokenizer, last)[:short]
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("You are a patient tutor.\n\nUser: Question 3:") and "Question 2" not in text
    (reply,) = trained_runs(tokenizer, row)
    assert reply.startswith(" Answer 3: oceans") and row["labels"][-1] != IGNORE_INDEX  # cut inside the reply
    assert f"1 truncated to max_length={short}, 3 earlier exchanges left out of 1 rows to fit" in "\n".join(
        data_lines(caplog)
    )


# ----------------------------------------------------------------- mixing with prompt/response, exact resume
def test_chat_and_prompt_response_sources_mix_and_resume_exactly_mid_epoch(tmp_path, tokenizer, caplog):
    caplog.set_level("INFO")
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Chat {i}, hello"},
                {"role": "assistant", "content": f"Hello {i}"},
                {"role": "user", "content": f"Chat {i}, bye"},
                {"role": "assistant", "content": f"Bye {i}"},
            ]
        }
        for i in range(20)
    ]
    pairs = [{"prompt": f"Pair question {i}", "response": f"Pair answer {i}"} for i in range(40)]
    sources = [
        {"name": "chat", "dataset": write_jsonl(tmp_path / "chats.jsonl", chats), "weight": 1},
        {"name": "pairs", "dataset": write_jsonl(tmp_path / "pairs.jsonl", pairs), "weight": 3},
    ]

    def loader():
        dm = prepared_datamodule(tmp_path, dataset=sources, batch_size=4, max_length=64)
        return dm, dm.train_dataloader()

    dm, first = loader()
    lines = data_lines(caplog)
    for expected in (
        "[data] chat: format messages, from its column(s) messages",
        "[data] pairs: format prompt_response, from its column(s) prompt, response",
        "[data] train chat: 18 rows",
        "[data] train pairs: 36 rows",
        "[data] mix chat: weight 1, 25.9% of an epoch's rows (14 of 54)",  # 13.5 rounded to a whole row
        "[data] mix pairs: weight 3, 74.1% of an epoch's rows (40 of 54)",
    ):
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    # a prompt/response row renders through the same chat template
    pair = dm._parts["train"][1][0]
    written = next(p for p in pairs if p["prompt"] == pair["input"])
    rendered = f"\n\nUser: {written['prompt']}\n\nAssistant: {written['response']}{EOS}"
    assert tokenizer.decode(pair["input_ids"]) == rendered

    first.sampler.set_epoch(1)
    order = list(first.sampler)
    chat_rows = len(dm._parts["train"][0])
    assert 0 < sum(i < chat_rows for i in order) < len(order)  # both sources are drawn
    whole = list(first)
    assert len(whole) == len(order) // 4 + bool(len(order) % 4)

    # a run stopped after 5 batches of epoch 1, restarted in a new process: a new datamodule and loader
    first.sampler.set_epoch(1)
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == 5:
            break
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 5}
    _, resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    rest = list(resumed)
    assert len(seen) + len(rest) == len(whole)
    for got, expected in zip(seen + rest, whole, strict=True):
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
    assert resumed.state_dict() == {"epoch": 1, "batches": len(whole)}


# ----------------------------------------------------------------- the named template
def test_falcon_instruct_is_the_official_falcon_7b_instruct_template(tokenizer):
    assert chat_templates.NAMED["falcon-instruct"] == OFFICIAL_FALCON_7B_INSTRUCT
    assert tokenizer.chat_template == OFFICIAL_FALCON_7B_INSTRUCT  # the tiny tokenizer carries it
    template = chat_templates.resolve_template("falcon-instruct", tokenizer)
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    expected = "SYS\n\nUser: a\n\nAssistant: b\n\nUser: c\n\nAssistant:"
    assert chat_templates.render(tokenizer, template, messages, generation_prompt=True) == expected
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_alpaca_rows_without_an_input_column_train(tmp_path):
    dm = prepared(tmp_path, [{"instruction": "Name a primary colour", "output": "Red"}] * 4)
    assert dm.stats["train"]["rows"] == 4 and not dm.stats["train"]["skipped"]


def test_a_messages_column_mixing_openai_and_sharegpt_items_reads_both(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"messages": [{"from": "human", "value": "Bye"}, {"role": "assistant", "content": "Goodbye"}]},
    ] * 2
    dm = prepared(tmp_path, rows)
    assert dm.stats["train"]["rows"] == 4 and not dm.stats["train"]["skipped"]


# ----------------------------------------------------------------- system prompts, caches, odd rows
def test_a_rows_own_system_message_wins_over_the_system_prompt(tmp_path, tokenizer):
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    dm = prepared(tmp_path, rows, system_prompt="Be kind.")
    texts = sorted(tokenizer.decode(r["input_ids"]) for r in dm._splits["train"])
    assert texts[0].startswith("Be brief.\n\nUser: Hi there") and "Be kind." not in texts[0]
    assert texts[1] == f"Be kind.\n\nUser: Hi there\n\nAssistant: {REPLIES[0]}{EOS}"
    # generation (predict's inputs, the samples, chat) renders a request with the system prompt too
    assert tokenizer.decode(dm.encode_input("Hello?")) == "Be kind.\n\nUser: Hello?\n\nAssistant:"


def test_an_empty_system_message_is_left_out_and_the_system_prompt_applies(tmp_path, tokenizer):
    messages = [{"from": "system", "value": ""}, *sharegpt(CONVERSATION[1:3])]
    dm = prepared(tmp_path, [{"conversations": messages}] * 2, system_prompt="Be kind.")
    assert not dm.stats["train"]["skipped"]
    assert tokenizer.decode(dm._splits["train"][0]["input_ids"]).startswith("Be kind.\n\nUser: Hi there")


@pytest.mark.parametrize(
    "setting", [{"chat_template": "chatml"}, {"system_prompt": "Be kind."}, {"train_on": "last_assistant"}]
)
def test_what_changes_the_rows_changes_the_cache(tmp_path, setting):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 4)
    plain = PromptDataModule(dataset=path, tokenizer=TINY, cache_dir=str(tmp_path / "cache"))
    changed = PromptDataModule(dataset=path, tokenizer=TINY, cache_dir=str(tmp_path / "cache"), **setting)
    assert plain.cache_paths != changed.cache_paths


def test_a_val_dataset_is_read_with_its_own_columns_and_must_hold_the_same_format(tmp_path, tokenizer):
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"instruction": "Translate", "input": "bonjour", "output": "hello"}] * 4
    )
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "Name a colour", "output": "Red"}] * 2)
    dm = prepared_datamodule(tmp_path, dataset={"dataset": train, "val_dataset": val})
    assert tokenizer.decode(dm._splits["train"][0]["input_ids"]).startswith("\n\nUser: Translate\nbonjour\n\n")
    assert tokenizer.decode(dm._splits["val"][0]["input_ids"]).startswith("\n\nUser: Name a colour\n\n")
    other = write_jsonl(tmp_path / "other.jsonl", [{"messages": CONVERSATION}] * 2)
    dm = PromptDataModule(
        dataset={"dataset": train, "val_dataset": other}, tokenizer=TINY, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(ConfigError, match=r"holds messages rows .* alpaca rows\. Fix: give --data.dataset.val_dataset"):
        dm.prepare_data()


def test_a_template_that_cannot_render_fails_in_one_line_before_any_weights(tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if %}")
    dm = unprepared(tmp_path, [{"messages": EXCHANGE}] * 3, chat_template=str(broken))
    with pytest.raises(ConfigError) as error:
        dm.check_rendering()
    assert "\n" not in str(error.value) and "cannot render a user/assistant exchange" in str(error.value)
    assert "Fix: choose another --data.chat_template" in str(error.value)


def test_alpaca_numbers_read_as_text(tmp_path, tokenizer):
    dm = prepared(tmp_path, [{"instruction": "What is 6 times 7?", "input": None, "output": 42}] * 2)
    assert not dm.stats["train"]["skipped"]
    assert tokenizer.decode(dm._splits["train"][0]["input_ids"]).endswith(f"Assistant: 42{EOS}")


def test_turns_text_without_an_assistant_turn_is_skipped_and_counted(tmp_path):
    rows = [{"text": "### Human: hi ### Assistant: hello"}] * 3 + [{"text": "just some prose"}]
    dm = prepared(tmp_path, rows)
    assert dm.stats["train"]["skipped"] == {"no assistant turn": 1}


def test_a_marker_the_tokenizer_lacks_ends_the_reply_but_is_not_part_of_it(tmp_path, tokenizer):
    from lightning_falcon.data.conversation import Conversation

    dm = prepared(tmp_path, [{"messages": CONVERSATION}] * 2, chat_template="chatml")
    assert dm.reply_marker == "<|im_end|>"  # several tokens in Falcon's vocabulary: EOS follows it
    conversation = Conversation(dm.format, tokenizer, 512)
    conversation.add("Hi", tokenizer("Hello<|im_end|>", add_special_tokens=False)["input_ids"])
    assert conversation.exchanges[0][1] == "Hello"  # the history does not hold it twice
    assert tokenizer.decode(conversation.prompt("Bye")).count("<|im_end|>") == 3  # system, request and reply
