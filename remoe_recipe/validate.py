"""Whole-config checks that run before any process group starts: one clear line per problem."""

import copy
import os

from remoe_recipe.config import ConfigError, validate_schedule
from remoe_recipe.infra.layout import check_layout
from remoe_recipe.model.args import remoe_flavors

TRAIN_SPEC_NAME = "remoe"


def validate_job_config(config, world_size: int | None = None) -> None:
    if config.model.name != TRAIN_SPEC_NAME:
        raise ConfigError(f"model.name = {config.model.name!r}: this recipe trains {TRAIN_SPEC_NAME!r}")
    flavors = remoe_flavors()
    if config.model.flavor not in flavors:
        raise ConfigError(
            f"model.flavor = {config.model.flavor!r}: expected one of {sorted(flavors)}"
        )
    args = copy.deepcopy(flavors[config.model.flavor])
    args.moe = config.moe
    args.validate()  # the [moe] values, then how they fit the flavor
    validate_schedule(config)
    if config.training.seq_len < 1 or config.training.local_batch_size < 1:
        raise ConfigError("training.seq_len and training.local_batch_size must be >= 1")
    if world_size is None:
        # torchrun sets WORLD_SIZE; `python -m remoe_recipe.train` alone is one process;
        # torchtitan's fake-backend dry run takes its world size from NGPU.
        fake = config.comm.mode in ("fake_backend", "local_tensor")
        world_size = int(os.environ.get("NGPU" if fake else "WORLD_SIZE", "1"))
    check_layout(config, world_size)
