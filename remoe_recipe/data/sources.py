"""Document sources: zero-argument functions returning a fresh iterator of {"text", ...} dicts.

A source is re-opened at every epoch and must yield the same documents in the same order each
time: the dataset shards, skips (on resume) and packs by document index. New kinds of data
(Hugging Face datasets, token shards) plug in as another function of that shape in
`resolve_source`.
"""

import gzip
import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

Source = Callable[[], Iterator[dict]]

BUILTIN_CORPUS = Path(__file__).parent / "builtin" / "shakespeare.jsonl.gz"
# name -> split of the built-in corpus; in the [validation] section "shakespeare" means its
# validation split, so train and validation configs can both just say "shakespeare".
BUILTIN_DATASETS = {"shakespeare": "train", "shakespeare_validation": "validation"}
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")


def builtin_documents(split: str) -> Iterator[dict]:
    """Documents of the built-in Shakespeare corpus with the given `split` field."""
    for doc in jsonl_documents(BUILTIN_CORPUS):
        if doc["split"] == split:
            yield doc


def jsonl_documents(path: str | os.PathLike, key: str = "dataset_path") -> Iterator[dict]:
    """One document per JSON line; the line must have a string `text` field."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            doc = json.loads(line)
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise ValueError(
                    f"{key} = {str(path)!r}: line {line_no} has no string 'text' field"
                )
            doc.setdefault("source", path.name)
            yield doc


def txt_documents(path: str | os.PathLike) -> Iterator[dict]:
    """One document per block of non-blank lines (blocks are separated by blank lines)."""
    path = Path(path)
    block: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                block.append(line)
            elif block:
                yield {"text": "".join(block).rstrip("\n"), "source": path.name}
                block = []
    if block:
        yield {"text": "".join(block).rstrip("\n"), "source": path.name}


def _is_text_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TEXT_SUFFIXES)


def file_documents(path: Path, key: str) -> Iterator[dict]:
    if path.name.endswith(".txt"):
        return txt_documents(path)
    return jsonl_documents(path, key)


def directory_documents(files: list[Path], key: str) -> Iterator[dict]:
    for path in files:
        yield from file_documents(path, key)


def resolve_source(name: str, path: str | None, section: str) -> tuple[str, Source]:
    """(label, source) for `<section>.dataset` / `<section>.dataset_path`.

    A non-empty dataset_path wins and `dataset` is then only a label. Errors name the config key.
    """
    if path:
        key = f"{section}.dataset_path"
        p = Path(path)
        if p.is_dir():
            # Sorted, recursive: the document order must not depend on the file system.
            files = sorted(f for f in p.rglob("*") if _is_text_file(f))
            if not files:
                raise ValueError(f"{key} = {path!r}: no {'/'.join(TEXT_SUFFIXES)} files in directory")
            source = partial(directory_documents, files, key)
        elif p.is_file():
            if not p.name.endswith(TEXT_SUFFIXES):
                raise ValueError(f"{key} = {path!r}: expected a {'/'.join(TEXT_SUFFIXES)} file or a directory")
            source = partial(file_documents, p, key)
        else:
            raise FileNotFoundError(f"{key} = {path!r}: no such file or directory")
        _check_not_empty(source, key, path)
        return str(path), source

    key = f"{section}.dataset"
    split = BUILTIN_DATASETS.get((name or "").lower())
    if split is None:
        raise ValueError(
            f"{key} = {name!r}: unknown dataset; built-in datasets are {sorted(BUILTIN_DATASETS)}, "
            f"or set {section}.dataset_path to a .jsonl/.jsonl.gz/.txt file or a directory"
        )
    if section == "validation":
        split = "validation"
    return f"{name.lower()}:{split}", partial(builtin_documents, split)


def _check_not_empty(source: Source, key: str, value: str) -> None:
    # Reads the first document only: fails early (in the main process, with the key) on an
    # empty file or a first line without "text"; later bad lines fail when they are reached.
    docs = source()
    try:
        empty = next(docs, None) is None
    finally:
        if hasattr(docs, "close"):
            docs.close()
    if empty:
        raise ValueError(f"{key} = {value!r}: no documents (empty source)")
