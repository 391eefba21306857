"""What a document is, for every source kind (local files, Hugging Face, built-in): a {"text", "source"}
dict built from a raw row, and what happens to a bad one.

A source is a callable `source(start=0)` returning an iterator of documents, the same documents in
the same order at every call; `start` skips the first ones.
"""

from collections.abc import Callable, Iterator

from torchtitan.tools.logging import logger

from remoe_recipe.data.config import Data

Source = Callable[..., Iterator[dict]]


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


def get_field(row: dict, dotted: str):
    """row["a"]["b"] for "a.b"; None when any part is missing."""
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def text_problem(row, data: Data) -> str | None:
    """Why `row` holds no document text (data.text_field), or None when it does."""
    if isinstance(get_field(row, data.text_field) if isinstance(row, dict) else None, str):
        return None
    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
    return f"no string field {data.text_field!r} (data.text_field) in a document with fields {fields}"


def make_document(row, data: Data, default_label: str, where: str) -> dict:
    """{"text", "source"} from a raw row; a row without a string text field is an error."""
    problem = text_problem(row, data)
    if problem:
        raise DataError(f"{where}: {problem}")
    label = get_field(row, data.label_field) if data.label_field else None
    if label is None:
        label = row.get("source", default_label)
    return {"text": get_field(row, data.text_field), "source": str(label)}
