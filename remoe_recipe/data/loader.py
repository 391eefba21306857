"""Dataloader builders with torchtitan's TrainSpec signatures.

What a section reads, in order: `data.mix` (training only), else `<section>.dataset_path`
(a token-shard folder, a save_to_disk folder, local files), else `<section>.dataset` (a
built-in corpus or a Hugging Face dataset).
"""

import os
from dataclasses import asdict
from pathlib import Path

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from remoe_recipe.data.config import Data, data_config
from remoe_recipe.data.dataset import PackedTextDataset
from remoe_recipe.data.mixing import MixedDataset, mix_source, parse_mix_entry
from remoe_recipe.data.shard_dataset import PackedShardDataset
from remoe_recipe.data.shards import is_shard_dir, TokenShards
from remoe_recipe.data.sources import resolve_source


def build_packed_dataset(
    name: str,
    path: str | None,
    section: str,
    data: Data,
    tokenizer: BaseTokenizer,
    seq_len: int,
    dp_rank: int,
    dp_world_size: int,
    infinite: bool,
    return_source: bool,
):
    """A PackedShardDataset for a shard folder, else a PackedTextDataset over the source."""
    common = dict(
        seq_len=seq_len, dp_rank=dp_rank, dp_world_size=dp_world_size, infinite=infinite,
        return_source=return_source, restart_each_iter=section == "validation",
    )
    if path and list(Path(os.path.expanduser(path)).glob("tokens_*.bin")) and not is_shard_dir(path):
        raise FileNotFoundError(
            f"{section}.dataset_path = {path!r}: token shard files but no index.json "
            "(an unfinished scripts/prepare_shards.py run?)"
        )
    if is_shard_dir(path):
        shards = TokenShards(path, f"{section}.dataset_path", tokenizer=tokenizer, verify=data.verify_shards)
        return PackedShardDataset(shards, name=f"{section} shards {path}", **common)
    label, source = resolve_source(name, path, section, data)
    shuffle = dict(shuffle_window=data.shuffle_window, shuffle_seed=data.shuffle_seed) if section == "training" else {}
    return PackedTextDataset(source, tokenizer, name=f"{section} data {label}", **shuffle, **common)


def _mixed_dataset(data: Data, tokenizer, seq_len, dp_rank, dp_world_size, return_source):
    components, weights = [], []
    for entry in data.mix:
        weight, spec = parse_mix_entry(entry)
        name, path = mix_source(spec)
        try:
            ds = build_packed_dataset(
                name, path, "training", data, tokenizer, seq_len, dp_rank, dp_world_size,
                infinite=True, return_source=return_source,
            )
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"data.mix entry {entry!r}: {e}") from e
        components.append(ds)
        weights.append(weight)
    return MixedDataset(components, weights, name=f"training mix {data.mix}")


def _build(section, dp_world_size, dp_rank, tokenizer, job_config, infinite, return_source):
    cfg = getattr(job_config, section)
    data = data_config(job_config)
    if section == "training" and data.mix:
        if cfg.dataset_path:
            logger.warning(f"data.mix is set: training.dataset_path = {cfg.dataset_path!r} is ignored")
        dataset = _mixed_dataset(data, tokenizer, cfg.seq_len, dp_rank, dp_world_size, return_source)
    else:
        dataset = build_packed_dataset(
            cfg.dataset, cfg.dataset_path, section, data, tokenizer, cfg.seq_len, dp_rank,
            dp_world_size, infinite, return_source,
        )
    # num_workers, persistent_workers, pin_memory, prefetch_factor from [<section>.dataloader].
    kwargs = {**asdict(cfg.dataloader), "batch_size": cfg.local_batch_size}
    return ParallelAwareDataloader(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, **kwargs)


def build_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config,
    infinite: bool = True,
    return_source: bool = False,
) -> ParallelAwareDataloader:
    """TrainSpec.build_dataloader_fn: `[data]`, `training.dataset` / `.dataset_path` / `.seq_len` /
    `.local_batch_size` / `[training.dataloader]`; loops over epochs forever by default."""
    return _build("training", dp_world_size, dp_rank, tokenizer, job_config, infinite, return_source)


def build_validation_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config,
    infinite: bool = False,
    return_source: bool = False,
) -> ParallelAwareDataloader:
    """Same from `[validation]`, one pass by default; "shakespeare" reads the validation split.

    Drop-in for torchtitan's build_text_validation_dataloader: Validator calls it with these
    keyword arguments, and infinite=True when validation.steps != -1. Every iteration (every
    validation run) starts from the first document, so runs are comparable."""
    return _build("validation", dp_world_size, dp_rank, tokenizer, job_config, infinite, return_source)
