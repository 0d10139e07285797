"""A model's config.json, read alone (no weights) from a directory, an `asset:` or the Hub, with one-line errors."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

from lightning_falcon.assets import resolve
from lightning_falcon.errors import ConfigError, first_line


def warn_remote_code(model_name_or_path: str) -> None:
    """Say, once per process, that trust_remote_code lets a repository's Python code run here."""
    rank_zero_warn(
        f"trust_remote_code is on: Python code shipped with {model_name_or_path} will run on this machine with "
        "your permissions. Turn it on only for repositories you trust; no supported Falcon needs it (all are native "
        "in transformers)"
    )


def read_model_config(model_name_or_path: str, trust_remote_code: bool = False):
    """The model's config.json (only that file is read), from a directory, an `asset:` or the Hub; one-line error."""
    from transformers import AutoConfig

    if trust_remote_code:
        warn_remote_code(model_name_or_path)
    try:
        return AutoConfig.from_pretrained(resolve(model_name_or_path), trust_remote_code=trust_remote_code)
    except OSError as e:  # transformers' "not a local folder and not a valid model identifier"
        raise ConfigError(
            f"model {model_name_or_path!r} not found: not a local directory and not loadable from the Hub "
            f"({first_line(e)}). Fix: set --model.model_name_or_path to a Hub id or a directory with config.json"
        ) from e
