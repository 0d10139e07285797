"""`python -m lightning_falcon chat --config X --ckpt_path CKPT|last|ADAPTER_DIR`: talk to a trained model.

One process, one device, the base and adapter loaded once. Each request is rendered as training rendered
the first source (its chat template, with `data.system_prompt` or `--system`, or its turn markers) and answered
with the `generation:` settings, ending at EOS. A `messages` or `turns` model reads the conversation so far, as
it was trained to; an alpaca or prompt/response model learned single requests, so it answers each on its own.

- On a terminal: the answer streams as it is generated. `/reset` starts a new conversation, `/exit` or
  Ctrl-D quits, and Ctrl-C stops an answer (which the conversation then does not keep).
- On a pipe: one request a line in, one answer a line out on stdout, so chat can be scripted. A newline
  inside an answer is written as `\\n` (and a backslash as `\\\\`); an empty line gets an empty answer.
  Every other message goes to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from lightning.pytorch.utilities import rank_zero_info
from transformers import TextStreamer

from lightning_falcon.commands.cli import SINGLE_DEVICE, FalconCLI, build
from lightning_falcon.data import PromptDataModule
from lightning_falcon.data.conversation import Conversation
from lightning_falcon.data.conversations import without_marker
from lightning_falcon.model import FalconQLoRA
from lightning_falcon.model.generation import Generated, generate

PROMPT = ">> "
COMMANDS_HELP = "/reset starts a new conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


class ChatCLI(FalconCLI):
    logs = False

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="A checkpoint, `last`, or an adapter directory; none: the base model",
        )
        parser.add_argument(
            "--history",
            type=bool,
            default=True,
            help="A `messages` or `turns` model reads the conversation so far; false answers each request on its own",
        )
        parser.add_argument(
            "--system",
            type=str | None,
            default=None,
            help="The system prompt of this chat, in place of data.system_prompt",
        )

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        if self.config.system is not None:  # the data module renders every request with it
            self.config.data.system_prompt = self.config.system


def main(args: list[str]) -> None:
    """Parse and check everything cheap, load the model once, then answer requests until the input ends."""
    cli = build(ChatCLI, [*args, *SINGLE_DEVICE], "chat", run=False, save_config_callback=None)  # writes nothing
    source = cli.one_device_source("chat")
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    load(cli)
    config = cli.config_init
    conversation = Conversation(
        datamodule.format, datamodule.tokenizer, datamodule.hparams.max_length, config["history"]
    )
    terminal = sys.stdin.isatty()
    rank_zero_info(f"[chat] {describe(model, datamodule, source, conversation)}")
    if terminal:
        rank_zero_info(f"[chat] {COMMANDS_HELP}")
    chat = Chat(model, datamodule.tokenizer, conversation, trainer)
    if terminal:
        chat.terminal(sys.stdout)
    else:
        chat.pipe(sys.stdin, sys.stdout)


def load(cli: ChatCLI) -> None:
    """The quantized base with LoRA on the strategy's device, as fit builds it, with the run's LoRA weights
    (`model.adapter`, which the CLI set from `--ckpt_path`)."""
    model, trainer = cli.model, cli.trainer
    model.trainer = trainer  # the strategy's device and precision, with no loop running
    model.prepare_data()
    with trainer.init_module(empty_init=False):
        model.configure_model()
    model.to(trainer.strategy.root_device)


def describe(model: FalconQLoRA, datamodule: PromptDataModule, source: Path | None, conversation) -> str:
    g = model.generation
    fmt = datamodule.prompt_format()
    rendering = f"chat template {fmt['chat_template']}" if "chat_template" in fmt else "the turn markers"
    if fmt.get("system_prompt"):
        rendering += f", system prompt {fmt['system_prompt']!r}"
    memory = "the conversation so far" if conversation.keeps_history else "each request on its own"
    weights = f"the base + {source}" if source is not None else "the base model, no adapter"
    return (
        f"{model.hparams.model_name_or_path}: {weights}; {fmt.get('rows', fmt['format'])} with {rendering}, "
        f"reading {memory}; "
        f"{g.decoding()}, at most {g.max_new_tokens} new tokens"
    )


class Chat:
    """Requests in, answers out: one loop for a terminal and one for a pipe, over the same `answer`."""

    def __init__(self, model: FalconQLoRA, tokenizer, conversation: Conversation, trainer) -> None:
        self.model, self.tokenizer, self.conversation, self.trainer = model, tokenizer, conversation, trainer

    def answer(self, message: str, stream: TextIO | None = None) -> Generated:
        """The reply to `message` given the conversation, streamed to `stream` when the settings allow it."""
        model = self.model
        dropped = self.conversation.dropped
        prompt = self.conversation.prompt(message)
        if self.conversation.dropped > dropped:
            rank_zero_info(
                f"[chat] the oldest exchanges no longer fit data.max_length: {self.conversation.dropped} dropped"
            )
        marker = self.conversation.format.reply_marker
        streams = stream is not None and model.generation.num_beams == 1
        streamer = Streamer(self.tokenizer, stream, marker) if streams else None
        with self.trainer.precision_plugin.forward_context():
            (reply,) = generate(
                model.model,
                self.tokenizer,
                [prompt],
                model.generation,
                1,
                device=model.device,
                streamer=streamer,
                marker=self.conversation.format.reply_marker,
            )
        if stream is not None and streamer is None:  # beam search: transformers streams no beams
            stream.write(reply.text + "\n")
            stream.flush()
        self.conversation.add(message, reply.ids)
        return reply

    def command(self, line: str) -> bool | None:
        """Run a `/` command: True to go on, False to quit, None when `line` is a request."""
        word = line.strip()
        if word == "/exit":
            return False
        if word == "/reset":
            self.conversation.reset()
            rank_zero_info(
                "[chat] new conversation"
                if self.conversation.keeps_history
                else "[chat] new conversation (each request is answered on its own anyway)"
            )
            return True
        return None

    def terminal(self, out: TextIO) -> None:
        import readline  # noqa: F401 (line editing and history for input())

        while True:
            try:
                line = input(PROMPT)
            except EOFError:  # Ctrl-D
                out.write("\n")
                return
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a new prompt, as a shell does
                out.write(f"\n({COMMANDS_HELP})\n")
                continue
            going = self.command(line)
            if going is False:
                return
            if going or not line.strip():
                continue
            try:
                self.answer(line, out)
            except KeyboardInterrupt:
                out.write("\n[stopped]\n")
            out.flush()

    def pipe(self, lines: TextIO, out: TextIO) -> None:
        for line in lines:
            request = line.rstrip("\n")
            going = self.command(request)
            if going is False:
                return
            if going:
                continue
            text = self.answer(request).text if request.strip() else ""
            out.write(one_line(text) + "\n")
            out.flush()  # a script reading answer by answer gets each as soon as it exists


def one_line(text: str) -> str:
    """An answer on one line: backslashes doubled, then newlines written as `\\n` (reversible)."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


class Streamer(TextStreamer):
    """transformers' text streamer, writing the reply to `out` as tokens arrive (not the prompt).

    The reply's leading spaces are dropped, as the final text drops them, and so is the end `marker` a reply stops
    with before its EOS (`reply_marker`): text that may be its start is held back until it is not.
    """

    def __init__(self, tokenizer, out: TextIO, marker: str = "") -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.marker, self.started, self.held, self.ended = out, marker, False, "", False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text, self.held = self.held + text, ""
        if self.marker and not self.ended:
            if self.marker in text:
                text, self.ended = without_marker(text, self.marker), True
            else:  # the longest end of the text that the marker starts with, and the spaces before it, wait
                keep = next((n for n in range(len(self.marker) - 1, 0, -1) if text.endswith(self.marker[:n])), 0)
                shown = text[: len(text) - keep].rstrip()
                text, self.held = shown, text[len(shown) :]
        elif self.ended:
            text = ""
        if stream_end:
            text, self.held = text + self.held + "\n", ""
        self.out.write(text)
        self.out.flush()
