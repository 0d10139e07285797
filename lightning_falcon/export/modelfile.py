"""The Ollama Modelfile beside an exported GGUF: the prompt template training used, its system prompt, and its
stop token.

Ollama renders a request through `TEMPLATE`, with `{{ .Prompt }}` standing for it and `{{ .System }}` for the
system prompt. For a chat-template run, the TEMPLATE is what the run's chat template renders for one request,
with a system message and without one, as training rendered it; `SYSTEM` carries `data.system_prompt`. A
`turns` model gets one human turn and the assistant marker, as `chat` renders a single request.
"""

from __future__ import annotations

import json
from typing import Any

from lightning_falcon.data.chat_templates import PROBE, RENDER_ERRORS, ChatTemplate, render

PROMPT = "{{ .Prompt }}"
SYSTEM = "{{ .System }}"
SYSTEM_PROBE = "ZqXsystemXqZ"


def template(prompt_format: dict[str, Any], tokenizer) -> str:
    """Ollama's TEMPLATE for the prompt format saved beside an adapter (`lightning_falcon.json`'s `prompt`).

    `export` refuses an adapter without one before any weights load (`export/run.py`).
    """
    if prompt_format["format"] == "turns":
        return f"{prompt_format['human_marker']} {PROMPT} {prompt_format['assistant_marker']}"
    if prompt_format["format"] == "prompt_response":  # an adapter written before chat templates
        return prompt_format["template_text"].replace("{prompt}", PROMPT).rstrip(" ")
    chat = ChatTemplate(prompt_format["chat_template"], prompt_format["chat_template_text"])
    request = [{"role": "user", "content": PROBE}]
    alone = render(tokenizer, chat, request, generation_prompt=True).replace(PROBE, PROMPT)
    try:
        system = [{"role": "system", "content": SYSTEM_PROBE}, *request]
        with_system = render(tokenizer, chat, system, generation_prompt=True)
    except RENDER_ERRORS:  # a template that refuses system messages: Ollama's system prompt is left out
        return alone
    if SYSTEM_PROBE not in with_system:
        return alone
    with_system = with_system.replace(SYSTEM_PROBE, SYSTEM).replace(PROBE, PROMPT)
    return f"{{{{ if .System }}}}{with_system}{{{{ else }}}}{alone}{{{{ end }}}}"


def modelfile(gguf_name: str, prompt_format: dict[str, Any], stop: str, tokenizer) -> str:
    """The Modelfile text: `ollama create NAME -f Modelfile` in its directory takes it as it is."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template(prompt_format, tokenizer)}"""']
    if prompt_format.get("system_prompt"):
        lines.append(f'SYSTEM """{prompt_format["system_prompt"]}"""')
    stops = [stop, *([prompt_format["reply_marker"]] if prompt_format.get("reply_marker") else [])]
    return "\n".join([*lines, *(f"PARAMETER stop {json.dumps(s)}" for s in stops), ""])
