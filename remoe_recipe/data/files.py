"""Local document files read with `datasets.load_dataset(..., streaming=True)`: jsonl (also .gz and
.zst), parquet, txt. One streamed dataset per file, so errors name the file and a resume skips whole
files cheaply (parquet: from the row count in its metadata).

jsonl and txt go through the "text" builder, one row per line, and jsonl rows are JSON-parsed here
rather than by the "json" builder: that one reports a bad line as a pyarrow error without its line
number, cannot skip it, and re-encodes fields whose type varies between rows; with one row per line
the line number is the row number. Lines end at "\\n", "\\r\\n" or a lone "\\r" (the builder reads in
Python's universal-newline text mode). txt: one document per block of non-blank lines, joined with
"\\n"; the builder's sample_by="paragraph" is not that (it splits at exactly "\\n\\n" only, so a
whitespace-only line does not separate and a longer run of newlines leaves one at a block's start).

Bad records (a line that is not UTF-8, not JSON, or without the text field) go to `BadRecords`: an
error naming file and line, or (data.skip_bad_records) a warning and the next line. The text builder
decodes strictly and stops at the first byte that is not UTF-8 without naming a line (its
`encoding_errors` option is ignored for .gz/.zst files), so from that point on the file is read by
`scan_lines`, which names the line, byte and column and can go on past it.
"""

import io
import json
import zlib
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import zstandard

from remoe_recipe.data.config import Data
from remoe_recipe.data.documents import BadRecords, DataError, make_document, text_problem

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = (*JSONL_SUFFIXES, ".parquet", ".txt")
BATCH_ROWS = 1024
TEXT_CHUNK_CHARS = 10 << 20  # what the text builder decodes at a time (its default)


def _stream(builder: str, path: Path, **config):
    """One file as a streamed dataset of Arrow tables (nothing copied; datasets keeps a lock file in its cache)."""
    import datasets

    ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **config)
    return ds.with_format("arrow")


# A missing, corrupt or truncated file (.gz: OSError, zlib.error, EOFError; .zst: ZstdError).
UNREADABLE = (OSError, EOFError, zlib.error, zstandard.ZstdError)


def _unreadable(where: str, e: Exception) -> DataError:
    return DataError(f"{where}: cannot be read ({type(e).__name__}: {e})")


def text_lines(path: Path, where: str, bad: BadRecords) -> Iterator[tuple[int, str]]:
    """(line number, text without its line break) of every line that is UTF-8 text."""
    n = 0
    try:
        for table in _stream("text", path, chunksize=TEXT_CHUNK_CHARS).iter(batch_size=BATCH_ROWS):
            for text in table.column(0).to_pylist():
                n += 1
                yield n, text
        return
    except UnicodeDecodeError:
        pass  # continued below, outside the handler: a DataError there is not chained to it
    except UNREADABLE as e:
        raise _unreadable(where, e) from None
    yield from scan_lines(path, where, bad, after=n)


def _universal_lines(chunk: bytes) -> list[bytes]:
    """The lines in one b"\\n"-terminated chunk as universal newlines split them (a lone b"\\r" ends one)."""
    return chunk.removesuffix(b"\n").removesuffix(b"\r").split(b"\r")


def scan_lines(path: Path, where: str, bad: BadRecords, after: int = 0) -> Iterator[tuple[int, str]]:
    """`text_lines` after line `after`, read as bytes: a line that is not UTF-8 goes to `bad`.

    Decompression is fsspec's, as in datasets' own reader; lines are numbered as that reader numbers
    them, so this continues exactly where it stopped.
    """
    import fsspec

    n = 0
    try:
        with fsspec.open(str(path), "rb", compression="infer") as raw:
            for chunk in io.BufferedReader(raw):  # a zstd reader has no readline of its own
                for line in _universal_lines(chunk):
                    n += 1
                    if n <= after:
                        continue
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        text, column = None, e.start
                    if text is None:
                        bad(f"{where}: line {n}", f"is not UTF-8 text (byte 0x{line[column]:02x} at column {column + 1})")
                    else:
                        yield n, text
    except UNREADABLE as e:
        raise _unreadable(where, e) from None


def jsonl_rows(path: Path, key: str, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    """(where, row) of every non-blank line: where names the file and line; a line that is not JSON goes to `bad`."""
    where = f"{key} = {str(path)!r}"
    for line_no, line in text_lines(path, where, bad):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            bad(f"{where}: line {line_no}", f"is not JSON ({e})")
            continue
        yield f"{where}: line {line_no}", row


def jsonl_documents(path: str | Path, data: Data, key: str) -> Iterator[dict]:
    """One document per non-blank JSON line; a row without the text field goes to `bad` too."""
    path = Path(path)
    bad = BadRecords(data.skip_bad_records)
    for where, row in jsonl_rows(path, key, bad):
        problem = text_problem(row, data)
        if problem:
            bad(where, f"has {problem}")
            continue
        yield make_document(row, data, path.name, where)


def txt_documents(path: str | Path, data: Data, key: str) -> Iterator[dict]:
    """One document per block of non-blank lines (blocks are separated by blank lines)."""
    path = Path(path)
    bad = BadRecords(data.skip_bad_records)
    block: list[str] = []
    for _, line in text_lines(path, f"{key} = {str(path)!r}", bad):
        if line.strip():
            block.append(line)
        elif block:
            yield {"text": "\n".join(block), "source": path.name}
            block = []
    if block:
        yield {"text": "\n".join(block), "source": path.name}


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def parquet_documents(path: Path, data: Data, key: str, start: int = 0) -> Iterator[dict]:
    """One document per row from row `start`; only the text and label columns are read."""
    import pyarrow.parquet as pq

    where = f"{key} = {str(path)!r}"
    names = pq.read_schema(path).names  # the footer only: a clear error before any row is read
    text_col = data.text_field.split(".")[0]
    if text_col not in names:
        raise DataError(
            f"{where}: no column {text_col!r} (data.text_field = {data.text_field!r}); columns are {names}"
        )
    columns = [text_col]
    label_col = data.label_field.split(".")[0] if data.label_field else None
    for col in (label_col, "source"):
        if col and col in names and col not in columns:
            columns.append(col)
    ds = _stream("parquet", path, columns=columns)
    row_no = start
    for table in (ds.skip(start) if start else ds).iter(batch_size=BATCH_ROWS):
        for row in table.to_pylist():
            yield make_document(row, data, path.name, f"{where}: row {row_no}")
            row_no += 1


def file_documents(path: Path, data: Data, key: str) -> Iterator[dict]:
    if path.name.endswith(".txt"):
        return txt_documents(path, data, key)
    if path.name.endswith(".parquet"):
        return parquet_documents(path, data, key)
    return jsonl_documents(path, data, key)


def files_documents(files: list[Path], data: Data, key: str, start: int = 0) -> Iterator[dict]:
    """The documents of several files in order, from global document index `start`."""
    for path in files:
        if path.name.endswith(".parquet"):
            n = parquet_rows(path)  # every row is a document: whole files are skipped from the metadata
            if start >= n:
                start -= n
                continue
            docs = parquet_documents(path, data, key, start)
            start = 0
        else:
            docs = file_documents(path, data, key)
            if start:  # lines are not documents (blank lines, bad records): read and drop
                start -= sum(1 for _ in islice(docs, start))
                if start:
                    docs.close()
                    continue
        try:
            yield from docs
        finally:
            docs.close()  # release the file now, not at garbage collection
