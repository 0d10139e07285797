"""Chat templates: the Jinja text that renders a conversation, chosen by `data.chat_template`.

Every chat-shaped row (`messages`, ShareGPT, alpaca, prompt/response) is rendered through one template with
`tokenizer.apply_chat_template`, so training, `chat`, `predict`, and any server that renders with the same
template (HF pipelines, vLLM, TGI, llama.cpp) agree token for token. The template travels with the adapter,
the merged export and the GGUF.

`data.chat_template` is `auto` (the tokenizer's own template where it has one, else the model family's default
from `lightning_falcon/architectures.py`: `instruction` for Falcon's base models),
`tokenizer` (the tokenizer's own, which must exist), a name of `NAMED`, or a path to a `.jinja` file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError

from lightning_falcon.architectures import ARCHITECTURES
from lightning_falcon.assets import resolve
from lightning_falcon.errors import ConfigError

# Exactly the `chat_template` of tiiuae/falcon-7b-instruct's tokenizer: an optional system text, then `User:`
# and `Assistant:` turns after blank lines, each content stripped and its blank lines closed up.
FALCON_INSTRUCT = (
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

# Falcon-180B-chat's layout, as its model card gives it: `System:`, `User:` and `Falcon:` lines.
FALCON_180B_CHAT = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' }}{% elif message['role'] == 'user' %}{{ 'User: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Falcon: ' }}{% endif %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' + 'Falcon:' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# Exactly the `chat_template` of tiiuae/Falcon3-7B-Instruct's tokenizer (all Falcon3 Instruct sizes share it).
FALCON3_INSTRUCT = (
    "{%- if tools %}\n"
    "{{- '<|system|>\\n' }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "{{- messages[0]['content'] }}\n"
    "{%- set remaining_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "{%- set remaining_messages = messages %}\n"
    "{%- endif %}\n"
    "{{- 'You are a Falcon assistant skilled in function calling. You are helpful, respectful, and"
    " concise.\\n\\n# Tools\\n\\nYou have access to the following functions. You MUST use them to answer"
    " questions when needed. For each function call, you MUST return a JSON object inside"
    " <tool_call></tool_call> tags.\\n\\n<tools>' + tools|tojson(indent=2) + '</tools>\\n\\n# Output"
    " Format\\n\\nYour response MUST follow this format when making function calls:\\n<tool_call>\\n[\\n "
    ' {"name": "function_name", "arguments": {"arg1": "value1", "arg2": "value2"}},\\n  {"name":'
    ' "another_function", "arguments": {"arg": "value"}}\\n]\\n</tool_call>\\nIf no function calls are'
    " needed, respond normally without the tool_call tags.\\n' }}\n"
    "{%- for message in remaining_messages %}\n"
    "{%- if message['role'] == 'user' %}\n"
    "{{- '<|user|>\\n' + message['content'] + '\\n' }}\n"
    "{%- elif message['role'] == 'assistant' %}\n"
    "{%- if message.content %}\n"
    "{{- '<|assistant|>\\n' + message['content'] }}\n"
    "{%- endif %}\n"
    "{%- if message.tool_calls %}\n"
    "{{- '\\n<tool_call>\\n' }}\n"
    "{{- message.tool_calls|tojson(indent=2) }}\n"
    "{{- '\\n</tool_call>' }}\n"
    "{%- endif %}\n"
    "{{- eos_token + '\\n' }}\n"
    "{%- elif message['role'] == 'tool' %}\n"
    "{{- '<|assistant|>\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{{- '<|assistant|>\\n' if add_generation_prompt }}\n"
    "{%- else %}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] == 'system' %}\n"
    "{{- '<|system|>\\n' + message['content'] + '\\n' }}\n"
    "{%- elif message['role'] == 'user' %}\n"
    "{{- '<|user|>\\n' + message['content'] + '\\n' }}\n"
    "{%- elif message['role'] == 'assistant' %}\n"
    "{%- if not loop.last %}\n"
    "{{- '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|assistant|>\\n' + message['content'] + eos_token }}\n"
    "{%- endif %}\n"
    "{%- endif %}\n"
    "{%- if loop.last and add_generation_prompt %}\n"
    "{{- '<|assistant|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- endif %}"
)

# Exactly the `chat_template` of tiiuae/Falcon-H1-7B-Instruct's tokenizer (the Falcon-H1 Instruct one): BOS, ChatML.
FALCON_H1_INSTRUCT = (
    "{{bos_token}}\n"
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    '    {{- "You are a function calling AI model. You are provided with function signature within'
    " <tools> </tools> XML tags. You may call one or more functions to assist with the user query."
    " Don't make assumptions about what values to plug into functions.\\n<tools>\\n\" }}\n"
    "    {%- for tool in tools %}[{{- tool | tojson }}]{%- endfor %}\n"
    '    {{- "\\n</tools>\\nFor each function call, return a json object with function name and'
    " arguments within <tool_call> </tool_call> tags with the following"
    " schema:\\n<tool_call>\\n{'arguments': <args-dict>, 'name': <function-name>}\\n</tool_call>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}{% for message in messages %}{%- if message.role != 'system' %}{{'<|im_start|>' +"
    " message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{%- endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)


def _plain(user: str, assistant: str, separator: str) -> str:
    """A template for base models: `user` and `assistant` open their turns, `separator` goes between turns (a
    system text first, as it is). A single exchange renders as `{user}{prompt}{separator}{assistant}{response}`.

    The generation prompt is `{separator}{assistant}` without its trailing space: a byte-level BPE attaches a space
    to the word after it (" Hello"), so the reply starts with that space, as it does in the rendered text."""
    return (
        "{% for message in messages %}{% if not loop.first %}{{ " + repr(separator) + " }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ " + repr(user) + " + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ " + repr(assistant) + " + message['content'] }}"
        "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ " + repr(separator + assistant.rstrip(" ")) + " }}{% endif %}"
    )


# name -> Jinja text
NAMED: dict[str, str] = {
    "falcon-instruct": FALCON_INSTRUCT,
    "falcon-180b-chat": FALCON_180B_CHAT,
    "chatml": CHATML,
    "falcon3": FALCON3_INSTRUCT,
    "falcon-h1": FALCON_H1_INSTRUCT,
    # An Alpaca-style instruction block, the usual choice for base models.
    "instruction": _plain("### Instruction:\n", "### Response:\n", "\n\n"),
    # The guanaco / OpenAssistant turn format.
    "guanaco": _plain("### Human: ", "### Assistant: ", " "),
    # No decoration: each turn on its own line.
    "plain": _plain("", "", "\n"),
}
# what `auto` falls back to for a tokenizer without a template of its own, beside no config.json of a known family
FALLBACK = "instruction"
CHOICES = ("auto", "tokenizer", *NAMED)


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved `data.chat_template`: where the text came from, and the text."""

    name: str  # a name of NAMED, `tokenizer`, or the .jinja file's path
    text: str


def family_template(tokenizer) -> str:
    """The named template of the model family whose config.json is beside the tokenizer (`Architecture.chat_template`):
    the model's own directory where `data.tokenizer` defaults to `model.model_name_or_path`. `FALLBACK` where there is
    none, or it is of no supported family."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(tokenizer.name_or_path)
    except (OSError, ValueError):  # a tokenizer alone, or a model_type this transformers does not know
        return FALLBACK
    family = ARCHITECTURES.get(config.model_type)
    return family.chat_template if family is not None else FALLBACK


def resolve_template(setting: str, tokenizer) -> ChatTemplate:
    """The template `data.chat_template` names, for this tokenizer; a one-line error when there is none."""
    own = getattr(tokenizer, "chat_template", None)
    if setting == "auto":
        if own:
            return ChatTemplate("tokenizer", own)
        name = family_template(tokenizer)
        return ChatTemplate(name, NAMED[name])
    if setting == "tokenizer":
        if not own:
            raise ConfigError(
                f"data.chat_template tokenizer: the tokenizer {tokenizer.name_or_path} has no chat template. "
                f"Fix: --data.chat_template NAME (one of {sorted(NAMED)}) or a .jinja file"
            )
        return ChatTemplate("tokenizer", own)
    if setting in NAMED:
        return ChatTemplate(setting, NAMED[setting])
    path = Path(resolve(setting)).expanduser()
    if path.suffix == ".jinja" or path.exists():
        if not path.is_file():
            raise ConfigError(f"data.chat_template {setting}: no such file. Fix: give the path of a .jinja file")
        return ChatTemplate(str(path), path.read_text(encoding="utf-8"))
    raise ConfigError(
        f"data.chat_template {setting!r} is neither a template name nor a .jinja file. "
        f"Fix: choose one of {list(CHOICES)}, or give the path of a .jinja file"
    )


def render(tokenizer, template: ChatTemplate, messages: list[dict], generation_prompt: bool = False) -> str:
    """`messages` rendered through `template` (`apply_chat_template`, as a server renders them)."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template.text, tokenize=False, add_generation_prompt=generation_prompt
    )


# What rendering a template that refuses a conversation raises: its own `raise_exception`, a Jinja error, or a
# Python one from the expressions it evaluates.
RENDER_ERRORS = (TemplateError, TypeError, ValueError, KeyError, IndexError)

PROBE = "ZqXprobeXqZ"  # a content no template changes, found again in what it renders


def end_marker(tokenizer, template: ChatTemplate) -> str:
    """What the template writes right after an assistant's content, up to its last non-space character:
    `<|im_end|>` for ChatML, empty for Falcon's templates (which end a reply with nothing)."""
    text = render(tokenizer, template, [{"role": "user", "content": "x"}, {"role": "assistant", "content": PROBE}])
    return text[text.rindex(PROBE) + len(PROBE) :].rstrip()


EXCHANGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye"},
]


def template_problems(tokenizer, template: ChatTemplate) -> list[str]:
    """What stops `template` rendering training rows: an error on a plain exchange, or earlier turns rendered
    differently once a later one follows (training needs each turn's text to stay put)."""
    fix = f"Fix: choose another --data.chat_template (one of {sorted(NAMED)}) or a .jinja file"
    try:
        whole = render(tokenizer, template, EXCHANGES)
        first = render(tokenizer, template, EXCHANGES[:2])
        prompt = render(tokenizer, template, EXCHANGES[:1], generation_prompt=True)
    except RENDER_ERRORS as e:  # a template's own raise_exception, or a Jinja error
        return [f"data.chat_template {template.name} cannot render a user/assistant exchange ({e}). {fix}"]
    if not (whole.startswith(first) and first.startswith(prompt)):
        return [
            (
                f"data.chat_template {template.name} renders earlier turns differently once later ones follow, "
                f"so a turn's tokens are not where training would mark them. {fix}"
            )
        ]
    return []


def system_problems(tokenizer, template: ChatTemplate) -> list[str]:
    """The error when `template` cannot render a system message (asked when the data or `data.system_prompt` has
    one); none when it can."""
    try:
        text = render(tokenizer, template, [{"role": "system", "content": PROBE}, *EXCHANGES[:2]])
    except RENDER_ERRORS as e:
        text = f"({e})"
    if PROBE in text:
        return []
    return [
        (
            f"data.chat_template {template.name} cannot render a system message {text[:80] if text else ''}, "
            "and the data or data.system_prompt has one. "
            "Fix: choose a template that renders one (e.g. falcon-instruct), or drop data.system_prompt"
        )
    ]
