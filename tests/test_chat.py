"""`chat`: requests rendered as training rendered them, answered as `generate` answers them, on a terminal
(a real pseudo-terminal, `pexpect`) and on a pipe; the conversation of a `turns` model."""

import contextlib
import io
import os
import signal
import sys

import pytest
from helpers import GUANACO, chat_format, tiny_arguments, tuned_tiny
from processes import run_process

from lightning_falcon.commands.chat import one_line
from lightning_falcon.data.conversation import Conversation
from lightning_falcon.data.formats import Turns
from lightning_falcon.data.prompts import IGNORE_INDEX, encode_turns, turn_prompt_ids
from lightning_falcon.model.generation import GenerationSettings, generate

HUMAN, ASSISTANT = "### Human:", "### Assistant:"
REQUESTS = ["Midjourney prompt for a fantasy village at night", "mj prompt: a lighthouse in a storm"]


def trained_starts(labels: list[int]) -> list[int]:
    """The positions where a trained (unmasked) run of labels begins: each reply's first token."""
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]


def test_a_conversation_reads_its_history_as_training_lays_out_turns(tokenizer):
    turns = Turns("text", HUMAN, ASSISTANT)
    conversation = Conversation(turns, tokenizer, max_length=512)
    first = conversation.prompt("hello there")
    assert first == turn_prompt_ids(tokenizer, "hello there", HUMAN, ASSISTANT)
    conversation.add("hello there", tokenizer(" hi, friend", add_special_tokens=False)["input_ids"])
    second = conversation.prompt("how are you")
    # The same conversation as a training row: the prompt is everything before the second reply.
    row = encode_turns(
        tokenizer,
        f"{HUMAN} hello there {ASSISTANT} hi, friend{HUMAN} how are you {ASSISTANT} fine",
        HUMAN,
        ASSISTANT,
        512,
    )
    assert second == row.input_ids[: trained_starts(row.labels)[1]]
    assert row.input_ids[len(first) + len(tokenizer(" hi, friend")["input_ids"])] == tokenizer.eos_token_id

    conversation.reset()
    assert conversation.prompt("how are you") == turn_prompt_ids(tokenizer, "how are you", HUMAN, ASSISTANT)


def test_a_conversation_drops_its_oldest_exchanges_to_fit_max_length(tokenizer):
    request = turn_prompt_ids(tokenizer, "how are you", HUMAN, ASSISTANT)
    conversation = Conversation(Turns("text", HUMAN, ASSISTANT), tokenizer, max_length=len(request) + 20)
    conversation.add("one", list(range(100, 110)))
    conversation.add("two", list(range(200, 205)))
    prompt = conversation.prompt("how are you")
    assert conversation.dropped == 1  # the first exchange no longer fits; the second still does
    assert prompt[: len(prompt) - len(request)] == [
        *turn_prompt_ids(tokenizer, "two", HUMAN, ASSISTANT), *range(200, 205), tokenizer.eos_token_id
    ]  # fmt: skip
    assert len(prompt) <= len(request) + 20


def test_a_messages_conversation_reads_its_history_through_the_chat_template(tokenizer):
    from lightning_falcon.data.conversations import encode

    chat = chat_format(tokenizer, "tokenizer", "messages", system="Be brief.")
    conversation = Conversation(chat, tokenizer, max_length=512)
    conversation.add("hello there", tokenizer(" hi, friend", add_special_tokens=False)["input_ids"])
    second = conversation.prompt("how are you")
    assert tokenizer.decode(second) == (
        "Be brief.\n\nUser: hello there\n\nAssistant: hi, friend<|endoftext|>\n\nUser: how are you\n\nAssistant:"
    )
    # The same conversation as a training row: the prompt is everything before the second reply.
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi, friend"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine"},
    ]
    (row,) = encode(tokenizer, chat.rendering, [messages], 512)
    assert second == row.input_ids[: trained_starts(row.labels)[1]]


@pytest.mark.parametrize("format, history", [("prompt_response", True), ("alpaca", True), ("turns", False)])
def test_single_prompt_models_and_history_false_answer_each_request_on_its_own(tokenizer, format, history):
    format = Turns("text", HUMAN, ASSISTANT) if format == "turns" else chat_format(tokenizer, kind=format)
    conversation = Conversation(format, tokenizer, max_length=512, history=history)
    conversation.add("one", [100, 101])
    assert not conversation.keeps_history
    assert conversation.prompt("two") == format.prompt_ids(tokenizer, "two")


@pytest.mark.parametrize(
    "marker, pieces, shown",
    [
        ("<|im_end|>", ["Hel", "lo <|im", "_end|>", ""], "Hello\n"),  # the marker, split across pieces, is not shown
        ("<|im_end|>", ["a <", "b", ""], "a <b\n"),  # what only looked like its start is shown once it is not
        ("", ["  Hi", " there", ""], "Hi there\n"),  # no marker: the leading spaces alone go
    ],
)
def test_a_streamed_answer_leaves_out_the_end_marker(tokenizer, marker, pieces, shown):
    from lightning_falcon.commands.chat import Streamer

    out = io.StringIO()
    streamer = Streamer(tokenizer, out, marker)
    for i, piece in enumerate(pieces):
        streamer.on_finalized_text(piece, stream_end=i == len(pieces) - 1)
    assert out.getvalue() == shown


def test_an_answer_on_one_line_is_reversible():
    text = 'a\nb\\n "c"\r\n'
    line = one_line(text)
    assert "\n" not in line and "\r" not in line
    unescaped = line.replace("\\\\", "\0").replace("\\n", "\n").replace("\\r", "\r").replace("\0", "\\")
    assert unescaped == text


def run_chat(monkeypatch, capsys, stdin: io.StringIO, root, *args: str, config: str = "tiny.yaml") -> list[str]:
    """`chat --config configs/CONFIG ARGS` in this process, reading `stdin`: the lines of its stdout."""
    from lightning_falcon.commands.main import main

    monkeypatch.setattr(sys, "stdin", stdin)
    main(tiny_arguments(root, "chat", *args, config=config))
    return capsys.readouterr().out.splitlines()


def test_chat_on_a_pipe_answers_a_line_for_each_line_as_generate_does(
    quick_fit, tmp_path, tokenizer, monkeypatch, capsys
):
    lines = [REQUESTS[0], "", REQUESTS[1], "/exit", "never read"]
    out = run_chat(
        monkeypatch, capsys, io.StringIO("\n".join(lines) + "\n"), tmp_path,
        "--ckpt_path", str(quick_fit / "adapter"), "--generation.max_new_tokens", "24",
    )  # fmt: skip
    model = tuned_tiny(quick_fit / "adapter")
    prompts = [chat_format(tokenizer).prompt_ids(tokenizer, text) for text in REQUESTS]
    expected = [one_line(g.text) for g in generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=24), 1)]
    assert all(expected)
    assert out == [expected[0], "", expected[1]]  # stdout holds the answers alone; /exit ends before the last


def chat_on_a_pipe_with_a_system_prompt(run, root, tokenizer, monkeypatch, capsys, caplog) -> list[str]:
    """`chat --system` on a pipe with the tiny model trained on configs/tiny-chat.yaml (`run`), two requests:
    checks the answers are generate's on the template's ids and the [chat] line; returns the prompts, decoded."""
    from lightning_falcon.commands import chat as command

    caplog.set_level("INFO")
    prompts, real = [], command.generate
    monkeypatch.setattr(command, "generate", lambda m, t, p, *a, **k: prompts.extend(p) or real(m, t, p, *a, **k))
    out = run_chat(
        monkeypatch, capsys, io.StringIO("\n".join(CHAT_REQUESTS) + "\n"), root,
        "--ckpt_path", str(run / "adapter"), "--system", "Answer in one word.",
        "--generation.max_new_tokens", "12", config="tiny-chat.yaml",
    )  # fmt: skip
    model = tuned_tiny(run / "adapter")
    chat = chat_format(tokenizer, "tokenizer", "messages", system="Answer in one word.")
    settings = GenerationSettings(max_new_tokens=12)
    (first,) = generate(model, tokenizer, [chat.prompt_ids(tokenizer, CHAT_REQUESTS[0])], settings, 1)
    history = [(CHAT_REQUESTS[0], first.text)] if first.text else []
    (second,) = generate(model, tokenizer, [chat.prompt_ids(tokenizer, CHAT_REQUESTS[1], history)], settings, 1)
    assert out == [one_line(first.text), one_line(second.text)]
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[chat] ")]
    assert "messages with chat template tokenizer, system prompt 'Answer in one word.'" in line
    return [tokenizer.decode(p) for p in prompts]


CHAT_REQUESTS = ["What is the capital of Italy?", "And of Spain?"]


def test_chat_on_a_pipe_with_a_system_prompt_renders_through_the_chat_template(
    chat_fit, tmp_path, tokenizer, monkeypatch, capsys, caplog
):
    prompts = chat_on_a_pipe_with_a_system_prompt(chat_fit, tmp_path, tokenizer, monkeypatch, capsys, caplog)
    assert prompts[0] == "Answer in one word.\n\nUser: What is the capital of Italy?\n\nAssistant:"


def test_chat_with_a_turns_model_reads_the_conversation_until_reset(tmp_path, tokenizer, tiny_nf4, monkeypatch, capsys):
    messages = ["tell me a story", "and then?"]
    out = run_chat(
        monkeypatch, capsys, io.StringIO(f"{messages[0]}\n{messages[1]}\n/reset\n{messages[0]}\n"), tmp_path,
        "--data.dataset.dataset", GUANACO, "--data.dataset.format", "turns", "--data.max_length", "256",
        "--generation.max_new_tokens", "12",
    )  # fmt: skip
    # The base alone (no --ckpt_path): a new LoRA adds exact zeros, so the plain 4-bit model answers the same.
    settings, eos = GenerationSettings(max_new_tokens=12), tokenizer.eos_token_id
    first_prompt = turn_prompt_ids(tokenizer, messages[0], HUMAN, ASSISTANT)
    (first,) = generate(tiny_nf4, tokenizer, [first_prompt], settings, 1)
    second_prompt = [*first_prompt, *first.ids, eos, *turn_prompt_ids(tokenizer, messages[1], HUMAN, ASSISTANT)]
    (second,) = generate(tiny_nf4, tokenizer, [second_prompt], settings, 1)
    assert first.text and second.text
    assert out == [one_line(first.text), one_line(second.text), one_line(first.text)]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_ctrl_c_stops_an_answer_which_the_conversation_then_forgets(tmp_path, monkeypatch, capsys):
    from lightning_falcon.commands import chat

    writes = []
    real = chat.Streamer.on_finalized_text

    def interrupted_once(self, text, stream_end=False):
        writes.append(text)
        if len(writes) == 3:  # the first answer, mid-stream: what Ctrl-C raises in the main thread
            raise KeyboardInterrupt
        real(self, text, stream_end)

    monkeypatch.setattr(chat.Streamer, "on_finalized_text", interrupted_once)
    kept = []
    monkeypatch.setattr(chat.Conversation, "add", lambda self, message, ids: kept.append(message))
    out = run_chat(
        monkeypatch, capsys, Terminal("first\nsecond\n"), tmp_path,
        "--data.dataset.dataset", GUANACO, "--data.dataset.format", "turns", "--generation.max_new_tokens", "12",
    )  # fmt: skip
    assert "[stopped]" in out
    assert kept == ["second"]  # the stopped answer is not part of the conversation
    assert len(writes) > 4  # the second answer streamed in several writes


# --------------------------------------------------------------------------- the slow tier: real processes


def chat_command(root, *args: str, config: str = "tiny.yaml") -> list[str]:
    return [sys.executable, "-m", "lightning_falcon", *tiny_arguments(root, "chat", *args, config=config)]


def offline_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@contextlib.contextmanager
def on_a_terminal(command: list[str], cwd):
    """`command` on a pseudo-terminal of its own (pexpect), with Ctrl-C delivered as a user's terminal delivers it,
    and killed when the test ends, however it ends: a chat left streaming an answer runs on for hours.

    A signal ignored is inherited through fork and exec, and a shell without job control starts a background
    command (`.ci/run > log &`) with SIGINT ignored; Python then never raises KeyboardInterrupt, and Ctrl-C would
    do nothing. The child restores SIGINT's default before exec, so Python installs its handler.
    """
    import pexpect

    child = pexpect.spawn(
        command[0], command[1:], cwd=str(cwd), env=offline_env(), encoding="utf-8", timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        yield child
    finally:
        child.close(force=True)  # nothing left to do once it has ended; else SIGHUP, SIGINT, then SIGKILL


@pytest.mark.slow
def test_chat_through_a_pipe_with_the_trained_model(fitted, tokenizer):
    root, run, _ = fitted
    proc = run_process(
        chat_command(root, "--ckpt_path", "last"), input="\n".join(REQUESTS) + "\n", cwd=root, env=offline_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = tuned_tiny(run / "adapter")  # last.ckpt holds the adapter's weights: the run ends with both
    prompts = [chat_format(tokenizer).prompt_ids(tokenizer, text) for text in REQUESTS]
    expected = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=128), 1)
    assert all(g.stopped_at_eos for g in expected)  # the trained model ends its answers itself
    assert proc.stdout.splitlines() == [one_line(g.text) for g in expected]
    assert "[chat]" in proc.stderr and "[chat]" not in proc.stdout


@pytest.mark.slow
def test_chat_on_a_terminal_streams_and_takes_reset_exit_and_ctrl_d(fitted, tokenizer):
    import pexpect

    root, run, _ = fitted
    (expected,) = generate(
        tuned_tiny(run / "adapter"),
        tokenizer,
        [chat_format(tokenizer).prompt_ids(tokenizer, REQUESTS[0])],
        GenerationSettings(max_new_tokens=128),
        1,
    )
    command = chat_command(root, "--ckpt_path", str(run / "adapter"))
    with on_a_terminal(command, root) as child:
        child.expect_exact(">> ")
        child.sendline(REQUESTS[0])
        child.expect_exact(expected.text)
        child.expect_exact(">> ")
        child.sendline("/reset")
        child.expect_exact("[chat] new conversation")
        child.expect_exact(">> ")
        child.sendintr()  # Ctrl-C at the prompt: a new prompt, not the end
        child.expect_exact("/exit or Ctrl-D quits")
        child.expect_exact(">> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0

    with on_a_terminal(command, root) as child:
        child.expect_exact(">> ")
        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


@pytest.mark.slow
def test_chat_on_a_pipe_reads_its_history_through_the_template(
    chat_trained, tmp_path, tokenizer, monkeypatch, capsys, caplog
):
    prompts = chat_on_a_pipe_with_a_system_prompt(chat_trained, tmp_path, tokenizer, monkeypatch, capsys, caplog)
    reply = prompts[1].split("Assistant: ", 1)[1].split("<|endoftext|>", 1)[0]
    assert reply.strip()  # the trained model answers in words, which the second request's history holds
    assert prompts[1] == (
        "Answer in one word.\n\nUser: What is the capital of Italy?\n\nAssistant: "
        f"{reply}<|endoftext|>\n\nUser: And of Spain?\n\nAssistant:"
    )


@pytest.mark.slow
def test_chat_on_a_terminal_streams_the_chat_models_answer_to_its_system_prompt(chat_trained, tmp_path, tokenizer):
    import pexpect

    system, request = "Answer in one word.", "What is the capital of Italy?"
    chat = chat_format(tokenizer, "tokenizer", "messages", system=system)
    settings = GenerationSettings(max_new_tokens=24)
    model = tuned_tiny(chat_trained / "adapter")
    (expected,) = generate(model, tokenizer, [chat.prompt_ids(tokenizer, request)], settings, 1)
    assert expected.text
    command = chat_command(
        tmp_path, "--ckpt_path", str(chat_trained / "adapter"), "--system", system, "--generation.max_new_tokens", "24",
        config="tiny-chat.yaml",
    )  # fmt: skip
    with on_a_terminal(command, tmp_path) as child:
        child.expect_exact(f"system prompt {system!r}")
        child.expect_exact(">> ")
        child.sendline(request)
        child.expect_exact(expected.text.splitlines()[0])  # a terminal writes a newline as \r\n
        child.expect_exact(">> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_c_on_a_terminal_stops_a_streaming_answer(tmp_path):
    """The untrained base never reaches EOS on this request (greedy, deterministic), so an answer of 100,000
    tokens is still streaming when Ctrl-C arrives: text on the screen before the end is the streaming."""
    import pexpect

    command = chat_command(tmp_path, "--generation.max_new_tokens", "100000")
    with on_a_terminal(command, tmp_path) as child:
        child.expect_exact(">> ")
        child.sendline("tell me a long story")
        child.expect(r"tell me a long story\r\n\S+")  # the echo, then the first streamed text
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(">> ")
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
