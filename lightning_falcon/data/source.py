"""One training data source: where its rows are, how they are laid out, and its weight in a mix.

`data.dataset` is a list of sources; one source is a list of one, and may be written alone: a file or Hub
name (a source with every default), or a mapping of `Source`'s fields. `members` reads it into the run's
sources and names what is wrong with each by the option that sets it (`--data.dataset.format`,
`data.dataset[1].weight`).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from lightning_falcon.assets import resolve
from lightning_falcon.data.formats import FormatName

# A name becomes part of a TensorBoard tag (`val/loss/<name>`) and of the `[data]` lines.
NAME = re.compile(r"[A-Za-z0-9_.-]+")
EXAMPLE = "asset:data/midjourney.jsonl"


@dataclass
class Source:
    """One source of training data: `data.dataset`, or one entry of a list of them.

    Args:
        dataset: A local .jsonl/.json/.csv/.parquet file, or a Hub dataset name for `datasets.load_dataset`.
            `asset:NAME` names data shipped with the package (e.g. `asset:data/midjourney.jsonl`).
        name: Names the source in the `[data]` lines, in errors and in `val/loss/<name>`; None: the file's
            stem, or the last part of the Hub name.
        weight: In a mix, the source's share of each epoch's rows is its weight over the sum of the weights.
        val_dataset: Optional separate validation data (same forms as `dataset`).
            Without it, a seeded `val_fraction` of `dataset` is held out.
        val_fraction: Fraction of `dataset` held out for validation when `val_dataset` is not given.
        split: The split to read from a Hub dataset.
        val_split: The split to read from a Hub `val_dataset`; None uses `split`.
        format: `auto` picks one from the columns, and prints which. `messages`: a list of
            {role, content} per row (OpenAI's layout; ShareGPT's {from, value} reads alike). `alpaca`:
            instruction, input, output. `prompt_response`: two columns. These three render through
            `data.chat_template`. `turns`: one `text_column` with turn markers, trained on as written.
            Only assistant turns train. `preference`: `chosen` and `rejected` answers to a `prompt_column` (strings,
            or `messages` lists as TRL writes them; without a prompt column, two whole conversations that differ
            in their last reply), for the preference objectives (`model.objective`).
        messages_column: Column holding the messages (format `messages`); None: `messages`, else `conversations`.
        prompt_column: Column holding the request (format `prompt_response`).
        response_column: Column holding the target response (format `prompt_response`).
        text_column: Column holding the whole conversation (format `turns`).
        human_marker: Marker that opens a human turn (format `turns`).
        assistant_marker: Marker that opens an assistant turn (format `turns`).
    """

    dataset: str
    name: str | None = None
    weight: float = 1.0
    val_dataset: str | None = None
    val_fraction: float = 0.1
    split: str = "train"
    val_split: str | None = None
    format: FormatName = "auto"
    messages_column: str | None = None
    prompt_column: str = "prompt"
    response_column: str = "response"
    text_column: str = "text"
    human_marker: str = "### Human:"
    assistant_marker: str = "### Assistant:"


TYPES = get_type_hints(Source)
DEFAULTS = {f.name: f.default for f in fields(Source) if f.name != "dataset"}
# What a source's tokenized rows depend on (its cache key): every field but its name and weight.
SETTINGS = [f.name for f in fields(Source) if f.name not in ("name", "weight")]


@dataclass(frozen=True)
class Member:
    """A source as a run uses it: its settings, its resolved name, and where its options are set."""

    source: Source
    name: str
    option: str  # what a fix names: `data.dataset` for the source alone, `data.dataset[1]` in a list
    mixed: bool  # one of several sources, so errors name it

    def label(self, dataset: str | None = None) -> str:
        """How errors name this source's `dataset` (or its `val_dataset`)."""
        dataset = dataset or self.source.dataset
        return f"{self.name!r} ({dataset})" if self.mixed else dataset

    def settings(self) -> dict[str, Any]:
        """What its tokenized rows depend on: everything but its name and weight."""
        return {k: getattr(self.source, k) for k in SETTINGS}


def setting(option: str, key: str, value: Any = None) -> str:
    """How a fix spells a setting of a source: `--data.dataset.key value` for the source alone (the command line
    sets one field of a source written as a mapping), `data.dataset[i].key: value` in a list."""
    if "[" not in option:
        return f"--{option}.{key}" + ("" if value is None else f" {value}")
    return f"{option}.{key}" + ("" if value is None else f": {value}")


def moved(key: str) -> str | None:
    """The error for a key of `data` that a config written before `Source` spells (`data.template`,
    `data.datasets`), naming where it sits now; None for any other key."""
    group, _, name = key.partition(".")
    if group != "data":
        return None
    if name == "template" or name.endswith(".template"):
        return f"{key}: {TEMPLATE_MOVED}"
    if name == "datasets":
        return (
            "data.datasets is data.dataset now, which takes one source or a list of them. "
            "Fix: rename data.datasets to data.dataset"
        )
    if name in DEFAULTS:
        return (
            f"data.{name} is a setting of a source now. "
            f"Fix: data.dataset: {{dataset: FILE, {name}: VALUE}}, or --data.dataset.{name} VALUE"
        )
    return None


TEMPLATE_MOVED = (
    "the template is data.chat_template now: one chat template renders every source. "
    "Fix: --data.chat_template NAME (e.g. instruction, falcon-instruct)"
)


def default_name(dataset: str) -> str:
    """The file's stem (`midjourney` for `asset:data/midjourney.jsonl`), or a Hub name's last part."""
    if dataset.startswith("asset:") or Path(resolve(dataset)).expanduser().suffix:
        return Path(resolve(dataset)).stem
    return dataset.rstrip("/").rsplit("/", 1)[-1]


def members(dataset: Any) -> tuple[list[Member], list[str]]:
    """The run's sources from `data.dataset` (one source, or a list of them); and what is wrong with them."""
    if dataset is None or dataset == []:
        return [], [f"no training data. Fix: --data.dataset {EXAMPLE}, or list sources under data.dataset"]
    entries = dataset if isinstance(dataset, list) else [dataset]
    found, problems = [], []
    for i, entry in enumerate(entries):
        option = f"data.dataset[{i}]" if isinstance(dataset, list) else "data.dataset"
        source = _source(entry, option, problems)
        if source is None:
            continue
        problems += _problems(source, option)
        name, mixed = source.name or default_name(source.dataset), len(entries) > 1
        # a name is part of a tag only in a mix: one source's default name is never checked
        if (mixed or source.name is not None) and not NAME.fullmatch(name):
            problems.append(
                f"{option}.name {name!r} may hold only letters, digits, '_', '.' and '-'. "
                f"Fix: {setting(option, 'name', 'my-data')}"
            )
        found.append(Member(source, name, option, mixed))
    names = [m.name for m in found]
    for name in sorted({n for n in names if names.count(n) > 1}):
        where = ", ".join(m.option for m in found if m.name == name)
        problems.append(f"sources {where} are all named {name!r}. Fix: give each its own name (data.dataset[i].name)")
    return found, problems


def _source(entry: Any, option: str, problems: list[str]) -> Source | None:
    """A `Source` from a file or Hub name, a mapping of its fields or a `Source`; or None with its problems named
    (each field's, with the fix)."""
    if isinstance(entry, str):
        entry = {"dataset": entry}
    elif isinstance(entry, Source):
        entry = asdict(entry)
    if not isinstance(entry, dict) or entry.get("dataset") is None:
        # `--data.dataset.KEY` on the command line replaces a source written as a name with a mapping of KEY alone
        problems.append(
            f"{option} has no dataset. Fix: {option}: {{dataset: {EXAMPLE}, ...}} "
            f"(a --data.dataset.KEY needs the source written as such a mapping)"
        )
        return None
    found = [p for key, value in entry.items() if (p := _field_problem(option, key, value))]
    problems += found
    if found:
        return None
    return Source(**{k: float(v) if TYPES[k] is float else v for k, v in entry.items()})


def _field_problem(option: str, key: str, value: Any) -> str | None:
    """What is wrong with one field of a source as written, with the fix; None when it fits the field's type."""
    if key == "template":
        return f"{option}.template: {TEMPLATE_MOVED}"
    if key not in TYPES:
        near = difflib.get_close_matches(key, list(TYPES), n=1)
        fix = f"did you mean {option}.{near[0]}?" if near else f"use only {sorted(TYPES)}"
        return f"unknown key {option}.{key}. Fix: {fix}"
    kind = TYPES[key]
    if value is None and type(None) in get_args(kind):
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{option}.{key} must be a number, got {value!r}. Fix: {setting(option, key, DEFAULTS[key])}"
    elif get_origin(kind) is Literal:
        if value not in get_args(kind):
            choices = [str(choice) for choice in get_args(kind)]
            closest = difflib.get_close_matches(str(value), choices, n=1) or [DEFAULTS[key]]  # else the default
            return (
                f"{option}.{key} must be one of {list(get_args(kind))}, got {value!r}. "
                f"Fix: {setting(option, key, closest[0])}"
            )
    elif not isinstance(value, str):
        return f"{option}.{key} must be text, got {value!r}. Fix: quote it"
    return None


def _problems(source: Source, option: str) -> list[str]:
    problems = []
    if source.val_dataset is None and not 0.0 < source.val_fraction < 1.0:
        problems.append(
            f"{option}.val_fraction must be in (0, 1) when {option}.val_dataset is not set, got "
            f"{source.val_fraction}. Fix: {setting(option, 'val_fraction', 0.1)}, "
            f"or set {setting(option, 'val_dataset')}"
        )
    if not math.isfinite(source.weight) or source.weight <= 0:
        problems.append(f"{option}.weight must be above 0, got {source.weight}. Fix: {setting(option, 'weight', 1)}")
    return problems
