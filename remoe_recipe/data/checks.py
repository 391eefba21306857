"""Problems of a config's data settings, found before any process starts: one line each, naming the key
and what it expects. Opens no dataset (the Hub is asked only when the run builds its dataloader)."""

import glob
import os
import re

import tiktoken

from remoe_recipe.data.config import data_config
from remoe_recipe.data.mixing import mix_source, parse_mix_entry
from remoe_recipe.data.sources import BUILTIN_DATASETS, GLOB_CHARS, dataset_name_problem, looks_like_path
from remoe_recipe.data.tokenizer import TOKENIZER_KEY, load_tokenizer, names_a_file

# A Hugging Face dataset id: "name" or "owner/name" (letters, digits, "-", "_", ".").
HF_NAME = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


def data_config_problems(config, check_paths: bool = True) -> list[str]:
    """Problems of [data], training./validation.dataset(_path) and model.tokenizer_path.

    check_paths=False skips what needs this machine's files (paths exist, the tokenizer file parses):
    the dry run checks a config for another machine, where the data lives.
    """
    data = data_config(config)
    problems = []
    if data.shuffle_window < 0:
        problems.append(f"data.shuffle_window = {data.shuffle_window}: expected >= 0")
    for entry in data.mix:
        problems += mix_entry_problems(entry, check_paths)
    sections = ["validation"] if config.validation.enable else []
    if not data.mix:  # a mix replaces training.dataset / dataset_path (the loader warns they are ignored)
        sections.insert(0, "training")
    for section in sections:
        cfg = getattr(config, section)
        if cfg.dataset_path:  # it wins; dataset is then only a label
            if check_paths:
                problems += path_problems(f"{section}.dataset_path", cfg.dataset_path)
        elif problem := dataset_problem(cfg.dataset, section, check_paths):
            problems.append(problem)
    if problem := tokenizer_problem(getattr(config.model, "tokenizer_path", None), check_paths):
        problems.append(problem)
    return problems


def missing(path: str) -> str | None:
    """Why nothing is at `path` (a file, folder or glob), or None."""
    expanded = os.path.expanduser(path)
    exists = glob.glob(expanded, recursive=True) if any(c in expanded for c in GLOB_CHARS) else os.path.exists(expanded)
    return None if exists else "no such file, folder or glob match"


def path_problems(key: str, path: str) -> list[str]:
    problem = missing(path)
    return [f"{key} = {path!r}: {problem}"] if problem else []


def mix_entry_problems(entry: str, check_paths: bool) -> list[str]:
    """A data.mix entry must be 'WEIGHT SOURCE' with a weight > 0; a local SOURCE must exist."""
    try:
        _, spec = parse_mix_entry(entry)
    except ValueError as e:
        return [str(e)]
    name, path = mix_source(spec)
    if path is not None:
        problem = missing(path) if check_paths else None
        return [f"data.mix entry {entry!r}: {problem}"] if problem else []
    if name.lower() in BUILTIN_DATASETS or HF_NAME.fullmatch(name):
        return []
    return [
        f"data.mix entry {entry!r}: {name!r} is not a path, a built-in dataset {sorted(BUILTIN_DATASETS)} "
        "or a Hugging Face name ('owner/name', or 'hf:owner/name')"
    ]


def dataset_problem(name: str | None, section: str, check_paths: bool) -> str | None:
    """`<section>.dataset` must be a built-in name, a Hugging Face name or a local folder of data files."""
    if name and name.lower() in BUILTIN_DATASETS:
        return None
    if problem := dataset_name_problem(name, section):  # empty, or torchtitan's own c4_test / c4_validation
        return problem
    if looks_like_path(name):  # a local folder of data files, read by datasets.load_dataset
        if check_paths and not os.path.exists(os.path.expanduser(name)):
            return (
                f"{section}.dataset = {name!r}: no such folder; local files, folders and globs go in "
                f"{section}.dataset_path"
            )
        return None
    if HF_NAME.fullmatch(name):
        return None
    return (
        f"{section}.dataset = {name!r}: expected a built-in dataset {sorted(BUILTIN_DATASETS)}, a Hugging Face "
        f"name ('owner/name') or a local folder"
    )


def tokenizer_names() -> list[str]:
    """The model.tokenizer_path values that are names rather than files."""
    return ["builtin", *tiktoken.list_encoding_names()]


def tokenizer_problem(spec: str | None, check_paths: bool) -> str | None:
    """A ranks file must parse (check_paths); a name must be one tiktoken knows. A known name is not
    loaded: tiktoken may need the network for it, and the run itself says what to do offline."""
    spec = spec or "builtin"
    if spec != "builtin" and names_a_file(spec):
        if check_paths:
            try:
                load_tokenizer(spec)
            except (ValueError, FileNotFoundError) as e:
                return str(e)
        return None
    if spec not in tokenizer_names():
        return (
            f"{TOKENIZER_KEY} = {spec!r}: not a tokenizer name this recipe knows; expected one of "
            f"{tokenizer_names()} or a path to a *.tiktoken ranks file"
        )
    return None
