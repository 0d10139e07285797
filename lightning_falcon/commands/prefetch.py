"""Prepare a run for compute nodes without internet: fetch the model and data once, on a login node.

    python -m lightning_falcon prefetch --config configs/falcon-7b-qlora.yaml [overrides]

It goes through the same names and caches the job will use:

* the model and its tokenizer: `huggingface_hub.snapshot_download` into the Hugging Face cache
  (`HF_HOME`, default ~/.cache/huggingface), only the files `from_pretrained` reads (config, tokenizer,
  safetensors weights; `.bin` weights only where a repository has no safetensors). A `random_init`
  run needs the config alone. Local directories and `asset:` paths need nothing;
* the data: the datamodule's own `prepare_data`, which loads the dataset (a Hub dataset lands in the
  `datasets` cache) and writes the tokenized cache under `data.cache_dir` that every job reads first.

Then it proves the job will not need the network: it loads the config and tokenizer again with
`local_files_only=True` and checks the weight files are there. Compute nodes then run with
`HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1` and the same `HF_HOME` and `data.cache_dir` (a shared filesystem).
"""

from __future__ import annotations

from pathlib import Path

from lightning_falcon.assets import resolve
from lightning_falcon.commands.cli import ParseOnlyCLI, parse_only
from lightning_falcon.data import PromptDataModule
from lightning_falcon.errors import ConfigError, first_line
from lightning_falcon.model.config import warn_remote_code

CONFIG_FILES = ["*.json", "tokenizer*", "*.model", "*.txt", "*.py"]  # *.py: trust_remote_code repositories


def is_hub_id(name: str) -> bool:
    """A Hub repository id (`org/name`) rather than a local path or a shipped asset."""
    return not name.startswith("asset:") and not Path(name).expanduser().exists()


def fetch_snapshot(repo_id: str, weights: bool) -> Path:
    """Download what `from_pretrained` reads from `repo_id` into the HF cache; returns the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(repo_id, allow_patterns=[*CONFIG_FILES, *(["*.safetensors"] if weights else [])])
        )
        if weights and not any(folder.glob("*.safetensors")):  # an older repository: PyTorch .bin weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=[*CONFIG_FILES, "*.bin"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:  # ValueError: not a valid repo id
        raise ConfigError(
            f"cannot download {repo_id} ({first_line(e)}). Fix: check the local path or Hub id, and run prefetch "
            "where the Hub is reachable (a login node), with HF_HUB_OFFLINE unset and HF_TOKEN set for gated models"
        ) from e
    return folder


def check_offline(name: str, tokenizer: str, weights: bool, trust_remote_code: bool) -> None:
    """Load the config and tokenizer with `local_files_only=True`; a missing weight file is an error too."""
    from transformers import AutoConfig, AutoTokenizer

    if trust_remote_code:
        warn_remote_code(name)
    try:
        AutoConfig.from_pretrained(resolve(name), local_files_only=True, trust_remote_code=trust_remote_code)
        AutoTokenizer.from_pretrained(resolve(tokenizer), local_files_only=True, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ConfigError(
            f"{name} is not complete in the local cache ({first_line(e)}). Fix: run prefetch again"
        ) from e
    if weights and is_hub_id(name):
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, local_files_only=True))
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise ConfigError(f"{name} has no weight files in the local cache. Fix: run prefetch again")


def prefetch(model, data) -> list[str]:
    """Fetch the model, tokenizer and data of a parsed config; returns a report, one line per item."""
    weights = not model.random_init  # random_init builds the weights from config.json alone
    tokenizer = data.tokenizer or model.model_name_or_path
    report = []
    for name, with_weights in {model.model_name_or_path: weights, tokenizer: False}.items():
        if is_hub_id(name):
            report.append(f"[prefetch] {name}: {fetch_snapshot(name, with_weights)}")
        else:
            report.append(f"[prefetch] {name}: local, nothing to download")
    check_offline(model.model_name_or_path, tokenizer, weights, model.trust_remote_code)
    datamodule = PromptDataModule(**{**data.as_dict(), "tokenizer": tokenizer})
    datamodule.prepare_data()  # the same loading, checks and tokenization the job runs, cached
    for member, cache in zip(datamodule.members, datamodule.cache_paths.values(), strict=True):
        report.append(f"[prefetch] data {member.source.dataset}: tokenized cache {cache}")
    report.append(
        "[prefetch] done: compute nodes can run this config with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1, "
        "the same HF_HOME and the same data.cache_dir"
    )
    return report


def main(args: list[str]) -> None:
    """`prefetch`: download the config's model, tokenizer and data into the caches a job without internet reads."""
    config = parse_only(ParseOnlyCLI, args, "prefetch").config
    print("\n".join(prefetch(config.model, config.data)))
