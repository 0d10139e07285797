"""One training data source: where its rows are, how they are laid out, and its weight in a mix.

`data.datasets` is a list of `Source`; the single `data.dataset` (with `data.format`, `data.template` and
the rest beside it) is read as a list of one, so a config written before mixing keeps its meaning.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, get_args

from lightning_falcon.assets import resolve
from lightning_falcon.data.formats import DataFormat, FormatName, data_format

# A name becomes part of a TensorBoard tag (`val/loss/<name>`) and of the `[data]` lines.
NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class Source:
    """One data source of `data.datasets`.

    Every field but `name` and `weight` means what the `PromptDataModule` argument of the same name means
    (`fit --help` documents them): those arguments describe the single `data.dataset`, and these one source.

    Args:
        dataset: A local .jsonl/.json/.csv/.parquet file, a Hub dataset name, or `asset:NAME`.
        name: Names the source in the `[data]` lines, in errors and in `val/loss/<name>`; None: the file's
            stem, or the last part of the Hub name.
        weight: The source's share of each epoch's rows is its weight over the sum of the weights.
    """

    dataset: str
    name: str | None = None
    weight: float = 1.0
    val_dataset: str | None = None
    val_fraction: float = 0.1
    split: str = "train"
    val_split: str | None = None
    format: FormatName = "prompt_response"
    prompt_column: str = "prompt"
    response_column: str = "response"
    text_column: str = "text"
    template: str = "instruction"
    human_marker: str = "### Human:"
    assistant_marker: str = "### Assistant:"


# The settings of a `Source` that `data.dataset` and its siblings spell the same way, and every field's default.
SETTINGS = [f.name for f in fields(Source) if f.name not in ("name", "weight")]
DEFAULTS = {f.name: f.default for f in fields(Source) if f.name != "dataset"} | {"dataset": None}


@dataclass(frozen=True)
class Member:
    """A source as a run uses it: its settings, its resolved name, and where its options are set."""

    source: Source
    name: str
    option: str  # the option prefix a fix names: `data` for `data.dataset`, `data.datasets[1]` in a list
    mixed: bool  # one of several sources, so errors name it

    @property
    def format(self) -> DataFormat:
        return data_format(asdict(self.source))

    def label(self, dataset: str | None = None) -> str:
        """How errors name this source's `dataset` (or its `val_dataset`)."""
        dataset = dataset or self.source.dataset
        return f"{self.name!r} ({dataset})" if self.mixed else dataset

    def settings(self) -> dict[str, Any]:
        """What its tokenized rows depend on: everything but its name and weight."""
        return {k: getattr(self.source, k) for k in SETTINGS}


def setting(option: str, key: str, value: Any = None) -> str:
    """How a fix spells a setting: `--data.key value` on the command line, `data.datasets[i].key: value` in a list."""
    if option == "data":
        return f"--data.{key}" + ("" if value is None else f" {value}")
    return f"{option}.{key}" + ("" if value is None else f": {value}")


def default_name(dataset: str) -> str:
    """The file's stem (`midjourney` for `asset:data/midjourney.jsonl`), or a Hub name's last part."""
    if dataset.startswith("asset:") or Path(resolve(dataset)).expanduser().suffix:
        return Path(resolve(dataset)).stem
    return dataset.rstrip("/").rsplit("/", 1)[-1]


def members(hparams: dict[str, Any]) -> tuple[list[Member], list[str]]:
    """The run's sources from `data.datasets`, or `data.dataset` as a list of one; and what is wrong with them."""
    listed, single = hparams.get("datasets"), hparams.get("dataset")
    if listed and single is not None:
        both = "data.dataset and data.datasets are both set. Fix: set data.dataset: null beside data.datasets"
        return [], [both]
    if not listed:
        if single is None:
            return [], ["no training data. Fix: set --data.dataset, or list sources under data.datasets"]
        source = Source(dataset=single, **{k: hparams[k] for k in SETTINGS if k != "dataset"})
        return [Member(source, default_name(single), "data", mixed=False)], _problems(source, "data")
    found, problems = [], []
    # each source sets its own: one set beside the list would be ignored, so it is refused
    beside = [f"data.{k}" for k in SETTINGS if k != "dataset" and k in hparams and hparams[k] != DEFAULTS[k]]
    if beside:
        problems.append(
            f"{', '.join(beside)} set beside data.datasets would be ignored: each source sets its own. "
            f"Fix: move {'them' if len(beside) > 1 else 'it'} into the entries of data.datasets"
        )
    for i, entry in enumerate(listed):
        option = f"data.datasets[{i}]"
        source = _source(entry, option, problems)  # the datamodule hands `Source`s over as mappings
        if source is None:
            continue
        problems += _problems(source, option)
        if not math.isfinite(source.weight) or source.weight <= 0:
            problems.append(
                f"{option}.weight must be above 0, got {source.weight}. Fix: {setting(option, 'weight', 1)}"
            )
        name = source.name or default_name(source.dataset)
        if not NAME.fullmatch(name):
            problems.append(
                f"{option}.name {name!r} may hold only letters, digits, '_', '.' and '-'. "
                f"Fix: {setting(option, 'name', 'my-data')}"
            )
        found.append(Member(source, name, option, mixed=True))
    names = [m.name for m in found]
    for name in sorted({n for n in names if names.count(n) > 1}):
        where = ", ".join(m.option for m in found if m.name == name)
        problems.append(f"sources {where} are all named {name!r}. Fix: give each its own name (data.datasets[i].name)")
    return found, problems


def _source(entry: Any, option: str, problems: list[str]) -> Source | None:
    """A `Source` from a config's mapping, or None with its problems named (each key's, with the fix)."""
    if not isinstance(entry, dict) or entry.get("dataset") is None:
        problems.append(f"{option} needs a dataset. Fix: {setting(option, 'dataset', 'asset:data/midjourney.jsonl')}")
        return None
    found = []
    for key, value in entry.items():
        if key not in DEFAULTS:
            near = difflib.get_close_matches(key, list(DEFAULTS), n=1)
            fix = f"did you mean {option}.{near[0]}?" if near else f"use only {sorted(DEFAULTS)}"
            found.append(f"unknown key {option}.{key}. Fix: {fix}")
        elif key in ("weight", "val_fraction"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                found.append(
                    f"{option}.{key} must be a number, got {value!r}. Fix: {setting(option, key, DEFAULTS[key])}"
                )
        elif key == "format":
            if value not in get_args(FormatName):
                found.append(
                    f"{option}.format must be one of {list(get_args(FormatName))}, got {value!r}. "
                    f"Fix: {setting(option, 'format', 'turns')}"
                )
        elif not isinstance(value, str) and not (value is None and DEFAULTS[key] is None):
            found.append(f"{option}.{key} must be text, got {value!r}. Fix: quote it")
    problems += found
    if found:
        return None
    values = {k: float(v) if k in ("weight", "val_fraction") else v for k, v in entry.items()}
    return Source(**values)


def _problems(source: Source, option: str) -> list[str]:
    problems = [p.replace("data.", f"{option}.", 1) for p in data_format(asdict(source)).problems()]
    if source.val_dataset is None and not 0.0 < source.val_fraction < 1.0:
        problems.append(
            f"{option}.val_fraction must be in (0, 1) when {option}.val_dataset is not set, got "
            f"{source.val_fraction}. Fix: {setting(option, 'val_fraction', 0.1)}, "
            f"or set {setting(option, 'val_dataset')}"
        )
    return problems
