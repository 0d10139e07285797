"""User-supplied inputs to generate for: `predict`'s input file and `evaluate`'s query file.

Both are read before any weights load, so a bad file costs nothing but a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lightning_falcon.assets import resolve
from lightning_falcon.data.textfile import json_lines, read_utf8
from lightning_falcon.errors import ConfigError

# Fields a JSONL line may carry its input in, in order of preference.
INPUT_FIELDS = ("input", "prompt", "query")


def _text(path: Path, what: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}. Fix: give the path of an existing file")
    return read_utf8(path, what)


def _jsonl(path: Path, what: str, fields: tuple[str, ...]) -> list[dict]:
    rows = []
    for number, row in json_lines(_text(path, what), path, what):
        field = next((f for f in fields if isinstance(row, dict) and isinstance(row.get(f), str)), None)
        if field is None or not row[field].strip():
            raise ConfigError(
                f"{what} {path} line {number} has no non-empty {' / '.join(fields)} field. "
                f'Fix: write one object per line such as {{"input": "..."}}'
            )
        rows.append({**row, "input": row[field].strip()})
    return rows


def read_inputs(file: str, prompt_field: str = "prompt") -> list[str]:
    """Inputs from a `.jsonl` file (an `input`, `prompt_field` or `query` field) or a text file (one per line)."""
    path = Path(resolve(file)).expanduser()
    if path.suffix.lower() == ".jsonl":
        fields = tuple(dict.fromkeys(("input", prompt_field, *INPUT_FIELDS)))
        inputs = [row["input"] for row in _jsonl(path, "input file", fields)]
    else:
        inputs = [line.strip() for line in _text(path, "input file").splitlines() if line.strip()]
    if not inputs:
        raise ConfigError(f"input file {path} is empty. Fix: give one input per line")
    return inputs


@dataclass
class Query:
    level: str
    input: str


def read_queries(file: str | None) -> list[Query]:
    """Queries of `evaluate`, grouped by `level` (easy / intermediate / advanced, in the file's order)."""
    if file is None:
        raise ConfigError(
            "evaluate needs a query file. Fix: set --generation.queries "
            '(JSONL of {"level": ..., "input": ...}, e.g. asset:data/midjourney-queries.jsonl)'
        )
    path = Path(resolve(file)).expanduser()
    queries = [Query(str(row.get("level") or "all"), row["input"]) for row in _jsonl(path, "query file", INPUT_FIELDS)]
    if not queries:
        raise ConfigError(f"query file {path} is empty. Fix: give one JSON query per line")
    return queries
