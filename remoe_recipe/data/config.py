"""The `[data]` TOML section: how documents are read, labelled and mixed.

What to read stays in torchtitan's own keys: `training.dataset` / `validation.dataset` (a
built-in corpus or a Hugging Face dataset name) and `training.dataset_path` /
`validation.dataset_path` (local jsonl/parquet/txt files, a folder, a glob, a `save_to_disk`
folder, or a token-shard folder). This section says how to read it.
"""

from dataclasses import dataclass, field


@dataclass
class Data:
    text_field: str = "text"
    """Field holding a document's text (jsonl, parquet, Hugging Face rows); dots reach into
    nested fields ("content.body")."""

    label_field: str = "meta.pile_set_name"
    """Field holding a document's source/domain label (the Pile's meta.pile_set_name). Documents
    without it are labelled by their own "source" field, else by file or dataset name."""

    hf_config: str = ""
    """Hugging Face dataset configuration (subset), e.g. "en" for allenai/c4, "sample-10BT"
    for HuggingFaceFW/fineweb; empty = the dataset's default."""

    split: str = "train"
    """Hugging Face split read by training.dataset."""

    validation_split: str = "validation"
    """Hugging Face split read by validation.dataset."""

    streaming: bool = True
    """Hugging Face datasets: stream (no download) or download and cache first."""

    mix: list[str] = field(default_factory=list)
    """Training mixture, replacing training.dataset/dataset_path when non-empty: entries
    "WEIGHT SOURCE", SOURCE being a path (file, folder, glob, shard folder), a built-in name or a
    Hugging Face name (prefix "hf:" to force). E.g. ["2 ./shards/pile", "1 hf:allenai/c4"]."""

    shuffle_window: int = 0
    """Training documents: 0 = in source order; N = shuffled within consecutive windows of N documents, in
    a new order every epoch, seeded by data.shuffle_seed. Resuming replays exactly the same order (the
    position is the document index in the shuffled order). N documents are held in memory."""

    shuffle_seed: int = 0
    """Seed of the document shuffle (data.shuffle_window)."""

    skip_bad_records: bool = False
    """Local jsonl/txt files: skip a line that is not UTF-8, not JSON, or has no text field (each skip
    is logged with a running count) instead of stopping the run at it (default: stop, naming file and line)."""

    verify_shards: bool = False
    """Token shards: check every shard's sha256 against the index at start-up (reads all data)."""


def data_config(job_config) -> Data:
    """job_config.data, or the defaults when the [data] section is not registered."""
    return getattr(job_config, "data", None) or Data()
