"""Dataloader builders with torchtitan's TrainSpec signatures."""

from dataclasses import asdict

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer

from remoe_recipe.data.dataset import PackedTextDataset
from remoe_recipe.data.sources import resolve_source


def _build(section: str, dp_world_size, dp_rank, tokenizer, job_config, infinite, return_source):
    validation = section == "validation"
    cfg = getattr(job_config, section)
    label, source = resolve_source(cfg.dataset, cfg.dataset_path, section)
    dataset = PackedTextDataset(
        source,
        tokenizer,
        seq_len=cfg.seq_len,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        infinite=infinite,
        return_source=return_source,
        restart_each_iter=validation,
        name=f"{section} data {label}",
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
    """TrainSpec.build_dataloader_fn: `training.dataset` / `.dataset_path` / `.seq_len` /
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
