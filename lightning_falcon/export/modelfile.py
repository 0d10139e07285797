"""The Ollama Modelfile beside an exported GGUF: the prompt template training used, and its stop token.

Ollama renders a request through `TEMPLATE`, with `{{ .Prompt }}` standing for it. The template here is
the training one, cut where training's prompt ids end: a template's trailing space belongs to the
response (`data/prompts.py`), which the model generates itself. A `turns` model gets one human turn and
the assistant marker, as `chat` renders a single request.
"""

from __future__ import annotations

import json
from typing import Any

from lightning_falcon.data.prompts import TEMPLATES

PROMPT = "{{ .Prompt }}"


def template(prompt_format: dict[str, Any]) -> str:
    """Ollama's TEMPLATE for the prompt format saved beside an adapter (`lightning_falcon.json`'s `prompt`).

    `export` refuses an adapter without one before any weights load (`export/run.py`).
    """
    if prompt_format["format"] == "turns":
        return f"{prompt_format['human_marker']} {PROMPT} {prompt_format['assistant_marker']}"
    text = prompt_format.get("template_text") or TEMPLATES[prompt_format["template"]]
    return text.replace("{prompt}", PROMPT).rstrip(" ")


def modelfile(gguf_name: str, prompt_format: dict[str, Any], stop: str) -> str:
    """The Modelfile text: `ollama create NAME -f Modelfile` in its directory takes it as it is."""
    return "\n".join(
        [
            f"FROM ./{gguf_name}",
            f'TEMPLATE """{template(prompt_format)}"""',
            f"PARAMETER stop {json.dumps(stop)}",
            "",
        ]
    )
