"""User text files (data, inputs, queries) read with one-line errors that give the line to fix."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from lightning_falcon.errors import ConfigError


def _not_utf8(path: Path, what: str, error: UnicodeDecodeError, line: int) -> ConfigError:
    return ConfigError(
        f"{what} {path} is not UTF-8 text ({error.reason}: byte 0x{error.object[error.start]:02x} on line {line}). "
        "Fix: save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def read_utf8(path: Path, what: str) -> str:
    """The file's text, or a ConfigError giving the line of its first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, what, e, data.count(b"\n", 0, e.start) + 1) from None


def check_utf8(path: Path, what: str, chunk_bytes: int = 1 << 20) -> None:
    """`read_utf8`'s check in chunks, for data files of any size (the whole file is never in memory)."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # the error's offsets are within this chunk plus the few bytes the decoder carried over
                carried = len(e.object) - len(chunk)
                raise _not_utf8(path, what, e, line + chunk.count(b"\n", 0, max(e.start - carried, 0))) from None
            if not chunk:
                return
            line += chunk.count(b"\n")


def json_lines(text: str, path: Path, what: str) -> list[tuple[int, Any]]:
    """(line number, value) for every non-blank line, or a ConfigError naming the first line that is not JSON."""
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{what} {path} line {number} is not valid JSON ({e.msg}, column {e.colno}). Fix: one object per line"
            ) from None
    return values


def diagnose_json(path: Path, what: str) -> None:
    """A ConfigError naming the first bad line of a JSON file: one document over many lines, or JSON lines
    (which `.json` files may hold too). Returns if the file is valid."""
    text = read_utf8(path, what)
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        json.loads(first)
    except json.JSONDecodeError:
        if path.suffix.lower() == ".json":  # its first line is not a whole value: one document
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{what} {path} line {e.lineno} is not valid JSON ({e.msg}, column {e.colno}). "
                    "Fix: correct it there, or write one object per line as .jsonl"
                ) from None
            return
    json_lines(text, path, what)
