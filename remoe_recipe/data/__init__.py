"""Data for the ReMoE recipe: tiktoken tokenizers, document sources, packed dataloaders.

Importing this package reads no data files; they are opened when a tokenizer or dataloader
is built.
"""

from remoe_recipe.data.dataset import PackedTextDataset
from remoe_recipe.data.loader import build_dataloader, build_validation_dataloader
from remoe_recipe.data.sources import BUILTIN_DATASETS, resolve_source
from remoe_recipe.data.tokenizer import (
    build_tiktoken_tokenizer,
    load_tokenizer,
    padded_vocab_size,
    TiktokenTokenizer,
)

__all__ = [
    "BUILTIN_DATASETS",
    "PackedTextDataset",
    "TiktokenTokenizer",
    "build_dataloader",
    "build_tiktoken_tokenizer",
    "build_validation_dataloader",
    "load_tokenizer",
    "padded_vocab_size",
    "resolve_source",
]
