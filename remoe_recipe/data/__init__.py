"""Data for the ReMoE recipe: tiktoken tokenizers, document sources (built-in, local files,
Hugging Face), token shards, weighted mixing, packed resumable dataloaders.

Importing this package reads no data files; they are opened when a tokenizer or dataloader
is built.
"""

from remoe_recipe.data.config import Data
from remoe_recipe.data.dataset import PackedTextDataset
from remoe_recipe.data.loader import build_dataloader, build_packed_dataset, build_validation_dataloader
from remoe_recipe.data.mixing import MixedDataset
from remoe_recipe.data.shard_dataset import PackedShardDataset
from remoe_recipe.data.shards import ShardWriter, TokenShards
from remoe_recipe.data.sources import BUILTIN_DATASETS, resolve_source
from remoe_recipe.data.tokenizer import (
    build_tiktoken_tokenizer,
    load_tokenizer,
    TiktokenTokenizer,
)

__all__ = [
    "BUILTIN_DATASETS",
    "Data",
    "MixedDataset",
    "PackedShardDataset",
    "PackedTextDataset",
    "ShardWriter",
    "TiktokenTokenizer",
    "TokenShards",
    "build_dataloader",
    "build_packed_dataset",
    "build_tiktoken_tokenizer",
    "build_validation_dataloader",
    "load_tokenizer",
    "resolve_source",
]
