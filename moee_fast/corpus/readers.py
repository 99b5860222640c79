"""Readers: one per input format, each yielding the rows of a corpus as (id, text, where),
where `where` is "file:line" (or "file:row" for parquet) for error messages.

A row is never dropped, merged or altered: a blank line is a row, a trailing "\\r" of a CRLF
line ending is removed the same way for files and stdin, a UTF-8 BOM opening a file is removed,
and invalid UTF-8 is an error naming file:line.

Every file is hashed as it is read and compared with the fingerprint the job took when it
started: a file that changed in between (appended to, rewritten) is refused instead of yielding
rows the manifest does not describe.

.csv and .tsv follow Python's csv module (the excel dialect, strict): a field in double quotes
may hold the delimiter, line breaks and doubled quotes (""); a quote anywhere else, or a quote
never closed, is an error naming file:line. quoting="none" splits every line at the delimiter
and keeps quotes as text (raw TSV).
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import json
import os
import sys
import zlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".csv", ".tsv", ".parquet")
FORMATS_TEXT = ".txt (a row per line), .jsonl, .jsonl.gz, .csv, .tsv (header row), .parquet, or - for stdin"
STDIN = "-"
BOM_BYTES = "\ufeff".encode("utf-8")


QUOTING = ("csv", "none")
DUPLICATE_IDS = ("warn", "error")


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    where: str  # file:line, for messages
    id_type: str = ""  # "int" or "str" where the id came from a field


def check_read_options(quoting: str, duplicate_ids: str) -> None:
    if quoting not in QUOTING:
        raise ValueError(f"quoting must be one of {', '.join(QUOTING)}, got {quoting!r}")
    if duplicate_ids not in DUPLICATE_IDS:
        raise ValueError(f"duplicate_ids must be one of {', '.join(DUPLICATE_IDS)}, got {duplicate_ids!r}")


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
        else:  # a pattern's folders (an output directory beside the inputs, say) are not inputs
            matches = sorted(p for p in glob.glob(item) if not os.path.isdir(p))
            if not matches:
                raise FileNotFoundError(f"{item}: no file matches this pattern")
        for path in matches:
            if path != STDIN and os.path.isdir(path):
                raise ValueError(f"{path}: a directory, not an input file; give its files or a pattern such as {os.path.join(path, '*.jsonl')}")
            if path != STDIN and not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such input file")
            input_format(path)
            paths.append(path)
    if not paths:
        raise ValueError("no input given")
    if paths.count(STDIN) > 1:
        raise ValueError("stdin (-) can be read only once")
    return paths


def read_rows(paths: list[str], text_field: str = "text", id_field: str | None = None, quoting: str = "csv",
              duplicate_ids: str = "warn", fingerprints: list[dict] | None = None) -> Iterator[Row]:
    """Every row of every input, in order; with `fingerprints` (one per path), a file whose
    bytes as read differ from its fingerprint is refused. Ids from `id_field` must all be
    integers or all strings, and a repeated one is a warning or, with duplicate_ids="error",
    an error."""
    check_read_options(quoting, duplicate_ids)
    ids = _IdCheck(duplicate_ids) if id_field else None
    for index, path in enumerate(paths):
        fmt = input_format(path)
        digest = _Digest(path, fingerprints[index] if fingerprints else None)
        if fmt == ".txt":
            rows = _txt_rows(path, digest)
        elif fmt in (".jsonl", ".jsonl.gz"):
            rows = _jsonl_rows(path, text_field, id_field, digest)
        elif fmt in (".csv", ".tsv"):
            rows = _csv_rows(path, text_field, id_field, "\t" if fmt == ".tsv" else ",", quoting, digest)
        else:
            rows = _parquet_rows(path, text_field, id_field, digest)
        for row in rows:
            if ids is not None:
                ids.check(row)
            yield row
        digest.check()
    if ids is not None:
        ids.summary()


class _IdCheck:
    """Ids of one type throughout a job, and repeats reported."""

    SHOWN = 5

    def __init__(self, duplicate_ids: str):
        self.error, self.seen, self.repeats, self.first = duplicate_ids == "error", set(), 0, None

    def check(self, row: Row) -> None:
        if self.first is None:
            self.first = row
        elif row.id_type != self.first.id_type:
            raise ValueError(f"{row.where}: id {row.id!r} is {'an integer' if row.id_type == 'int' else 'a string'}, where "
                             f"{self.first.where} has {'an integer' if self.first.id_type == 'int' else 'a string'}; "
                             "ids must be all integers or all strings")
        key = hashlib.blake2b(row.id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if key in self.seen:
            if self.error:
                raise ValueError(f"{row.where}: id {row.id!r} appeared before (duplicate_ids='error')")
            self.repeats += 1
            if self.repeats <= self.SHOWN:
                warnings.warn(f"{row.where}: id {row.id!r} appeared before", stacklevel=4)
        self.seen.add(key)

    def summary(self) -> None:
        if self.repeats > self.SHOWN:
            warnings.warn(f"{self.repeats} rows repeat an earlier id ({self.SHOWN} shown)", stacklevel=4)


class _Digest:
    """The SHA-256 and size of the bytes a reader took from a file, checked at its end against
    the fingerprint taken when the job started."""

    def __init__(self, path: str, expected: dict | None):
        self.path, self.expected = path, expected if expected and "sha256" in expected else None
        self.hash, self.size = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        if self.expected:
            self.hash.update(data)
            self.size += len(data)

    def check(self) -> None:
        if self.expected and (self.size != self.expected["size"] or self.hash.hexdigest() != self.expected["sha256"]):
            raise ValueError(f"{self.path}: changed while the job read it ({self.size} bytes read, "
                             f"{self.expected['size']} when the job started); rerun once it no longer changes")


class _HashingReader:
    """A binary file whose bytes go through a _Digest as they are read (under gzip)."""

    def __init__(self, f, digest: _Digest):
        self.f, self.digest = f, digest

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        return data

    def close(self) -> None:
        self.f.close()


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
def _open_binary(path: str, digest: _Digest | None = None):
    if path == STDIN:
        return sys.stdin.buffer
    if path.lower().endswith(".gz"):
        raw = open(path, "rb")
        return gzip.GzipFile(fileobj=_HashingReader(raw, digest) if digest else raw, mode="rb"), raw
    return open(path, "rb")


def _raw_lines(path: str, digest: _Digest | None = None) -> Iterator[bytes]:
    """The byte lines of a file, line endings kept, without a UTF-8 BOM opening it."""
    f = _open_binary(path, digest)
    f, raw_file = f if isinstance(f, tuple) else (f, None)
    plain = raw_file is None and digest is not None  # each line is the file's own bytes
    try:
        for number, raw in enumerate(f, 1):
            if plain:
                digest.update(raw)
            if number == 1 and raw.startswith(BOM_BYTES):
                raw = raw[len(BOM_BYTES):]
                if not raw:
                    continue
            yield raw
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not readable ({exc})") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
        if raw_file is not None:
            raw_file.close()


def _lines(path: str, keep_ends: bool = False, digest: _Digest | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) decoded from UTF-8, without the line ending ("\n" or "\r\n")
    unless `keep_ends`; a file ending in a newline has no extra empty line after it."""
    name = "<stdin>" if path == STDIN else path
    for number, raw in enumerate(_raw_lines(path, digest), 1):
        if raw.endswith(b"\n") and not keep_ends:
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name}:{number}: not valid UTF-8 (byte {exc.start + 1} of the line)") from None


def _txt_rows(path: str, digest=None) -> Iterator[Row]:
    name = "<stdin>" if path == STDIN else path
    for number, line in _lines(path, digest=digest):
        where = f"{name}:{number}"
        yield Row(where, line, where)


def _field(record: dict, field: str, where: str, what: str):
    value = record.get(field)
    if isinstance(value, str) or (what == "id" and isinstance(value, int) and not isinstance(value, bool)):
        return value
    kind = "string or integer" if what == "id" else "string"
    raise ValueError(f'{where}: needs a {kind} "{field}" field ({what}), got {type(value).__name__}')


def _record_row(record: dict, text_field: str, id_field: str | None, where: str) -> Row:
    text = _field(record, text_field, where, "text")
    if not id_field:
        return Row(where, text, where)
    row_id = _field(record, id_field, where, "id")
    return Row(str(row_id), text, where, "int" if isinstance(row_id, int) else "str")


def _jsonl_rows(path: str, text_field: str, id_field: str | None, digest=None) -> Iterator[Row]:
    for number, line in _lines(path, digest=digest):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not a JSON object ({exc.msg}); every line of a .jsonl file is a row") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a JSON object; every line of a .jsonl file is a row")
        yield _record_row(record, text_field, id_field, where)


def _csv_rows(path: str, text_field: str, id_field: str | None, delimiter: str, quoting: str = "csv",
              digest=None) -> Iterator[Row]:
    quote = csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL
    lines = (line for _, line in _lines(path, keep_ends=True, digest=digest))
    reader = csv.reader(lines, delimiter=delimiter, quoting=quote, strict=True)
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


def _parquet_rows(path: str, text_field: str, id_field: str | None, digest=None) -> Iterator[Row]:
    import pyarrow.parquet as pq

    with open(path, "rb") as f:  # read and hashed through one descriptor: the same file, replaced or not
        parquet = pq.ParquetFile(f)
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
        if digest is not None:
            f.seek(0)
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
