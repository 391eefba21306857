"""Sources from config values: `resolve_source` turns `<section>.dataset` / `.dataset_path` into a
document source (see `remoe_recipe.data.documents`): the built-in corpus, local files
(`remoe_recipe.data.files`: a file, a folder read recursively in sorted order, a glob), a
`save_to_disk` folder or a Hugging Face dataset (`remoe_recipe.data.hf`). Token shards are not
documents and live in `remoe_recipe.data.shards`.

A source is re-opened at every epoch (and after a resume) and yields the same documents in the same
order each time: the dataset shards over ranks, skips and packs by document index.
"""

import glob
import os
from collections.abc import Iterator
from functools import partial
from itertools import islice
from pathlib import Path

from remoe_recipe.data.config import Data
from remoe_recipe.data.documents import BadRecords, DataError, Source
from remoe_recipe.data.files import TEXT_SUFFIXES, files_documents, jsonl_rows
from remoe_recipe.data.hf import HFSource

BUILTIN_CORPUS = Path(__file__).parent / "builtin" / "shakespeare.jsonl.gz"
# name -> split of the built-in corpus; in the [validation] section "shakespeare" means its
# validation split, so train and validation configs can both just say "shakespeare".
BUILTIN_DATASETS = {"shakespeare": "train", "shakespeare_validation": "validation"}
GLOB_CHARS = "*?["
# torchtitan's own dataset names (its defaults for training.dataset / validation.dataset); they
# are not Hugging Face names, so fail at once instead of asking the Hub.
TORCHTITAN_NAMES = ("c4_test", "c4_validation")
# Markers of a folder written by datasets' save_to_disk (a Dataset / a DatasetDict).
HF_DISK_MARKERS = ("state.json", "dataset_dict.json")


def builtin_documents(split: str, start: int = 0) -> Iterator[dict]:
    """Documents of the built-in Shakespeare corpus with the given `split` field."""
    rows = jsonl_rows(BUILTIN_CORPUS, "built-in corpus", BadRecords(skip=False))
    docs = ({"text": r["text"], "source": r["source"]} for _, r in rows if r["split"] == split)
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


def dataset_name_problem(name: str | None, section: str) -> str | None:
    """Why `<section>.dataset = name` names no dataset this recipe reads (None: a built-in or a
    Hugging Face name; whether the Hub has it is known only when it is opened)."""
    if name and name.lower() not in TORCHTITAN_NAMES:
        return None
    return (
        f"{section}.dataset = {name!r}: not a dataset of this recipe; built-in datasets are "
        f"{sorted(BUILTIN_DATASETS)}, Hugging Face datasets go by name (C4: allenai/c4 with "
        f"data.hf_config = 'en'), local files in {section}.dataset_path"
    )


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
    problem = dataset_name_problem(name, section)
    if problem:
        raise DataError(problem)
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
