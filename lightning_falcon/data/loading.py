"""Loading one data file or Hub dataset through `datasets.load_dataset`, with one-line errors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from lightning_falcon.assets import resolve
from lightning_falcon.data.source import setting
from lightning_falcon.data.textfile import check_utf8, diagnose_json
from lightning_falcon.errors import ConfigError, first_line
from lightning_falcon.upstream import DATASETS_NO_ROWS

# File suffix -> the `datasets` builder that reads it.
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def empty(label: str, option: str = "data.dataset", key: str = "dataset") -> ConfigError:
    return ConfigError(f"dataset {label} is empty. Fix: point {setting(option, key)} at data with rows")


def local_file(source: str) -> Path | None:
    """The file `source` names, or None for a Hub dataset name."""
    path = Path(resolve(source)).expanduser() if source else None
    return path if path is not None and path.is_file() else None


def load_source(source: str, split: str, name: str | None = None, option: str = "data.dataset", key: str = "dataset"):
    """Load one data source: a .jsonl/.json/.csv/.parquet file, or the `split` of a Hub dataset.

    Errors name it by `source`, and by its `name` in a mix; their fixes name the setting `option.key` it came from.
    """
    import datasets

    label, what = (source, "dataset") if name is None else (f"{name!r} ({source})", f"dataset {name!r}:")
    path = Path(resolve(source)).expanduser()
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if path.is_dir():
        raise ConfigError(f"dataset {label} is a directory. Fix: give a {'/'.join(FILE_BUILDERS)} file")
    if builder is not None or path.exists():
        if not path.is_file():
            raise ConfigError(
                f"dataset file not found: {label}. "
                f"Fix: check the path of {setting(option, 'dataset')} / {setting(option, 'val_dataset')}"
            )
        if builder is None:
            raise ConfigError(
                f"dataset {label}: unsupported file type. Fix: convert it to one of {sorted(FILE_BUILDERS)}"
            )
        if path.stat().st_size == 0:
            raise empty(label, option, key)
        if builder in ("json", "csv"):
            check_utf8(path, what)  # pyarrow loads bad bytes into strings, to fail on first use
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log of a bad file repeats ours
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets wraps a bad line in DatasetGenerationError, without its number
            if DATASETS_NO_ROWS in str(e):
                raise empty(label, option, key) from e
            if builder == "json":  # datasets' own error has no line number
                diagnose_json(path, what)
            raise ConfigError(
                f"dataset {label} could not be read as {builder} ({first_line(e)}). Fix: check the file's format"
            ) from e
        finally:
            datasets.logging.set_verbosity(verbosity)
    try:
        return datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ConfigError(
            f"unknown dataset {label if label != source else repr(source)}: not a local file and not loadable "
            f"from the Hub ({first_line(e)}). "
            "Fix: give an existing .jsonl/.json/.csv/.parquet path or a Hub dataset name"
        ) from e


def peek_columns(source: str, split: str, name: str | None = None, option: str = "data.dataset") -> list[str]:
    """A source's columns without loading it whole where it can: a JSON line's keys, a Parquet schema, a Hub
    dataset's first rows, streamed. Anything else (a CSV or JSON file, or a file that is missing, empty or bad)
    is loaded, which reads it, or reports what is wrong with it as loading the data would."""
    import datasets

    path = Path(resolve(source)).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            line = next((line for line in f if line.strip()), None)
        try:
            row = json.loads(line) if line is not None else None
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            return list(row)
    elif path.is_file() and suffix == ".parquet":
        import pyarrow.parquet as pq

        with contextlib.suppress(Exception):  # an unreadable file: loading it names the problem
            return list(pq.read_schema(path).names)
    elif not path.exists() and suffix not in FILE_BUILDERS:
        with contextlib.suppress(Exception):  # not on the Hub either: loading it names the problem
            columns = datasets.load_dataset(source, split=split, streaming=True).column_names
            if columns:
                return list(columns)
    return list(load_source(source, split, name, option).column_names)


def line_of(source: str, index: int) -> str:
    """How an error names the row at `index` of a source as loaded: its line in a JSON-lines file, else its row."""
    path = local_file(source)
    if path is not None and path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            rows = (number for number, line in enumerate(f, 1) if line.strip())
            for i, number in enumerate(rows):
                if i == index:
                    return f"line {number} of {path.name}"
    return f"row {index + 1}"
