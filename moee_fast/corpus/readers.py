"""Readers: one per input format, each yielding the rows of a corpus as (id, text, where),
where `where` is "file:line" (or "file:row" for parquet) for error messages.

A row is never dropped, merged or altered: a blank line is a row, a trailing "\\r" of a CRLF
line ending is removed the same way for files and stdin, a UTF-8 BOM opening a file is removed,
and invalid UTF-8 is an error naming file:line.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".csv", ".tsv", ".parquet")
FORMATS_TEXT = ".txt (a row per line), .jsonl, .jsonl.gz, .csv, .tsv (header row), .parquet, or - for stdin"
STDIN = "-"
BOM_BYTES = "\ufeff".encode("utf-8")


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    where: str  # file:line, for messages


def input_format(path: str) -> str:
    """The format of `path` by its extension (any case); anything else is refused by name."""
    if path == STDIN:
        return ".txt"
    lowered = path.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if lowered.endswith(ext):
            return ext
    raise ValueError(f"{path}: not a format moee-fast reads; use {FORMATS_TEXT}")


def expand_inputs(inputs) -> list[str]:
    """Paths and globs, in the order given (each glob's matches sorted), checked to exist and
    to be in a format we read."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    for item in inputs:
        item = os.fspath(item)
        if item == STDIN or not glob.has_magic(item):
            matches = [item]
        else:
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"{item}: no file matches this pattern")
        for path in matches:
            if path != STDIN and not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such input file")
            input_format(path)
            paths.append(path)
    if not paths:
        raise ValueError("no input given")
    if paths.count(STDIN) > 1:
        raise ValueError("stdin (-) can be read only once")
    return paths


def read_rows(paths: list[str], text_field: str = "text", id_field: str | None = None) -> Iterator[Row]:
    """Every row of every input, in order."""
    for path in paths:
        fmt = input_format(path)
        if fmt == ".txt":
            yield from _txt_rows(path)
        elif fmt in (".jsonl", ".jsonl.gz"):
            yield from _jsonl_rows(path, text_field, id_field)
        elif fmt in (".csv", ".tsv"):
            yield from _csv_rows(path, text_field, id_field, "\t" if fmt == ".tsv" else ",")
        else:
            yield from _parquet_rows(path, text_field, id_field)


def count_rows(paths: list[str]) -> int | None:
    """Rows in all inputs, counted cheaply (newlines; parquet metadata); None for stdin or csv,
    whose quoted fields may span lines."""
    total = 0
    for path in paths:
        fmt = input_format(path)
        if path == STDIN or fmt in (".csv", ".tsv"):
            return None
        if fmt == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
            continue
        total += sum(1 for _ in _raw_lines(path))
    return total


def fingerprint(path: str) -> dict:
    """What identifies an input's contents: its size and a SHA-256 of its bytes."""
    if path == STDIN:
        return {"path": STDIN}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": path, "size": os.path.getsize(path), "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------------------------
def _open_binary(path: str):
    if path == STDIN:
        return sys.stdin.buffer
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _raw_lines(path: str) -> Iterator[bytes]:
    """The byte lines of a file, line endings kept, without a UTF-8 BOM opening it."""
    f = _open_binary(path)
    try:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(BOM_BYTES):
                raw = raw[len(BOM_BYTES):]
                if not raw:
                    return
            yield raw
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _lines(path: str, keep_ends: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, line) decoded from UTF-8, without the line ending ("\n" or "\r\n")
    unless `keep_ends`; a file ending in a newline has no extra empty line after it."""
    name = "<stdin>" if path == STDIN else path
    for number, raw in enumerate(_raw_lines(path), 1):
        if raw.endswith(b"\n") and not keep_ends:
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name}:{number}: not valid UTF-8 (byte {exc.start + 1} of the line)") from None


def _txt_rows(path: str) -> Iterator[Row]:
    name = "<stdin>" if path == STDIN else path
    for number, line in _lines(path):
        where = f"{name}:{number}"
        yield Row(where, line, where)


def _field(record: dict, field: str, where: str, what: str, required: bool = True):
    value = record.get(field)
    if isinstance(value, str) or (what == "id" and isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    if value is None and not required:
        return None
    raise ValueError(f'{where}: needs a string "{field}" field ({what}), got {type(value).__name__}')


def _record_row(record: dict, text_field: str, id_field: str | None, where: str) -> Row:
    text = _field(record, text_field, where, "text")
    row_id = _field(record, id_field, where, "id") if id_field else where
    return Row(row_id, text, where)


def _jsonl_rows(path: str, text_field: str, id_field: str | None) -> Iterator[Row]:
    for number, line in _lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not a JSON object ({exc.msg}); every line of a .jsonl file is a row") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a JSON object; every line of a .jsonl file is a row")
        yield _record_row(record, text_field, id_field, where)


def _csv_rows(path: str, text_field: str, id_field: str | None, delimiter: str) -> Iterator[Row]:
    reader = csv.reader((line for _, line in _lines(path, keep_ends=True)), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        for field in [text_field] + ([id_field] if id_field else []):
            if field not in header:
                raise ValueError(f"{path}:1: no column {field!r} in the header ({', '.join(header)})")
        start = reader.line_num + 1
        for values in reader:
            where = f"{path}:{start}"
            if len(values) != len(header):
                raise ValueError(f"{where}: {len(values)} fields where the header has {len(header)}")
            yield _record_row(dict(zip(header, values)), text_field, id_field, where)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ValueError(f"{path}:{reader.line_num}: {exc}") from None


def _parquet_rows(path: str, text_field: str, id_field: str | None) -> Iterator[Row]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    columns = [text_field] + ([id_field] if id_field else [])
    names = parquet.schema_arrow.names
    for column in columns:
        if column not in names:
            raise ValueError(f"{path}: no column {column!r} (it has {', '.join(names)})")
    number = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        values = batch.to_pydict()
        for i in range(batch.num_rows):
            number += 1
            yield _record_row({c: values[c][i] for c in columns}, text_field, id_field, f"{path}:{number}")
