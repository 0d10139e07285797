"""The tokenizer of a run, loaded with a one-line error, and the special ids every layer pads and stops with."""

from __future__ import annotations

from lightning_falcon.assets import resolve
from lightning_falcon.errors import ConfigError, first_line


def load_tokenizer(name: str | None):
    """`AutoTokenizer.from_pretrained(name)`; it must have an EOS token, which ends every trained response."""
    from transformers import AutoTokenizer

    if name is None:
        raise ConfigError(
            "data.tokenizer is not set. Fix: set --data.tokenizer (the CLI defaults it to model.model_name_or_path)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    except OSError as e:  # transformers' "not a local folder and not a valid model identifier"
        raise ConfigError(
            f"tokenizer {name!r} not found: not a local directory and not loadable from "
            f"the Hub ({first_line(e)}). Fix: set --data.tokenizer or --model.model_name_or_path"
        ) from e
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"tokenizer {name} has no EOS token, and responses must end with one. "
            "Fix: use the model's own tokenizer (--data.tokenizer)"
        )
    return tokenizer


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos, pad). Falcon has no pad token: pad with EOS, which the attention mask hides."""
    eos = tokenizer.eos_token_id
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos


def special_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` where the tokenizer has it as one special token (Falcon-H1's `<|im_end|>`), else None."""
    return next((i for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content == text), None)
