"""Readers: every input format, rows equal to input lines (property-based), ids in order, and
errors that name file:line."""

import gzip
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moee_fast.corpus.readers import count_rows, expand_inputs, read_rows

# Any text a user can write in UTF-8 except a line break inside a row; lone "\r", form feeds,
# U+2028 and other characters that str.splitlines would treat as breaks must survive.
ROW_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=40)


def rows_of(paths, **kwargs):
    return [(row.id, row.text) for row in read_rows(expand_inputs(paths), **kwargs)]


@settings(max_examples=80, deadline=None)
@given(lines=st.lists(ROW_TEXT, max_size=12), crlf=st.booleans(), bom=st.booleans(), final_newline=st.booleans())
def test_txt_rows_are_the_lines(tmp_path_factory, lines, crlf, bom, final_newline):
    lines = [line.rstrip("\r") for line in lines] if crlf else [line for line in lines if not line.endswith("\r")]
    ending = "\r\n" if crlf else "\n"
    content = ending.join(lines) + (ending if final_newline and lines else "")
    path = tmp_path_factory.mktemp("txt") / "in.txt"
    path.write_bytes(("\ufeff" if bom else "").encode() + content.encode("utf-8"))
    expected = content.split(ending)
    if expected[-1] == "":
        expected.pop()  # a newline ends the last row; it does not start another
    assert [text for _, text in rows_of([str(path)])] == expected
    assert [row_id for row_id, _ in rows_of([str(path)])] == [f"{path}:{n}" for n in range(1, len(expected) + 1)]
    assert count_rows([str(path)]) == len(expected)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(st.characters(blacklist_categories=("Cs",))), max_size=10), gz=st.booleans())
def test_jsonl_rows_are_the_records(tmp_path_factory, texts, gz):
    content = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)).encode()
    path = tmp_path_factory.mktemp("jsonl") / ("in.jsonl.gz" if gz else "in.JSONL")
    path.write_bytes(gzip.compress(content) if gz else content)
    assert rows_of([str(path)], id_field="n") == [(str(i), t) for i, t in enumerate(texts)]


def test_every_format_in_order(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first, with comma", 'a "quoted"\nmultiline text', "", "last 🙂"]
    (tmp_path / "a.txt").write_text("x\r\n\r\ny\n", encoding="utf-8", newline="")
    import csv

    for name, delimiter in (("b.csv", ","), ("c.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8-sig") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["key", "text"])
            writer.writerows([[f"k{i}", t] for i, t in enumerate(texts)])
    pq.write_table(pa.table({"text": texts, "key": [f"p{i}" for i in range(4)]}), tmp_path / "d.parquet", row_group_size=3)
    rows = rows_of([str(tmp_path / "a.txt"), str(tmp_path / "*.?sv"), str(tmp_path / "d.parquet")])
    assert [t for _, t in rows] == ["x", "", "y"] + texts + texts + texts
    assert rows[3][0] == f"{tmp_path / 'b.csv'}:2" and rows[5][0] == f"{tmp_path / 'b.csv'}:5"  # after a two-line field
    assert rows[-1][0] == f"{tmp_path / 'd.parquet'}:4"
    keyed = rows_of([str(tmp_path / "b.csv"), str(tmp_path / "d.parquet")], id_field="key")
    assert [i for i, _ in keyed] == ["k0", "k1", "k2", "k3", "p0", "p1", "p2", "p3"]
    assert count_rows([str(tmp_path / "d.parquet")]) == 4

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfx\r\n\r\ny\n")))
    assert [t for _, t in rows_of(["-"])] == ["x", "", "y"]  # CRLF on stdin as in the file


@pytest.mark.parametrize("name", ["in.json", "in.csv.bak", "notes.md", "data.jsonl.zip", "noext"])
def test_unknown_formats_are_refused_by_name(tmp_path, name):
    (tmp_path / name).write_text("text\n")
    with pytest.raises(ValueError, match=rf"{name}: not a format.*\.jsonl"):
        expand_inputs([str(tmp_path / name)])


def test_errors_name_file_and_line(tmp_path):
    cases = {
        "bad.txt": (b"ok\nfine\n\xff\xfe broken\n", "bad.txt:3: not valid UTF-8"),
        "bad.jsonl": (b'{"text": "ok"}\n\n', "bad.jsonl:2: not a JSON object"),
        "nofield.jsonl": (b'{"text": "ok"}\n{"title": "x"}\n', 'nofield.jsonl:2: needs a string "text"'),
        "short.csv": (b"id,text\n1,a\n2\n", "short.csv:3: 1 fields where the header has 2"),
        "nocol.csv": (b"id,body\n1,a\n", "nocol.csv:1: no column 'text'"),
        "bad.csv": (b"text\nok\n\xff\n", "bad.csv:3: not valid UTF-8"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            rows_of([str(tmp_path / name)])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(FileNotFoundError, match=r"\*.parquet: no file matches"):
        expand_inputs([str(tmp_path / "*.parquet")])


def test_csv_quoting_follows_the_csv_module_strictly(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('id,text\n1,"a, quoted ""field""\nover two lines"\n2,plain\n')
    assert rows_of([str(path)], id_field="id") == [("1", 'a, quoted "field"\nover two lines'), ("2", "plain")]
    path.write_text('id,text\n1,"Quoted" at start\n')
    with pytest.raises(ValueError, match="in.csv:2: ',' expected after '\"'"):
        rows_of([str(path)])
    path.write_text('id,text\n1,"never closed\n2,b\n3,c\n')
    with pytest.raises(ValueError, match="in.csv:4: unexpected end of data"):
        rows_of([str(path)])
    raw = tmp_path / "raw.tsv"
    raw.write_text('id\ttext\n1\t"Quoted" at start\n2\t"never closed\n')
    assert rows_of([str(raw)], id_field="id", quoting="none") == [("1", '"Quoted" at start'), ("2", '"never closed')]
    with pytest.raises(ValueError, match="quoting must be one of csv, none"):
        rows_of([str(raw)], quoting="raw")


def test_ids_keep_one_type_and_repeats_are_reported(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n')
    with pytest.raises(ValueError, match="mixed.jsonl:2: id '1' is a string, where .*mixed.jsonl:1 has an integer"):
        rows_of([str(mixed)], id_field="id")
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text('{"id": 7, "text": "a"}\n{"id": 8, "text": "b"}\n{"id": 7, "text": "c"}\n')
    with pytest.warns(UserWarning, match="repeated.jsonl:3: id '7' appeared before"):
        assert [i for i, _ in rows_of([str(repeated)], id_field="id")] == ["7", "8", "7"]
    with pytest.raises(ValueError, match="repeated.jsonl:3: id '7' appeared before \\(duplicate_ids='error'\\)"):
        rows_of([str(repeated)], id_field="id", duplicate_ids="error")


@pytest.mark.parametrize("name", ["in.txt", "in.jsonl.gz", "in.parquet"])
def test_a_file_that_changes_while_read_is_refused(tmp_path, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moee_fast.corpus.readers import fingerprint

    path = tmp_path / name

    def write(texts):
        if name.endswith(".parquet"):
            pq.write_table(pa.table({"text": texts}), path)
        elif name.endswith(".gz"):
            path.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
        else:
            path.write_text("".join(t + "\n" for t in texts))

    write(["a", "b"])
    taken = fingerprint(str(path))
    assert [t for _, t in rows_of([str(path)], fingerprints=[taken])] == ["a", "b"]
    rows = read_rows([str(path)], fingerprints=[taken])
    assert next(rows).text == "a"
    if name.endswith(".gz"):  # appended as a second gzip member, which gzip readers take as more data
        with open(path, "ab") as f:
            f.write(gzip.compress(b'{"text": "appended"}\n'))
    else:
        write(["a", "b", "appended"])  # while the job reads
    with pytest.raises(ValueError, match=f"{name}: changed while the job read it"):
        list(rows)


def test_a_broken_gzip_file_is_named(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    with pytest.raises(ValueError, match="in.jsonl.gz: not readable"):
        rows_of([str(path)])


def test_directories_are_not_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "emb.txt").mkdir()  # an output directory the pattern also matches
    assert expand_inputs([str(tmp_path / "*.txt")]) == [str(tmp_path / "a.txt")]
    with pytest.raises(ValueError, match="emb.txt: a directory, not an input file; give its files or a pattern"):
        expand_inputs([str(tmp_path / "emb.txt")])
