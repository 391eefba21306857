"""Document sources: callables `source(start=0)` returning an iterator of {"text", "source"} dicts.

A source is re-opened at every epoch (and after a resume) and must yield the same documents in
the same order each time: the dataset shards over ranks, skips and packs by document index.
`start` skips the first documents; a source skips cheaply where it can (whole parquet files,
Hugging Face `skip`) and otherwise reads and drops them, which is still far cheaper than
tokenizing them again.

Local kinds: jsonl (also .gz, and .zst when `zstandard` is installed), parquet, txt (one document
per blank-line separated block), a folder (recursive, sorted), a glob. Hugging Face kinds live in
`remoe_recipe.data.hf`; token shards are not documents and live in `remoe_recipe.data.shards`.

Bad records (a line that is not UTF-8, not JSON, or without the text field) raise `DataError`, one
line naming the file and line; with `data.skip_bad_records = true` they are skipped instead, each
with a warning that counts the records skipped so far. Skipping is deterministic, so document
indices (and an exact resume) do not change.
"""

import glob
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path

from torchtitan.tools.logging import logger

from remoe_recipe.data.config import Data

Source = Callable[..., Iterator[dict]]

BUILTIN_CORPUS = Path(__file__).parent / "builtin" / "shakespeare.jsonl.gz"
# name -> split of the built-in corpus; in the [validation] section "shakespeare" means its
# validation split, so train and validation configs can both just say "shakespeare".
BUILTIN_DATASETS = {"shakespeare": "train", "shakespeare_validation": "validation"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = (*JSONL_SUFFIXES, ".parquet", ".txt")
GLOB_CHARS = "*?["
# torchtitan's own dataset names (its defaults for training.dataset / validation.dataset); they
# are not Hugging Face names, so fail at once instead of asking the Hub.
TORCHTITAN_NAMES = ("c4_test", "c4_validation")
# Markers of a folder written by datasets' save_to_disk (a Dataset / a DatasetDict).
HF_DISK_MARKERS = ("state.json", "dataset_dict.json")


class DataError(ValueError):
    """Bad input data; the message is one line naming the file and line (or the config key)."""


class BadRecords:
    """Raise on a bad record, or (data.skip_bad_records) log it with a running count and go on."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0

    def __call__(self, where: str, reason: str) -> None:
        message = f"{where} {reason}"
        if not self.skip:
            raise DataError(f"{message}; fix or remove it, or set data.skip_bad_records = true")
        self.count += 1
        logger.warning(f"skipped: {message} ({self.count} bad record(s) skipped in this pass over the file)")


# ---------------------------------------------------------------- fields


def get_field(row: dict, dotted: str):
    """row["a"]["b"] for "a.b"; None when any part is missing."""
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def make_document(row, data: Data, default_label: str, where: str) -> dict:
    """{"text", "source"} from a raw row; a row without a string text field is an error."""
    text = get_field(row, data.text_field) if isinstance(row, dict) else None
    if not isinstance(text, str):
        fields = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(
            f"{where}: no string field {data.text_field!r} (data.text_field) in a document "
            f"with fields {fields}"
        )
    label = get_field(row, data.label_field) if data.label_field else None
    if label is None:
        label = row.get("source", default_label)
    return {"text": text, "source": str(label)}


# ---------------------------------------------------------------- file readers


def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise ImportError(
                f"{path}: reading .zst files needs the `zstandard` package (pip install zstandard)"
            ) from e
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(raw)
    return open(path, "rb")


def utf8_lines(path: Path, where: str, bad: BadRecords) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line; a line that is not UTF-8 is a bad record (file and line named)."""
    with _open_binary(path) as f:
        try:
            for line_no, raw in enumerate(f, 1):
                try:
                    yield line_no, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad(f"{where}: line {line_no}", f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
        except (OSError, EOFError) as e:  # a corrupt or truncated .gz/.zst
            raise DataError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None


def jsonl_documents(path: str | os.PathLike, data: Data, key: str) -> Iterator[dict]:
    """One document per non-blank JSON line."""
    path = Path(path)
    where = f"{key} = {str(path)!r}"
    bad = BadRecords(data.skip_bad_records)
    for line_no, line in utf8_lines(path, where, bad):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            bad(f"{where}: line {line_no}", f"is not JSON ({e})")
            continue
        if not isinstance(get_field(row, data.text_field) if isinstance(row, dict) else None, str):
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            bad(f"{where}: line {line_no}", f"has no string field {data.text_field!r} (data.text_field) "
                f"in a document with fields {fields}")
            continue
        yield make_document(row, data, path.name, f"{where}: line {line_no}")


def txt_documents(path: str | os.PathLike, data: Data | None = None, key: str = "dataset_path") -> Iterator[dict]:
    """One document per block of non-blank lines (blocks are separated by blank lines)."""
    path = Path(path)
    bad = BadRecords((data or Data()).skip_bad_records)
    block: list[str] = []
    for _, line in utf8_lines(path, f"{key} = {str(path)!r}", bad):
        if line.strip():
            block.append(line)
        elif block:
            yield {"text": "".join(block).rstrip("\n"), "source": path.name}
            block = []
    if block:
        yield {"text": "".join(block).rstrip("\n"), "source": path.name}


def parquet_documents(path: Path, data: Data, key: str) -> Iterator[dict]:
    """One document per row; only the text and label columns are read."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    text_col = data.text_field.split(".")[0]
    if text_col not in names:
        raise DataError(
            f"{key} = {str(path)!r}: no column {text_col!r} (data.text_field = "
            f"{data.text_field!r}); columns are {names}"
        )
    columns = [text_col]
    label_col = data.label_field.split(".")[0] if data.label_field else None
    for col in (label_col, "source"):
        if col and col in names and col not in columns:
            columns.append(col)
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for row_no, row in enumerate(batch.to_pylist()):
            yield make_document(row, data, path.name, f"{key} = {str(path)!r}: row {row_no}")


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def file_documents(path: Path, data: Data, key: str) -> Iterator[dict]:
    if path.name.endswith(".txt"):
        return txt_documents(path, data, key)
    if path.name.endswith(".parquet"):
        return parquet_documents(path, data, key)
    return jsonl_documents(path, data, key)


def files_documents(files: list[Path], data: Data, key: str, start: int = 0) -> Iterator[dict]:
    """The documents of several files in order, from global document index `start`."""
    for path in files:
        if start and path.name.endswith(".parquet"):
            n = parquet_rows(path)  # skip a whole parquet file from its metadata
            if n <= start:
                start -= n
                continue
        docs = file_documents(path, data, key)
        try:
            if start:
                consumed = sum(1 for _ in islice(docs, start))
                start -= consumed
                if start:
                    continue
            yield from docs
        finally:
            docs.close()  # release the file now, not at garbage collection


def builtin_documents(split: str, start: int = 0) -> Iterator[dict]:
    """Documents of the built-in Shakespeare corpus with the given `split` field."""
    with gzip.open(BUILTIN_CORPUS, "rt", encoding="utf-8") as f:
        docs = (json.loads(line) for line in f if line.strip())
        docs = ({"text": d["text"], "source": d["source"]} for d in docs if d["split"] == split)
        yield from islice(docs, start, None)


# ---------------------------------------------------------------- resolving config values


def is_text_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TEXT_SUFFIXES)


def is_hf_disk_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in HF_DISK_MARKERS)


def looks_like_path(spec: str) -> bool:
    """A mix entry is a local path (rather than a dataset name) when this holds."""
    return (
        os.path.exists(spec)
        or spec.startswith(("/", ".", "~"))
        or any(c in spec for c in GLOB_CHARS)
        or spec.endswith(TEXT_SUFFIXES)
        or spec.count("/") >= 2  # Hugging Face names are "owner/name"
    )


def local_files(path: str, key: str) -> list[Path]:
    """The document files a dataset_path names: a file, a folder (recursive) or a glob."""
    p = Path(os.path.expanduser(path))
    if any(c in path for c in GLOB_CHARS):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(path), recursive=True))
        files = [m for m in matches if is_text_file(m)]
        if not files:
            raise FileNotFoundError(
                f"{key} = {path!r}: the glob matches no {'/'.join(TEXT_SUFFIXES)} files"
            )
        return files
    if p.is_dir():
        # Sorted, recursive: the document order must not depend on the file system.
        files = sorted(f for f in p.rglob("*") if is_text_file(f))
        if not files:
            raise DataError(f"{key} = {path!r}: no {'/'.join(TEXT_SUFFIXES)} files in directory")
        return files
    if p.is_file():
        if not p.name.endswith(TEXT_SUFFIXES):
            raise DataError(
                f"{key} = {path!r}: expected a {'/'.join(TEXT_SUFFIXES)} file, a directory or a glob"
            )
        return [p]
    raise FileNotFoundError(f"{key} = {path!r}: no such file or directory")


def resolve_source(
    name: str, path: str | None, section: str, data: Data | None = None
) -> tuple[str, Source]:
    """(label, source) for `<section>.dataset` / `<section>.dataset_path`.

    A non-empty dataset_path wins and `dataset` is then only a label. Errors name the config key.
    Token-shard folders are not document sources; the loader checks for them first.
    """
    data = data or Data()
    split = data.validation_split if section == "validation" else data.split
    if path:
        key = f"{section}.dataset_path"
        if is_hf_disk_dir(Path(os.path.expanduser(path))):
            from remoe_recipe.data.hf import HFSource

            source = HFSource(path, data, key, split=split, from_disk=True)
        else:
            source = partial(files_documents, local_files(path, key), data, key)
        check_not_empty(source, key, path)
        return str(path), source

    key = f"{section}.dataset"
    builtin_split = BUILTIN_DATASETS.get((name or "").lower())
    if builtin_split is not None:
        if section == "validation":
            builtin_split = "validation"
        return f"{name.lower()}:{builtin_split}", partial(builtin_documents, builtin_split)
    if not name or name.lower() in TORCHTITAN_NAMES:
        raise DataError(
            f"{key} = {name!r}: not a dataset of this recipe; built-in datasets are "
            f"{sorted(BUILTIN_DATASETS)}, Hugging Face datasets go by name (C4: allenai/c4 with "
            f"data.hf_config = 'en'), local files in {section}.dataset_path"
        )
    from remoe_recipe.data.hf import HFSource

    source = HFSource(name, data, key, split=split)
    check_not_empty(source, key, name)
    return f"{name}:{split}", source


def check_not_empty(source: Source, key: str, value: str) -> None:
    # Reads the first document only: fails early (in the main process, with the key) on an
    # empty source or a first document without text; later bad rows fail when reached.
    docs = source()
    try:
        empty = next(docs, None) is None
    finally:
        if hasattr(docs, "close"):
            docs.close()
    if empty:
        raise DataError(f"{key} = {value!r}: no documents (empty source)")
